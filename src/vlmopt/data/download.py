"""Resumable, verified downloads.

Snakemake can check a finished file's checksum (``ensure(..., sha256=...)``) and fetch plain HTTP
inputs through a storage plugin, but neither resumes an interrupted transfer: a multi-gigabyte
COCO or GQA archive cut off at 90 % would start again from zero. :func:`download` therefore keeps
the partial file (``<name>.part``), continues it with an HTTP ``Range`` request, retries with
back-off, and renames it to its final name only after every check passed, so a file under the
final name is always complete.

Many publishers give no checksum, so :func:`download` also checks what HTTP itself says:

* the bytes received must number the answer's ``Content-Length``;
* a resumed answer (``206``) must start where the partial file ends (its ``Content-Range``
  ``bytes START-END/TOTAL``, whose length must agree with ``Content-Length``); one that starts
  elsewhere is not appended: the partial file is discarded and the download starts from zero;
* a ``416`` (nothing left to send) completes the partial file only when its size equals the
  remote size the answer names (``Content-Range: bytes */TOTAL``); a partial file of another size,
  or one the server names no size for, is discarded and the download starts from zero;
* after the transfer, the file must have the remote file's whole size where the server named it
  (the ``Content-Range`` total, or a full answer's ``Content-Length``);
* an HTML page (``Content-Type: text/html``) for a URL that names no HTML file is an error or login
  page, refused and never kept;
* a size pinned by the caller (``size=``) is checked before the rename, like a checksum;
* an archive (``.zip``, ``.tar``, ``.tar.gz``, ``.tgz``, ``.tar.bz2``, ``.tar.xz``, ...) that no
  checksum vouches for must be readable to its end, as
  :func:`vlmopt.data.archives.check_archive` checks it.

A file that fails a check is removed with an error naming what was expected and what was found,
and a file already under its final name that fails one is not trusted but downloaded again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from email.message import Message
from http.client import HTTPException
from pathlib import Path

from tqdm.auto import tqdm

from vlmopt.data.archives import _ARCHIVE_SUFFIXES, CorruptArchiveError, _archive_problem
from vlmopt.data.errors import DownloadError

__all__ = [
    "ChecksumError",
    "CorruptArchiveError",
    "DownloadError",
    "SizeMismatchError",
    "download",
    "file_digest",
]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_HTML_TYPES = ("text/html", "application/xhtml+xml")
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)\s*$", re.IGNORECASE)


class ChecksumError(DownloadError):
    """A downloaded file whose checksum differs from the published one (the file is removed)."""


class SizeMismatchError(ChecksumError):
    """A downloaded file whose size differs from the pinned one (the file is removed)."""


class _TransferError(DownloadError):
    """An answer whose headers and body disagree; the attempt is retried."""


class _StartOver(Exception):
    """The partial file cannot be continued; it is discarded and the file fetched from its start."""


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check(path: Path, url: str, sha256: str | None, md5: str | None) -> None:
    for algorithm, expected in (("sha256", sha256), ("md5", md5)):
        if expected is None:
            continue
        actual = file_digest(path, algorithm)
        if actual != expected.lower():
            path.unlink()
            raise ChecksumError(
                f"{url}: {algorithm} of the downloaded file is {actual}, the published one is {expected}; "
                "the file was removed (a rerun downloads it again)"
            )


def _verify(path: Path, url: str, *, name: str, sha256: str | None, md5: str | None, size: int | None) -> None:
    """Pinned size, then checksums, then (where no checksum vouches for it) an archive's integrity.

    ``name`` is the file's final name (``path`` may be the ``.part`` file); a failing file is removed.
    """
    if size is not None:
        actual = path.stat().st_size
        if actual != size:
            path.unlink()
            raise SizeMismatchError(
                f"{url}: the downloaded file has {actual} bytes, the pinned size is {size} bytes; "
                "the file was removed (a rerun downloads it again)"
            )
    _check(path, url, sha256, md5)
    if sha256 is None and md5 is None and name.lower().endswith(_ARCHIVE_SUFFIXES):
        problem = _archive_problem(path, name)
        if problem is not None:
            path.unlink()
            raise CorruptArchiveError(
                f"{url}: the archive {name} cannot be read to its end ({problem}); it is truncated or damaged "
                "and was removed (a rerun downloads it again)"
            )


def download(
    url: str,
    dest: str | Path,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    size: int | None = None,
    retries: int = 5,
    timeout: float = 60.0,
    backoff: float = 2.0,
    progress: bool = True,
) -> Path:
    """Fetch ``url`` to ``dest``: resumed from ``dest.part``, retried, verified, then renamed.

    ``size`` pins the file's length in bytes where the publisher gives no checksum. A ``dest`` that
    already exists is trusted when it passes the same checks (pinned size, checksum, and for an
    archive without a checksum :func:`~vlmopt.data.archives.check_archive`) and downloaded again otherwise. Raises
    :class:`SizeMismatchError` or :class:`ChecksumError` for a complete file of the wrong size or
    checksum, :class:`CorruptArchiveError` for an archive that cannot be read to its end (each
    removed), and :class:`DownloadError` for an HTML page instead of the file (nothing kept), an
    HTTP client error, or when every attempt failed (the partial file is kept, so the next call
    resumes it).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        try:
            _verify(dest, url, name=dest.name, sha256=sha256, md5=md5, size=size)
            return dest
        except (ChecksumError, CorruptArchiveError) as err:
            log.warning("%s failed its check, downloading it again: %s", dest, err)
    part = dest.with_name(dest.name + ".part")
    if size is not None and part.exists() and part.stat().st_size > size:
        log.warning(
            "%s has %d bytes, more than the pinned size of %d bytes; starting over", part, part.stat().st_size, size
        )
        part.unlink()
    last_error: Exception | None = None
    for attempt in range(retries + 1):
        if attempt:
            wait = backoff * 2 ** (attempt - 1)
            log.warning("%s: attempt %d failed (%s); retrying in %.1f s", url, attempt, last_error, wait)
            time.sleep(wait)
        try:
            _fetch(url, part, timeout=timeout, progress=progress, size=size)
            break
        except (urllib.error.URLError, HTTPException, TimeoutError, ConnectionError, _TransferError) as err:
            if isinstance(err, urllib.error.HTTPError) and 400 <= err.code < 500:
                raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from err
            last_error = err
    else:
        raise DownloadError(
            f"{url}: download failed after {retries + 1} attempts ({last_error}); "
            f"{part.stat().st_size if part.exists() else 0} bytes kept in {part} for the next attempt"
        )
    _verify(part, url, name=dest.name, sha256=sha256, md5=md5, size=size)
    os.replace(part, dest)
    return dest


def _fetch(url: str, part: Path, *, timeout: float, progress: bool, size: int | None = None) -> None:
    """One attempt: continue ``part`` from its size, or start it over where it cannot be continued.

    Returns once ``part`` holds the whole file as far as HTTP can tell; raises (``ConnectionError``,
    :class:`_TransferError`, ...) for an attempt worth retrying and :class:`DownloadError` for one that is not.
    """
    while True:
        try:
            _transfer(url, part, timeout=timeout, progress=progress, size=size)
            return
        except _StartOver as why:
            log.warning("%s: %s; discarding %s and downloading from the start", url, why, part)
            part.unlink(missing_ok=True)


def _header_int(headers: Message, name: str) -> int | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        return int(value.strip())
    except ValueError:
        return None


def _refuse_html(url: str, part: Path, headers: Message) -> None:
    content_type = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if content_type in _HTML_TYPES and not urllib.parse.urlsplit(url).path.lower().endswith((".html", ".htm")):
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"{url}: the server answered with an HTML page (Content-Type {content_type}) instead of the file, "
            "most likely an error or login page; nothing was kept"
        )


def _transfer(url: str, part: Path, *, timeout: float, progress: bool, size: int | None) -> None:
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "vlmopt"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code != 416 or not offset:
            raise
        # Nothing left to send from ``offset``: complete only if the remote file has exactly that size.
        found = _UNSATISFIED_RANGE.match((err.headers.get("Content-Range") or "").strip())
        err.close()
        remote = int(found.group(1)) if found else None
        if remote == offset:
            return
        if remote is None:
            raise _StartOver(
                f"the server answered 416 to a resume at {offset} bytes without naming the file's size"
            ) from None
        raise _StartOver(f"the partial file has {offset} bytes but the remote file has {remote} bytes") from None
    with response:
        headers = response.headers
        _refuse_html(url, part, headers)
        length = _header_int(headers, "Content-Length")
        if response.status == 206:
            content_range = (headers.get("Content-Range") or "").strip()
            found = _CONTENT_RANGE.match(content_range)
            if found is None or int(found.group(1)) != offset:
                # Appending bytes that start elsewhere would corrupt the file without a trace.
                said = f"Content-Range {content_range!r}" if content_range else "no Content-Range"
                if offset:
                    raise _StartOver(f"the server answered a resume at byte {offset} with {said}")
                raise _TransferError(f"{url}: the server answered a request for the whole file with {said}")
            span = int(found.group(2)) + 1 - offset
            if length is not None and span != length:
                raise _TransferError(
                    f"{url}: Content-Range {content_range!r} names {span} bytes but Content-Length says {length}"
                )
            length = span
            total = None if found.group(3) == "*" else int(found.group(3))
            if total is not None and offset + length > total:
                raise _TransferError(f"{url}: Content-Range {content_range!r} runs past the file's size {total}")
        else:
            if offset:
                log.warning("%s: the server ignored the resume request; starting over", url)
            offset = 0
            total = length
        if size is not None and total is not None and total != size:
            part.unlink(missing_ok=True)
            raise SizeMismatchError(
                f"{url}: the server gives the file's size as {total} bytes, the pinned size is {size} bytes; "
                "nothing was kept"
            )
        received = 0
        with (
            open(part, "ab" if offset else "wb") as handle,
            tqdm(
                total=total if total is not None else (None if length is None else offset + length),
                initial=offset,
                unit="B",
                unit_scale=True,
                desc=Path(urllib.parse.urlsplit(url).path).name,
                disable=not progress,
            ) as bar,
        ):
            while chunk := response.read(_CHUNK):
                handle.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if length is not None and received < length:
        raise ConnectionError(f"connection closed after {offset + received} of {offset + length} bytes")
    if length is not None and received > length:
        part.unlink()
        raise _TransferError(f"{url}: the server sent {received} bytes where Content-Length said {length}")
    have = part.stat().st_size
    if total is not None and have != total:
        if have > total:
            part.unlink()
        raise _TransferError(
            f"{url}: after the transfer the file has {have} bytes, the server gives its size as {total}"
        )
