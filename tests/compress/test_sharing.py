"""Variant folders share the weight files they leave unchanged (vlmopt.compress.sharing): one file per
module group, each a hard link to one copy in the store; the folders load as before."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch

from vlmopt.compress import apply_variant
from vlmopt.compress.saved import export_variant, load_variant, save_variant
from vlmopt.compress.sharing import INDEX, group_of, share_weights
from vlmopt.models import load_model

GROUPED = {"granularity": "group", "group_size": 16}
VARIANTS = {
    "baseline": [],
    "language-first": [{"method": "uniform", "bits": 4, "part": "language", "position": "first", **GROUPED}],
    "vision-w8": [{"method": "uniform", "bits": 8, "part": "vision", "symmetric": True}],
}


@pytest.mark.parametrize(
    ("name", "group"),
    [
        ("language_model.model.decoder.layers.3.fc1.weight", "language_model.model.decoder.layers.3.fc1"),
        ("language_model.model.decoder.layers.3.fc1.weight_packed", "language_model.model.decoder.layers.3.fc1"),
        ("qformer.encoder.layer.0.attention.attention.query.bias", "qformer.encoder.layer.0.attention"),
        ("vision_model.encoder.layers.12.layer_norm1.weight", "vision_model.encoder.layers.12.layer_norm1"),
        ("language_model.model.decoder.embed_tokens.weight", "language_model.model.decoder.embed_tokens"),
        ("query_tokens", "root"),
    ],
)
def test_tensors_are_grouped_by_the_child_of_their_layer(name, group):
    assert group_of(name) == group


def _save(shapes_texts, tmp_path, share, names=VARIANTS):
    folders, models = {}, {}
    for name in names:
        loaded = load_model("tiny:blip2-opt", texts=shapes_texts, seed=0)
        manifest = apply_variant(loaded.model, loaded.parts(), VARIANTS[name])
        folders[name] = tmp_path / name
        save_variant(loaded, folders[name], manifest, inputs_hash="test", share=share)
        models[name] = loaded.model.state_dict()
    return folders, models


def _inodes(folder):
    return {p.name: p.stat().st_ino for p in folder.glob("*.safetensors")}


def test_unchanged_module_groups_are_one_file_for_every_variant(shapes_texts, tmp_path):
    store = tmp_path / "store"
    folders, models = _save(shapes_texts, tmp_path, store)
    inodes = {name: _inodes(folder) for name, folder in folders.items()}
    for name, folder in folders.items():
        assert not (folder / "model.safetensors").exists()
        index = json.loads((folder / INDEX).read_text())["weight_map"]
        assert set(index.values()) == set(inodes[name])
        # Loaded back, the evaluated model, tensor for tensor.
        state = load_variant(folder).model.state_dict()
        assert all(torch.equal(state[k], models[name][k]) for k in models[name])
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["storage"]["weight_files"] == len(inodes[name])

    base, language, vision = inodes["baseline"], inodes["language-first"], inodes["vision-w8"]
    fc1 = "weights.language_model.model.decoder.layers.0.fc1.safetensors"
    layer1_fc1 = "weights.language_model.model.decoder.layers.1.fc1.safetensors"
    qkv = "weights.vision_model.encoder.layers.0.self_attn.safetensors"
    assert language[fc1] != base[fc1] == vision[fc1]  # the first language layer changed in one variant only
    assert language[layer1_fc1] == base[layer1_fc1] == vision[layer1_fc1]
    assert vision[qkv] != base[qkv] == language[qkv]
    # On disk: each distinct file once, in the store.
    distinct = {ino for files in inodes.values() for ino in files.values()}
    in_store = {p.stat().st_ino for p in store.iterdir()}
    assert distinct == in_store
    apparent = sum(p.stat().st_size for f in folders.values() for p in f.glob("*.safetensors"))
    on_disk = sum(p.stat().st_size for p in store.iterdir())
    assert on_disk < 0.6 * apparent
    # Shared files are read-only, so that nothing changes them in place.
    assert not any(os.stat(p).st_mode & 0o222 for p in store.iterdir())

    # The same variant written again: every file is already in the store.
    again = share_weights(folders["vision-w8"], store)
    assert again["linked"] == again["files"] == len(vision)
    assert _inodes(folders["vision-w8"]) == vision
    # An export of a shared, packed folder carries its index and shards.
    exported = export_variant(folders["language-first"], tmp_path / "exported")
    assert (
        json.loads((exported / INDEX).read_text())["weight_map"]
        == json.loads((folders["language-first"] / INDEX).read_text())["weight_map"]
    )


def test_without_hard_links_the_folder_keeps_its_own_files(shapes_texts, tmp_path, monkeypatch, caplog):
    def no_links(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr("vlmopt.compress.sharing.os.link", no_links)
    folders, models = _save(shapes_texts, tmp_path, tmp_path / "store", names=["language-first"])
    folder = folders["language-first"]
    assert "are not shared" in caplog.text
    assert not list((tmp_path / "store").iterdir())
    state = load_variant(folder).model.state_dict()
    assert all(torch.equal(state[k], models["language-first"][k]) for k in state)
