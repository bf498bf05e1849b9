"""Downloads resume, retry and verify (checksums, HTTP's own sizes and ranges, pinned sizes)."""

from __future__ import annotations

import hashlib
import logging
import re

import pytest

from vlmopt.data.download import (
    ChecksumError,
    DownloadError,
    SizeMismatchError,
    download,
)
from vlmopt.data.sources import RemoteFile, fetch

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


# --- what HTTP itself says ---------------------------------------------------------------------

N = len(PAYLOAD)


@pytest.mark.parametrize("shift", [500, -500])
def test_a_resume_answered_at_the_wrong_offset_starts_over(shift, http_server, tmp_path, caplog):
    http_server.files["a.bin"] = PAYLOAD
    http_server.shift["a.bin"] = shift
    (tmp_path / "a.bin.part").write_bytes(PAYLOAD[:1000])
    with caplog.at_level(logging.WARNING, logger="vlmopt.data.download"):
        out = download(http_server.url("a.bin"), tmp_path / "a.bin", progress=False)
    # Not the partial file with bytes from elsewhere appended: the true file, fetched again from zero.
    assert out.read_bytes() == PAYLOAD
    assert http_server.requests == [("a.bin", "bytes=1000-"), ("a.bin", None)]
    assert f"resume at byte 1000 with Content-Range 'bytes {1000 - shift}-{N - 1}/{N}'" in caplog.text


def test_a_416_completes_only_a_partial_file_of_the_remote_size(http_server, tmp_path, caplog):
    http_server.files["a.bin"] = PAYLOAD
    # A partial file longer than the remote file: 416, but not complete; fetched again.
    (tmp_path / "a.bin.part").write_bytes(PAYLOAD + b"stale tail")
    with caplog.at_level(logging.WARNING, logger="vlmopt.data.download"):
        out = download(http_server.url("a.bin"), tmp_path / "a.bin", progress=False)
    assert out.read_bytes() == PAYLOAD
    assert http_server.requests == [("a.bin", f"bytes={N + 10}-"), ("a.bin", None)]
    assert f"the partial file has {N + 10} bytes but the remote file has {N} bytes" in caplog.text
    # A partial file of exactly the remote size is complete: one request, nothing sent again.
    (tmp_path / "b.bin.part").write_bytes(PAYLOAD)
    http_server.files["b.bin"] = PAYLOAD
    out = download(http_server.url("b.bin"), tmp_path / "b.bin", progress=False)
    assert out.read_bytes() == PAYLOAD and not (tmp_path / "b.bin.part").exists()
    assert http_server.requests[2:] == [("b.bin", f"bytes={N}-")]


def test_a_416_without_the_remote_size_starts_over(http_server, tmp_path, caplog):
    http_server.files["a.bin"] = PAYLOAD
    http_server.headers["a.bin"] = {"Content-Range": None}
    (tmp_path / "a.bin.part").write_bytes(PAYLOAD)
    with caplog.at_level(logging.WARNING, logger="vlmopt.data.download"):
        out = download(http_server.url("a.bin"), tmp_path / "a.bin", progress=False)
    assert out.read_bytes() == PAYLOAD
    assert http_server.requests == [("a.bin", f"bytes={N}-"), ("a.bin", None)]
    assert "without naming the file's size" in caplog.text


def test_a_body_shorter_than_its_content_length_is_not_complete(http_server, tmp_path):
    http_server.files["a.bin"] = PAYLOAD
    http_server.headers["a.bin"] = {"Content-Length": str(N + 10)}
    with pytest.raises(DownloadError, match=f"connection closed after {N} of {N + 10} bytes"):
        download(http_server.url("a.bin"), tmp_path / "a.bin", retries=0, progress=False)
    assert not (tmp_path / "a.bin").exists()
    assert (tmp_path / "a.bin.part").read_bytes() == PAYLOAD  # kept, to be resumed


def test_a_206_whose_range_and_length_disagree_is_not_appended(http_server, tmp_path):
    http_server.files["a.bin"] = PAYLOAD
    http_server.headers["a.bin"] = {"Content-Length": "5"}
    (tmp_path / "a.bin.part").write_bytes(PAYLOAD[:1000])
    with pytest.raises(DownloadError, match=f"names {N - 1000} bytes but Content-Length says 5"):
        download(http_server.url("a.bin"), tmp_path / "a.bin", retries=0, progress=False)
    assert (tmp_path / "a.bin.part").read_bytes() == PAYLOAD[:1000]
    assert not (tmp_path / "a.bin").exists()


def test_a_206_that_stops_short_of_the_total_is_resumed(http_server, tmp_path):
    # Content-Range promises the whole rest (total N) but the connection ends early: kept, then resumed.
    http_server.files["a.bin"] = PAYLOAD
    http_server.cut["a.bin"] = 1000
    (tmp_path / "a.bin.part").write_bytes(PAYLOAD[:1000])
    out = download(http_server.url("a.bin"), tmp_path / "a.bin", backoff=0.01, progress=False)
    assert out.read_bytes() == PAYLOAD
    assert http_server.requests == [("a.bin", "bytes=1000-"), ("a.bin", "bytes=2000-")]


@pytest.mark.parametrize("content_type", ["text/html; charset=utf-8", "application/xhtml+xml"])
def test_an_html_error_page_is_never_kept(content_type, http_server, tmp_path):
    http_server.files["x.tar.gz"] = b"<html><body>Please log in</body></html>"
    http_server.headers["x.tar.gz"] = {"Content-Type": content_type}
    url = http_server.url("x.tar.gz")
    expected = f"{url}: the server answered with an HTML page (Content-Type {content_type.split(';')[0]})"
    with pytest.raises(DownloadError, match=re.escape(expected)):
        download(url, tmp_path / "x.tar.gz", progress=False)
    assert list(tmp_path.iterdir()) == []
    assert len(http_server.requests) == 1  # refused for good, not retried
    # The same answer for a URL that names an HTML file is that file.
    http_server.files["page.html"] = b"<html></html>"
    http_server.headers["page.html"] = {"Content-Type": "text/html"}
    assert (
        download(http_server.url("page.html"), tmp_path / "page.html", progress=False).read_bytes() == b"<html></html>"
    )


@pytest.mark.parametrize("announced", [True, False])
def test_a_pinned_size_mismatch_names_both_sizes_and_keeps_nothing(announced, http_server, tmp_path):
    http_server.files["a.bin"] = PAYLOAD
    if not announced:  # no Content-Length: the size is only known once the file is here
        http_server.headers["a.bin"] = {"Content-Length": None}
    with pytest.raises(SizeMismatchError, match=f"{N} bytes, the pinned size is {N + 1} bytes") as err:
        download(http_server.url("a.bin"), tmp_path / "a.bin", size=N + 1, progress=False)
    assert isinstance(err.value, ChecksumError)
    assert list(tmp_path.iterdir()) == []


def test_a_pinned_size_is_checked_for_new_and_existing_files(http_server, tmp_path):
    http_server.files["a.bin"] = PAYLOAD
    # A server whose Content-Length is short would otherwise hand over a truncated file as complete.
    http_server.headers["a.bin"] = {"Content-Length": "1000"}
    with pytest.raises(SizeMismatchError, match=f"size as 1000 bytes, the pinned size is {N} bytes"):
        download(http_server.url("a.bin"), tmp_path / "a.bin", size=N, progress=False)
    del http_server.headers["a.bin"]
    out = download(http_server.url("a.bin"), tmp_path / "a.bin", size=N, progress=False)
    assert out.read_bytes() == PAYLOAD
    n = len(http_server.requests)
    assert download(http_server.url("a.bin"), out, size=N, progress=False) == out
    assert len(http_server.requests) == n  # the right size is trusted
    out.write_bytes(PAYLOAD[:-1])  # a file of another size under the final name is fetched again
    assert download(http_server.url("a.bin"), out, size=N, progress=False).read_bytes() == PAYLOAD
    assert http_server.requests[n:] == [("a.bin", None)]
    # A leftover partial file longer than the pinned size is not resumed.
    (tmp_path / "b.bin.part").write_bytes(PAYLOAD + b"x")
    http_server.files["b.bin"] = PAYLOAD
    assert download(http_server.url("b.bin"), tmp_path / "b.bin", size=N, progress=False).read_bytes() == PAYLOAD
    assert http_server.requests[-1] == ("b.bin", None)


def test_fetch_passes_a_source_s_pinned_size_on(http_server, tmp_path):
    http_server.files["a.bin"] = PAYLOAD
    mirror = http_server.url("")
    files = [RemoteFile("a.bin", "https://example.invalid/a.bin", size=N - 1)]
    with pytest.raises(SizeMismatchError, match=f"the pinned size is {N - 1} bytes"):
        fetch(files, tmp_path / "raw", mirror=mirror, progress=False)
    files = [RemoteFile("a.bin", "https://example.invalid/a.bin", size=N)]
    assert fetch(files, tmp_path / "raw", mirror=mirror, progress=False)["a.bin"].read_bytes() == PAYLOAD
