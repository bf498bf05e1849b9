"""Downloads resume, retry and verify; extraction refuses members that leave their folder."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile

import pytest

from vlmopt.data.download import ChecksumError, DownloadError, UnsafeArchiveError, download, safe_extract

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB, so a transfer spans several chunks


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_download_verifies_and_names_the_file_only_when_complete(http_server, tmp_path):
    http_server.files["a.bin"] = PAYLOAD
    out = download(http_server.url("a.bin"), tmp_path / "a.bin", sha256=_sha(PAYLOAD), progress=False)
    assert out.read_bytes() == PAYLOAD and not (tmp_path / "a.bin.part").exists()
    # A second call trusts the verified file and asks the server nothing.
    n = len(http_server.requests)
    download(http_server.url("a.bin"), tmp_path / "a.bin", sha256=_sha(PAYLOAD), progress=False)
    assert len(http_server.requests) == n


def test_an_interrupted_transfer_resumes_where_it_stopped(http_server, tmp_path):
    http_server.files["a.bin"] = PAYLOAD
    http_server.cut["a.bin"] = 300_000
    out = download(
        http_server.url("a.bin"), tmp_path / "a.bin", md5=hashlib.md5(PAYLOAD).hexdigest(), backoff=0.01, progress=False
    )
    assert out.read_bytes() == PAYLOAD
    # The retry asked only for the missing bytes.
    assert http_server.requests == [("a.bin", None), ("a.bin", "bytes=300000-")]


def test_a_partial_file_from_an_earlier_run_is_continued(http_server, tmp_path):
    http_server.files["a.bin"] = PAYLOAD
    (tmp_path / "a.bin.part").write_bytes(PAYLOAD[:1000])
    download(http_server.url("a.bin"), tmp_path / "a.bin", sha256=_sha(PAYLOAD), progress=False)
    assert (tmp_path / "a.bin").read_bytes() == PAYLOAD
    assert http_server.requests == [("a.bin", "bytes=1000-")]
    # A server that ignores Range: the partial file is started over, not appended to.
    http_server.ignore_range = True
    (tmp_path / "b.bin.part").write_bytes(b"stale")
    http_server.files["b.bin"] = PAYLOAD
    download(http_server.url("b.bin"), tmp_path / "b.bin", sha256=_sha(PAYLOAD), progress=False)
    assert (tmp_path / "b.bin").read_bytes() == PAYLOAD


def test_checksum_mismatch_names_both_digests_and_keeps_nothing(http_server, tmp_path):
    http_server.files["a.bin"] = PAYLOAD
    wrong = _sha(b"something else")
    with pytest.raises(ChecksumError, match=f"published one is {wrong}"):
        download(http_server.url("a.bin"), tmp_path / "a.bin", sha256=wrong, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_failures_after_every_retry_keep_the_partial_file(http_server, tmp_path):
    http_server.files["a.bin"] = PAYLOAD
    http_server.cut["a.bin"] = 1000
    with pytest.raises(DownloadError, match="failed after 1 attempts"):
        download(http_server.url("a.bin"), tmp_path / "a.bin", retries=0, progress=False)
    assert (tmp_path / "a.bin.part").stat().st_size == 1000
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(http_server.url("missing.bin"), tmp_path / "m.bin", progress=False)


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
