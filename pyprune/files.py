"""File helpers every layer uses: writing output files safely (never over an
existing file unless asked, and atomically, so an interrupted write never leaves
half a file behind), reading state files defensively, and hashing a file's bytes."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


class OutputError(OSError):
    """An output file could not be written (full disk, no permission, read-only
    folder); the message is one line naming the path, and nothing of it is left."""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip()
    # torch.save reports a failed write as a RuntimeError from its stream writer
    return text.splitlines()[0] if text else type(exc).__name__


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], force: bool = False) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, then move it into place.
    Any failure to create, write or move it is an :class:`OutputError` naming ``path``,
    and leaves neither ``path`` (as it was, if it existed) nor the temporary file."""
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass --force (force=True) to overwrite it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise OutputError(exc.errno, f"cannot write {path}: {_reason(exc)}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        # mkstemp creates the file 0600; give it the mode a plain open() would have
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, (OSError, RuntimeError)) and not isinstance(exc, OutputError):
            raise OutputError(getattr(exc, "errno", None), f"cannot write {path}: {_reason(exc)}") from None
        raise
    return path


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class UnsafeFileError(ValueError):
    """A state file (cache entry, journal, saved weights) that is not a regular file of
    bounded size: read as if it were absent, or refused, never followed or blocked on."""


def read_regular(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``max_bytes``, opened
    without following a symbolic link and without blocking (a FIFO put in its place
    would hang a plain open); :class:`UnsafeFileError` otherwise. FileNotFoundError
    passes through."""
    with _open_regular(path, max_bytes) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew while being read
        raise UnsafeFileError(f"{path} holds more than the {max_bytes:,} bytes it may")
    return data


def check_regular(path: str | os.PathLike, max_bytes: int) -> None:
    """:func:`read_regular`'s checks, for a file another reader then opens (torch.load)."""
    with _open_regular(path, max_bytes):
        pass


def _open_regular(path: str | os.PathLike, max_bytes: int) -> BinaryIO:
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFileError(f"{path} is a symbolic link, which is not followed") from None
        if exc.errno == errno.ENOENT:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path)) from None
        raise UnsafeFileError(f"{path} cannot be read: {exc.strerror}") from None
    f = os.fdopen(fd, "rb")
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
        f.close()
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeFileError(f"{path} is not a regular file")
        raise UnsafeFileError(f"{path} holds {info.st_size:,} bytes, more than the {max_bytes:,} it may")
    return f


# What a file's contents may unpack to: this many times its own size, and at least
# MIN_UNPACKED_BYTES. Honest files stay far below (torch.save and torch.export store zip
# entries uncompressed; a .ppz decodes to ~10-600x); more is a decompression bomb.
UNPACKED_PER_FILE_BYTE = 1024
MIN_UNPACKED_BYTES = 256 << 20


def zip_bomb_problem(path: str | os.PathLike) -> str | None:
    """Why the zip archive at ``path`` must not be given to torch, which allocates each
    entry at the size its headers declare: they declare more than the bound above (a
    decompression bomb). None for an archive within it, and for a file that is no zip
    (torch reads or refuses those itself)."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (OSError, zipfile.BadZipFile, ValueError, EOFError):
        return None
    size = os.path.getsize(path)
    bound = max(MIN_UNPACKED_BYTES, UNPACKED_PER_FILE_BYTE * size)
    total = sum(i.file_size for i in infos)
    if total <= bound:
        return None
    big = max(infos, key=lambda i: i.file_size)
    return (f"its zip entries unpack to {total:,} bytes, more than the {bound:,} allowed for a {size:,}-byte "
            f"archive (entry {big.filename!r} declares {big.file_size:,} bytes from {big.compress_size:,}); "
            "it is refused unread")
