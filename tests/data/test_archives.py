"""Extraction refuses members that leave their folder and archives that stop short; so does a download
of an archive that no checksum vouches for."""

from __future__ import annotations

import hashlib
import io
import random
import tarfile
import zipfile

import pytest

from vlmopt.data.archives import CorruptArchiveError, UnsafeArchiveError, check_archive, safe_extract
from vlmopt.data.download import download


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tar(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buffer.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_safe_extract_writes_inside_the_folder(kind, tmp_path):
    members = {"data/a.txt": b"a", "data/sub/b.txt": b"b"}
    archive = tmp_path / f"x.{kind}"
    archive.write_bytes(_tar(members) if kind == "tar" else _zip(members))
    written = safe_extract(archive, tmp_path / "out")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in written) == sorted(members)
    assert (tmp_path / "out/data/sub/b.txt").read_bytes() == b"b"
    only = safe_extract(archive, tmp_path / "only", members=["data/sub/"])
    assert [p.name for p in only] == ["b.txt"]


@pytest.mark.parametrize(
    ("kind", "name"),
    [("tar", "../evil.txt"), ("tar", "/tmp/evil.txt"), ("zip", "../../evil.txt"), ("zip", "data/../../evil.txt")],
)
def test_members_escaping_the_folder_are_refused_before_anything_is_written(kind, name, tmp_path):
    members = {"data/ok.txt": b"ok", name: b"evil"}
    archive = tmp_path / f"x.{kind}"
    archive.write_bytes(_tar(members) if kind == "tar" else _zip(members))
    with pytest.raises(UnsafeArchiveError, match="outside"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out" / "data").exists()
    assert not (tmp_path / "evil.txt").exists()


def test_links_in_archives_are_refused(tmp_path):
    archive = tmp_path / "x.tar"
    archive.write_bytes(_tar({"a.txt": b"a"}, links={"link": "/etc/passwd"}))
    with pytest.raises(UnsafeArchiveError, match="'link' is a link"):
        safe_extract(archive, tmp_path / "out")
    (tmp_path / "plain").write_text("not an archive")
    with pytest.raises(ValueError, match="neither a zip nor a tar"):
        safe_extract(tmp_path / "plain", tmp_path / "out")


# --- archives that stop short ------------------------------------------------------------------


def _noise(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)  # incompressible, so a cut archive lacks member data


def _archive(kind: str) -> bytes:
    members = {f"data/m{i}.bin": _noise(20_000, i) for i in range(4)}
    if kind == "zip":
        return _zip(members)
    buffer = io.BytesIO()
    with tarfile.open(
        fileobj=buffer, mode={"tar.gz": "w:gz", "tar": "w", "tar.bz2": "w:bz2", "tar.xz": "w:xz"}[kind]
    ) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _tar_end(data: bytes) -> int:
    """Where a plain tar's end-of-archive marker starts."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.getmembers()
        return tar.offset


def _cuts(kind: str, data: bytes) -> list[int]:
    if kind == "tar":  # the members are all there, the end marker is not (or only in part)
        return [len(data) // 2, _tar_end(data), _tar_end(data) + 100]
    return [len(data) // 2, len(data) - 5]  # the compressed stream's or the zip directory's end is missing


ARCHIVES = ["tar.gz", "zip", "tar", "tar.bz2", "tar.xz"]


@pytest.mark.parametrize("kind", ARCHIVES)
def test_complete_archives_pass_the_check(kind, tmp_path):
    path = tmp_path / f"x.{kind}"
    path.write_bytes(_archive(kind))
    check_archive(path)
    written = safe_extract(path, tmp_path / "out")
    assert sorted(p.name for p in written) == ["m0.bin", "m1.bin", "m2.bin", "m3.bin"]
    assert (tmp_path / "out/data/m2.bin").read_bytes() == _noise(20_000, 2)


@pytest.mark.parametrize("kind", ARCHIVES)
def test_a_truncated_archive_is_refused_and_removed_by_download(kind, http_server, tmp_path):
    data = _archive(kind)
    for cut in _cuts(kind, data):
        name = f"x{cut}.{kind}"
        http_server.files[name] = data[:cut]  # served honestly: HTTP cannot tell, the archive can
        with pytest.raises(CorruptArchiveError, match=f"archive {name} cannot be read to its end"):
            download(http_server.url(name), tmp_path / name, progress=False)
        assert not (tmp_path / name).exists() and not (tmp_path / f"{name}.part").exists()
        # A broken archive already under its final name is not trusted: it is fetched again.
        (tmp_path / name).write_bytes(data[:cut])
        http_server.files[name] = data
        assert download(http_server.url(name), tmp_path / name, progress=False).read_bytes() == data


@pytest.mark.parametrize("kind", ARCHIVES)
def test_a_truncated_archive_is_refused_and_removed_by_safe_extract(kind, tmp_path):
    data = _archive(kind)
    for cut in _cuts(kind, data):
        path = tmp_path / f"x{cut}.{kind}"
        path.write_bytes(data[:cut])
        with pytest.raises(CorruptArchiveError, match="cannot be read to its end") as err:
            check_archive(path)
        assert str(path) in str(err.value) and path.exists()  # the check alone leaves the file
        with pytest.raises(CorruptArchiveError, match=f"{path} cannot be read to its end.*was removed"):
            safe_extract(path, tmp_path / "out")
        assert not path.exists()
        assert not any(p.is_file() for p in (tmp_path / "out").rglob("*"))


def test_a_zip_with_bytes_missing_in_the_middle_is_refused(tmp_path):
    data = _archive("zip")
    path = tmp_path / "x.zip"
    path.write_bytes(data[:30_000] + data[31_000:])  # the directory is intact, its offsets are not
    with pytest.raises(CorruptArchiveError, match="x.zip cannot be read to its end"):
        safe_extract(path, tmp_path / "out")
    assert not path.exists()


def test_a_checksum_vouches_for_an_archive_and_a_non_archive_is_not_listed(http_server, tmp_path):
    # A file whose name is no archive's is not listed; one under an archive's name that is not one is refused.
    http_server.files["notes.txt"] = b"plain text"
    assert download(http_server.url("notes.txt"), tmp_path / "notes.txt", progress=False).read_bytes() == b"plain text"
    http_server.files["y.zip"] = b"plain text"
    with pytest.raises(CorruptArchiveError, match=r"y.zip cannot be read to its end \(File is not a zip file\)"):
        download(http_server.url("y.zip"), tmp_path / "y.zip", progress=False)
    assert not (tmp_path / "y.zip").exists()
    # With a checksum, the published bytes are what they are: no listing needed.
    data = _archive("tar.gz")[:1000]
    http_server.files["z.tar.gz"] = data
    assert download(http_server.url("z.tar.gz"), tmp_path / "z.tar.gz", sha256=_sha(data), progress=False).exists()
