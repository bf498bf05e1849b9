"""Reading hub datasets (vlmopt.data.hub) from local folders in the hub's layout, offline, with a private cache."""

from __future__ import annotations

import io
import sys

import pytest
from PIL import Image

from vlmopt.data.hub import (
    has_image,
    image_suffix,
    load_hub_dataset,
    remove_stale_images,
    require_columns,
    require_split,
    split_table,
    write_images,
)


@pytest.fixture
def hf_offline(monkeypatch, tmp_path):
    """The ``datasets`` library offline, its caches under ``tmp_path`` (also when it was imported before)."""
    import datasets.config
    import huggingface_hub.constants

    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(home / "datasets"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name, value in {
        "HF_CACHE_HOME": str(home),
        "HF_DATASETS_CACHE": home / "datasets",
        "DOWNLOADED_DATASETS_PATH": home / "datasets" / "downloads",
        "EXTRACTED_DATASETS_PATH": home / "datasets" / "downloads" / "extracted",
        "HF_MODULES_CACHE": home / "modules",
        "HF_HUB_OFFLINE": True,
        "HF_DATASETS_OFFLINE": True,
    }.items():
        monkeypatch.setattr(datasets.config, name, value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    datasets.disable_progress_bars()
    yield home
    datasets.enable_progress_bars()


def image_bytes(color, fmt="PNG", size=(6, 4)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def write_hub_parquet(folder, files: dict, features) -> None:
    """Write each ``{file name under data/: columns}`` as the hub stores it (parquet with the features)."""
    import datasets

    for name, columns in files.items():
        path = folder / "data" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_dict(columns, features=features).to_parquet(str(path))


def _features():
    import datasets

    return datasets.Features(
        {"name": datasets.Value("string"), "tags": datasets.List(datasets.Value("string")), "image": datasets.Image()}
    )


PNG = image_bytes((10, 20, 30))
JPEG = image_bytes((200, 30, 30), fmt="JPEG")


def _columns(n=2):
    return {
        "name": [f"item{i}" for i in range(n)],
        "tags": [["x", "y"] for _ in range(n)],
        "image": [{"bytes": PNG, "path": "item0.png"}, {"bytes": JPEG, "path": None}, None][:n],
    }


@pytest.fixture
def parquet_folder(hf_offline, tmp_path):
    folder = tmp_path / "hubcopy"
    write_hub_parquet(
        folder,
        {"train-00000-of-00001.parquet": _columns(3), "test-00000-of-00001.parquet": _columns(2)},
        _features(),
    )
    return folder


def test_a_folder_of_parquet_files_in_the_hub_layout_is_read_with_its_splits(parquet_folder, hf_offline):
    splits = load_hub_dataset(parquet_folder)
    assert sorted(splits) == ["test", "train"]
    assert splits["train"].num_rows == 3 and list(splits["train"].column_names) == ["name", "tags", "image"]
    table = split_table(splits["train"], ["name", "tags"])
    assert list(table["name"]) == ["item0", "item1", "item2"]
    assert [list(t) for t in table["tags"]] == [["x", "y"]] * 3
    assert has_image(splits["train"], "image").tolist() == [True, True, False]
    # The library's cache went to the private folder.
    assert (hf_offline / "datasets").is_dir()


def test_save_to_disk_folders_are_read_both_as_dict_and_as_a_single_split(parquet_folder, tmp_path):
    import datasets

    splits = load_hub_dataset(parquet_folder)
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "saved"))
    again = load_hub_dataset(tmp_path / "saved")
    assert sorted(again) == ["test", "train"]
    assert again["train"]["name"] == ["item0", "item1", "item2"]

    single = datasets.Dataset.from_dict(_columns(2), features=_features(), split=datasets.Split.TEST)
    single.save_to_disk(str(tmp_path / "single"))
    assert list(load_hub_dataset(tmp_path / "single")) == ["test"]
    unnamed = datasets.Dataset.from_dict(_columns(2), features=_features())
    unnamed.save_to_disk(str(tmp_path / "unnamed"))
    assert list(load_hub_dataset(tmp_path / "unnamed")) == ["train"]


def test_images_are_written_byte_for_byte_with_an_ending_from_the_path_or_the_bytes(parquet_folder, tmp_path):
    train = load_hub_dataset(parquet_folder)["train"]
    root = tmp_path / "out"
    paths = write_images(train, "image", [1, 0], ["b", "a"], root, "train", hub_id="x")
    # Row 0 keeps its stored path's ending; row 1 has no path, so its JPEG bytes name the ending.
    assert paths == ["images/train/b.jpg", "images/train/a.png"]
    assert (root / paths[0]).read_bytes() == JPEG
    assert (root / paths[1]).read_bytes() == PNG
    # A rerun rewrites nothing; a row without an image is an error naming it.
    mtime = (root / paths[0]).stat().st_mtime_ns
    assert write_images(train, "image", [1], ["b"], root, "train", hub_id="x") == ["images/train/b.jpg"]
    assert (root / paths[0]).stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match=r"dataset 'x', split 'train', row 2, column 'image': the row has no image"):
        write_images(train, "image", [2], ["c"], root, "train", hub_id="x")
    # Images of an earlier, larger run are removed.
    assert remove_stale_images(root, ["images/train/b.jpg"]) == 1
    assert sorted(p.name for p in (root / "images" / "train").iterdir()) == ["b.jpg"]


def test_image_suffix_prefers_an_image_ending_then_sniffs_then_falls_back_to_png():
    assert image_suffix(PNG, "photo.JPEG") == ".jpeg"
    assert image_suffix(PNG, None, "notes.txt") == ".png"
    assert image_suffix(JPEG, None) == ".jpg"
    assert image_suffix(image_bytes((1, 2, 3), fmt="GIF")) == ".gif"
    assert image_suffix(b"not an image") == ".png"


def test_missing_splits_and_columns_are_errors_naming_what_exists(parquet_folder):
    splits = load_hub_dataset(parquet_folder)
    with pytest.raises(ValueError, match=r"dataset 'owner/ds' has no split 'valid' or 'validation'; its splits are "):
        require_split(splits, ("valid", "validation"), "owner/ds")
    with pytest.raises(ValueError, match=r"\['test', 'train'\]"):
        require_split(splits, "valid", "owner/ds")
    assert require_split(splits, ("valid", "test"), "owner/ds").num_rows == 2
    with pytest.raises(
        ValueError,
        match=r"dataset 'owner/ds', split 'train', lacks column\(s\) \['captions'\]; "
        r"its columns are \['name', 'tags', 'image'\]",
    ):
        require_columns(splits["train"], ["name", "captions"], "owner/ds", "train")


def test_an_uncached_hub_id_offline_is_an_error_naming_it(hf_offline):
    with pytest.raises(
        ValueError, match=r"could not read the hub dataset 'nobody/no-such-dataset'.*HF_DATASETS_OFFLINE"
    ):
        load_hub_dataset("nobody/no-such-dataset")


def test_a_folder_without_data_files_is_an_error_naming_it(hf_offline, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"could not read the local folder '.*empty'"):
        load_hub_dataset(tmp_path / "empty")


def test_without_the_datasets_library_the_error_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"needs the 'datasets' library.*pip install datasets"):
        load_hub_dataset(tmp_path)
