"""Resumable, verified downloads and archive extraction that stays inside its folder.

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
  checksum vouches for must be readable to its end (:func:`check_archive`): a zip's central
  directory must point at every member's local header, a tar must list every member up to its
  end-of-archive marker, and a compressed tar's stream must reach its end marker and checksum.

A file that fails a check is removed with an error naming what was expected and what was found,
and a file already under its final name that fails one is not trusted but downloaded again.

Python's ``tarfile`` and ``zipfile`` extract members with absolute paths, ``..`` components or
links that point elsewhere, so :func:`safe_extract` checks every member before writing any of
them; it also refuses (and removes) an archive that cannot be listed to its end, raising
:class:`CorruptArchiveError`, so a rerun downloads it again.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import logging
import lzma
import os
import re
import shutil
import struct
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Iterable
from email.message import Message
from http.client import HTTPException
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

__all__ = [
    "ChecksumError",
    "CorruptArchiveError",
    "DownloadError",
    "SizeMismatchError",
    "UnsafeArchiveError",
    "check_archive",
    "download",
    "file_digest",
    "safe_extract",
]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_TAR_SUFFIXES = (".tar", ".tgz", ".tar.gz", ".tbz", ".tbz2", ".tar.bz2", ".txz", ".tar.xz")
_ARCHIVE_SUFFIXES = (".zip", *_TAR_SUFFIXES)
_TAR_CODECS = ((b"\x1f\x8b", "r:gz"), (b"BZh", "r:bz2"), (b"\xfd7zXZ\x00", "r:xz"))
_HTML_TYPES = ("text/html", "application/xhtml+xml")
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)\s*$", re.IGNORECASE)
# Errors of reading a damaged archive (not of writing its members): zip, tar and their codecs.
_ARCHIVE_ERRORS = (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError)


class DownloadError(OSError):
    """A download that failed: after every retry (the partial file stays for the next attempt), or
    for good (an HTTP client error, an HTML page instead of the file)."""


class ChecksumError(DownloadError):
    """A downloaded file whose checksum differs from the published one (the file is removed)."""


class SizeMismatchError(ChecksumError):
    """A downloaded file whose size differs from the pinned one (the file is removed)."""


class CorruptArchiveError(DownloadError):
    """An archive that cannot be read to its end: truncated or damaged (it is removed where noted)."""


class UnsafeArchiveError(ValueError):
    """An archive member that would land outside the extraction folder, or is not a plain file."""


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
    archive without a checksum :func:`check_archive`) and downloaded again otherwise. Raises
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


def _archive_kind(path: Path, name: str) -> str | None:
    """``"zip"``, ``"tar"`` or None, from the file's first bytes, then its name, then a tar header."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    lower = name.lower()
    if lower.endswith(_TAR_SUFFIXES):
        return "tar"
    if lower.endswith(".zip") or zipfile.is_zipfile(path):
        return "zip"
    return "tar" if tarfile.is_tarfile(path) else None


def _check_zip(handle: zipfile.ZipFile, path: Path) -> None:
    """Every member's local header lies where the central directory says, before the directory."""
    directory = getattr(handle, "start_dir", None)
    end = directory if isinstance(directory, int) else path.stat().st_size
    with open(path, "rb") as raw:
        for info in handle.infolist():
            if info.header_offset < 0:
                raise zipfile.BadZipFile(f"member {info.filename!r} would start before the archive (bytes are missing)")
            raw.seek(info.header_offset)
            header = raw.read(30)
            if len(header) < 30 or header[:4] != b"PK\x03\x04":
                raise zipfile.BadZipFile(f"member {info.filename!r} has no local header where the directory puts it")
            name_length, extra_length = struct.unpack("<HH", header[26:30])
            if info.header_offset + 30 + name_length + extra_length + info.compress_size > end:
                raise zipfile.BadZipFile(f"member {info.filename!r} runs past the start of the central directory")


def _tar_members(handle: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """Every member, read through to the archive's end; raises where the archive stops short."""
    infos = handle.getmembers()
    stream = handle.fileobj
    if isinstance(stream, gzip.GzipFile | bz2.BZ2File | lzma.LZMAFile):
        # The codec's end marker and checksum prove that the whole stream arrived.
        while stream.read(_CHUNK):
            pass
    else:
        # ``getmembers`` stops quietly at a missing or garbled header; a complete tar ends in zero blocks.
        stream.seek(handle.offset)
        if stream.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:
            raise tarfile.ReadError(f"the archive ends after {len(infos)} members without its end-of-archive marker")
    return infos


def _describe(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    cause = err.__cause__
    return text if cause is None else f"{text}: {_describe(cause)}"


def _open_tar(path: Path) -> tarfile.TarFile:
    """Open a tar archive with the codec its first bytes name (plain tar otherwise)."""
    with open(path, "rb") as handle:
        head = handle.read(6)
    mode = next((mode for magic, mode in _TAR_CODECS if head.startswith(magic)), "r:")
    return tarfile.open(path, mode)


def _archive_problem(path: Path, name: str) -> str | None:
    kind = _archive_kind(path, name)
    if kind is None:
        return "it is neither a zip nor a tar archive"
    try:
        if kind == "zip":
            with zipfile.ZipFile(path) as handle:
                _check_zip(handle, path)
        else:
            with _open_tar(path) as handle:
                _tar_members(handle)
    except _ARCHIVE_ERRORS as err:
        return _describe(err)
    return None


def check_archive(path: str | Path, *, name: str | None = None) -> None:
    """Raise :class:`CorruptArchiveError` unless the zip or tar archive at ``path`` reads to its end.

    A zip's central directory must be present and point at every member's local header; a tar
    (plain, gz, bz2 or xz) must list every member up to its end-of-archive marker, and a compressed
    one must reach its codec's end marker and checksum. ``name`` (by default the file's own) tells
    the expected kind where the content does not. The file is left in place.
    """
    path = Path(path)
    problem = _archive_problem(path, name or path.name)
    if problem is not None:
        raise CorruptArchiveError(f"{path} cannot be read to its end ({problem}); it is truncated or damaged")


def _corrupt(archive: Path, err: BaseException) -> CorruptArchiveError:
    archive.unlink(missing_ok=True)
    return CorruptArchiveError(
        f"{archive} cannot be read to its end ({_describe(err)}); it is truncated or damaged "
        "and was removed (a rerun downloads it again)"
    )


def _member_target(dest: Path, name: str) -> Path:
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or (pure.parts and ":" in pure.parts[0]):
        raise UnsafeArchiveError(f"archive member {name!r} would be written outside {dest}")
    target = (dest / pure).resolve()
    if target != dest and dest not in target.parents:
        raise UnsafeArchiveError(f"archive member {name!r} would be written outside {dest}")
    return target


# Errors of reading members while extracting (not of writing them, which may be a full disk).
_MEMBER_READ_ERRORS = (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError)


def safe_extract(archive: str | Path, dest: str | Path, *, members: Iterable[str] | None = None) -> list[Path]:
    """Extract a zip or tar archive (gz, bz2, xz) into ``dest``; the paths of the extracted files.

    Every member is checked before anything is written: absolute paths, ``..`` components, links
    and special files are refused with :class:`UnsafeArchiveError` naming the member. An archive
    that cannot be listed to its end (see :func:`check_archive`) or whose members fail their
    checksums is refused with :class:`CorruptArchiveError` and removed, so a rerun downloads it
    again. ``members`` limits extraction to those names (and, for a name ending in ``/``,
    everything under it).
    """
    archive, dest = Path(archive), Path(dest)
    kind = _archive_kind(archive, archive.name)
    if kind is None:
        raise ValueError(f"{archive} is neither a zip nor a tar archive")
    wanted = None if members is None else tuple(members)

    def chosen(name: str) -> bool:
        return wanted is None or any(name == w or (w.endswith("/") and name.startswith(w)) for w in wanted)

    if kind == "zip":
        try:
            handle = zipfile.ZipFile(archive)
        except _ARCHIVE_ERRORS as err:
            raise _corrupt(archive, err) from err
        with handle:
            try:
                _check_zip(handle, archive)
            except _ARCHIVE_ERRORS as err:
                raise _corrupt(archive, err) from err
            dest.mkdir(parents=True, exist_ok=True)
            dest = dest.resolve()
            plan = []
            for info in handle.infolist():
                if not chosen(info.filename):
                    continue
                target = _member_target(dest, info.filename)
                mode = info.external_attr >> 16
                if mode and (mode & 0o170000) == 0o120000:
                    raise UnsafeArchiveError(f"archive member {info.filename!r} is a symbolic link")
                plan.append((info, target))
            written: list[Path] = []
            for info, target in tqdm(plan, desc=f"extract {archive.name}", unit="file", disable=len(plan) < 100):
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with handle.open(info) as source, open(target, "wb") as out:
                        shutil.copyfileobj(source, out, _CHUNK)
                except _MEMBER_READ_ERRORS as err:
                    target.unlink(missing_ok=True)
                    raise _corrupt(archive, err) from err
                written.append(target)
        return written
    try:
        handle = _open_tar(archive)
    except _ARCHIVE_ERRORS as err:
        raise _corrupt(archive, err) from err
    with handle:
        try:
            infos = [m for m in _tar_members(handle) if chosen(m.name)]
        except _ARCHIVE_ERRORS as err:
            raise _corrupt(archive, err) from err
        dest.mkdir(parents=True, exist_ok=True)
        dest = dest.resolve()
        for info in infos:
            _member_target(dest, info.name)
            if not (info.isfile() or info.isdir()):
                raise UnsafeArchiveError(f"archive member {info.name!r} is a link or special file, not a plain file")
        written = []
        for info in tqdm(infos, desc=f"extract {archive.name}", unit="file", disable=len(infos) < 100):
            target = _member_target(dest, info.name)
            if info.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            source = handle.extractfile(info)
            assert source is not None
            try:
                with source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out, _CHUNK)
            except _MEMBER_READ_ERRORS as err:
                target.unlink(missing_ok=True)
                raise _corrupt(archive, err) from err
            written.append(target)
    return written
