"""Extraction that stays inside its folder, and integrity of archives read to their end.

An archive (``.zip``, ``.tar``, ``.tar.gz``, ``.tgz``, ``.tar.bz2``, ``.tar.xz``, ...) is readable
to its end (:func:`check_archive`) when a zip's central directory points at every member's local
header, a tar lists every member up to its end-of-archive marker, and a compressed tar's stream
reaches its end marker and checksum. :func:`vlmopt.data.download.download` makes this check on an
archive that no checksum vouches for.

Python's ``tarfile`` and ``zipfile`` extract members with absolute paths, ``..`` components or
links that point elsewhere, so :func:`safe_extract` checks every member before writing any of
them; it also refuses (and removes) an archive that cannot be listed to its end, raising
:class:`CorruptArchiveError`, so a rerun downloads it again.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import shutil
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from vlmopt.data.errors import DownloadError

__all__ = [
    "CorruptArchiveError",
    "UnsafeArchiveError",
    "check_archive",
    "safe_extract",
]

_CHUNK = 1 << 20
_TAR_SUFFIXES = (".tar", ".tgz", ".tar.gz", ".tbz", ".tbz2", ".tar.bz2", ".txz", ".tar.xz")
_ARCHIVE_SUFFIXES = (".zip", *_TAR_SUFFIXES)
_TAR_CODECS = ((b"\x1f\x8b", "r:gz"), (b"BZh", "r:bz2"), (b"\xfd7zXZ\x00", "r:xz"))
# Errors of reading a damaged archive (not of writing its members): zip, tar and their codecs.
_ARCHIVE_ERRORS = (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError)


class CorruptArchiveError(DownloadError):
    """An archive that cannot be read to its end: truncated or damaged (it is removed where noted)."""


class UnsafeArchiveError(ValueError):
    """An archive member that would land outside the extraction folder, or is not a plain file."""


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
