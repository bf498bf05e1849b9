"""Resumable, verified downloads and archive extraction that stays inside its folder.

Snakemake can check a finished file's checksum (``ensure(..., sha256=...)``) and fetch plain HTTP
inputs through a storage plugin, but neither resumes an interrupted transfer: a multi-gigabyte
COCO or GQA archive cut off at 90 % would start again from zero. :func:`download` therefore keeps
the partial file (``<name>.part``), continues it with an HTTP ``Range`` request, retries with
back-off, and renames it to its final name only after its checksum matched, so a file under the
final name is always complete. Python's ``tarfile`` and ``zipfile`` extract members with absolute
paths, ``..`` components or links that point elsewhere, so :func:`safe_extract` checks every
member before writing any of them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterable
from http.client import HTTPException
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

__all__ = ["ChecksumError", "DownloadError", "UnsafeArchiveError", "download", "file_digest", "safe_extract"]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


class DownloadError(OSError):
    """A download that failed after every retry; the partial file stays for the next attempt."""


class ChecksumError(DownloadError):
    """A downloaded file whose checksum differs from the published one (the file is removed)."""


class UnsafeArchiveError(ValueError):
    """An archive member that would land outside the extraction folder, or is not a plain file."""


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


def download(
    url: str,
    dest: str | Path,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    retries: int = 5,
    timeout: float = 60.0,
    backoff: float = 2.0,
    progress: bool = True,
) -> Path:
    """Fetch ``url`` to ``dest``: resumed from ``dest.part``, retried, verified, then renamed.

    A ``dest`` that already exists is trusted when it matches the checksum (or none is given) and
    downloaded again otherwise. Raises :class:`ChecksumError` for a complete file with the wrong
    checksum (removed) and :class:`DownloadError` when every attempt failed (the partial file is
    kept, so the next call resumes it).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        try:
            _check(dest, url, sha256, md5)
            return dest
        except ChecksumError:
            log.warning("%s does not match its checksum; downloading it again", dest)
    part = dest.with_name(dest.name + ".part")
    last_error: Exception | None = None
    for attempt in range(retries + 1):
        if attempt:
            wait = backoff * 2 ** (attempt - 1)
            log.warning("%s: attempt %d failed (%s); retrying in %.1f s", url, attempt, last_error, wait)
            time.sleep(wait)
        try:
            if _fetch(url, part, timeout=timeout, progress=progress):
                break
        except (urllib.error.URLError, HTTPException, TimeoutError, ConnectionError) as err:
            if isinstance(err, urllib.error.HTTPError) and 400 <= err.code < 500 and err.code != 416:
                raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from err
            last_error = err
    else:
        raise DownloadError(
            f"{url}: download failed after {retries + 1} attempts ({last_error}); "
            f"{part.stat().st_size if part.exists() else 0} bytes kept in {part} for the next attempt"
        )
    _check(part, url, sha256, md5)
    os.replace(part, dest)
    return dest


def _fetch(url: str, part: Path, *, timeout: float, progress: bool) -> bool:
    """One attempt: continue ``part`` from its size; True once the server has sent everything."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "vlmopt"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # Nothing left to send: the partial file is complete.
            return True
        raise
    with response:
        resumed = response.status == 206
        if offset and not resumed:
            log.warning("%s: the server ignored the resume request; starting over", url)
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        with (
            open(part, "ab" if resumed else "wb") as handle,
            tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, desc=Path(url).name, disable=not progress
            ) as bar,
        ):
            received = offset
            while chunk := response.read(_CHUNK):
                handle.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received < total:
        raise ConnectionError(f"connection closed after {received} of {total} bytes")
    return True


def _member_target(dest: Path, name: str) -> Path:
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or (pure.parts and ":" in pure.parts[0]):
        raise UnsafeArchiveError(f"archive member {name!r} would be written outside {dest}")
    target = (dest / pure).resolve()
    if target != dest and dest not in target.parents:
        raise UnsafeArchiveError(f"archive member {name!r} would be written outside {dest}")
    return target


def safe_extract(archive: str | Path, dest: str | Path, *, members: Iterable[str] | None = None) -> list[Path]:
    """Extract a zip or tar archive (gz, bz2, xz) into ``dest``; the paths of the extracted files.

    Every member is checked before anything is written: absolute paths, ``..`` components, links
    and special files are refused with :class:`UnsafeArchiveError` naming the member. ``members``
    limits extraction to those names (and, for a name ending in ``/``, everything under it).
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    dest = dest.resolve()
    wanted = None if members is None else tuple(members)

    def chosen(name: str) -> bool:
        return wanted is None or any(name == w or (w.endswith("/") and name.startswith(w)) for w in wanted)

    written: list[Path] = []
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as handle:
            infos = [i for i in handle.infolist() if chosen(i.filename)]
            plan = []
            for info in infos:
                target = _member_target(dest, info.filename)
                mode = info.external_attr >> 16
                if mode and (mode & 0o170000) == 0o120000:
                    raise UnsafeArchiveError(f"archive member {info.filename!r} is a symbolic link")
                plan.append((info, target))
            for info, target in tqdm(plan, desc=f"extract {archive.name}", unit="file", disable=len(plan) < 100):
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with handle.open(info) as source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out, _CHUNK)
                written.append(target)
        return written
    if not tarfile.is_tarfile(archive):
        raise ValueError(f"{archive} is neither a zip nor a tar archive")
    with tarfile.open(archive) as handle:
        infos = [m for m in handle.getmembers() if chosen(m.name)]
        for info in infos:
            _member_target(dest, info.name)
            if not (info.isfile() or info.isdir()):
                raise UnsafeArchiveError(f"archive member {info.name!r} is a link or special file, not a plain file")
        for info in tqdm(infos, desc=f"extract {archive.name}", unit="file", disable=len(infos) < 100):
            target = _member_target(dest, info.name)
            if info.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            source = handle.extractfile(info)
            assert source is not None
            with source, open(target, "wb") as out:
                shutil.copyfileobj(source, out, _CHUNK)
            written.append(target)
    return written
