"""Output files that are whole or absent: written under a temporary name beside the target, then renamed.

A full disk, a read-only folder or a kill while a checkpoint, the selected model or a prediction is being written
must not leave a truncated file under the real name, nor destroy the previous version: ``os.replace`` is atomic on
one file system, so readers see either the old file or the new one. Failures end in :class:`OutputWriteError`,
which names the file, says whether the previous version was kept and what to do.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

# What writers raise on a failed write: OSError from Python and PIL, RuntimeError from torch.save ("file write
# failed"), SafetensorError (an Exception subclass, by name: safetensors need not be importable here).
_WRITE_FAILURES = (OSError, RuntimeError)
_HINTS = {
    errno.ENOSPC: "the disk is full: free some space",
    errno.EDQUOT: "the disk quota is exhausted: free some space",
    errno.EFBIG: "the file is larger than this system allows",
    errno.EROFS: "the file system is read-only: choose a writable folder",
    errno.EACCES: "the folder is not writable: check its permissions or choose another folder",
    errno.EPERM: "the folder is not writable: check its permissions or choose another folder",
}


class OutputWriteError(OSError):
    """A result could not be written; the message names the file and whether its previous version is intact.
    ``errno`` and ``filename`` are those of the failure (an ``OSError`` would otherwise print them instead)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def is_write_failure(error: BaseException) -> bool:
    return isinstance(error, _WRITE_FAILURES) or type(error).__name__ == "SafetensorError"


def _reason(error: BaseException) -> str:
    code = getattr(error, "errno", None)
    text = getattr(error, "strerror", None) or str(error) or type(error).__name__
    if code is None:  # torch and safetensors wrap the OS error in their message
        for number, hint in _HINTS.items():
            if os.strerror(number).lower() in str(error).lower() or f"os error {number})" in str(error):
                return f"{text} ({hint})"
        return text
    return f"{text} ({_HINTS[code]})" if code in _HINTS else text


def write_error(path: Path, error: BaseException, kept: bool | str) -> OutputWriteError:
    """The package's error for a failed write of ``path``; ``kept``: a previous version exists and is untouched (or
    what was kept, in words)."""
    if isinstance(kept, str):
        state = kept
    else:
        state = "its previous version is kept unchanged" if kept else "nothing was left under that name"
    result = OutputWriteError(f"Cannot write {path}: {_reason(error)}; {state}")
    result.errno = getattr(error, "errno", None)
    result.filename = str(path)
    return result


def _temporary_name(path: Path) -> Path:
    # Hidden, beside the target (same file system, so the rename is atomic), unique per writer.
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    return Path(name)


def _remove(path: Path) -> None:
    """Best effort: a leftover that cannot be removed (read-only folder) must not hide the error being reported."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        try:
            path.unlink()
        except OSError:
            pass


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``path`` to write; it becomes ``path`` when the block succeeds and is removed
    when it fails. Write failures (and a folder that cannot be created) raise :class:`OutputWriteError`."""
    path = Path(path)
    kept = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = _temporary_name(path)
    except OSError as error:
        raise write_error(path, error, kept) from error
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException as error:
        _remove(temporary)
        if is_write_failure(error) and not isinstance(error, OutputWriteError):
            raise write_error(path, error, kept) from error
        raise


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """``Path.write_text``, whole or not at all."""
    with atomic_file(path) as temporary:
        temporary.write_text(text, encoding=encoding, newline="")  # as given: CSV rows carry their own \r\n
    return Path(path)


def append_whole(handle: BinaryIO, data: bytes, path: Path, kept: str) -> None:
    """Appends ``data`` to an unbuffered binary ``handle`` (a file opened with ``buffering=0``) whole or not at all:
    after a failed write the file is cut back to its length before, so it never ends in a partial record."""
    start = handle.tell()
    try:
        view = memoryview(data)
        while view:
            view = view[handle.write(view) :]
    except OSError as error:
        try:
            handle.truncate(start)
            handle.seek(start)
        except OSError:
            pass  # nothing more can be done; the error below names the file
        raise write_error(path, error, kept) from error


def save_image(image: Any, path: str | os.PathLike, **options: Any) -> Path:
    """``PIL.Image.save`` to ``path`` (format from its extension), whole or not at all."""
    path = Path(path)
    with atomic_file(path) as temporary:
        image.save(temporary, format=_pil_format(path), **options)
    return path


def _pil_format(path: Path) -> str:
    from PIL import Image

    Image.init()
    try:
        return Image.EXTENSION[path.suffix.lower()]
    except KeyError as error:
        raise ValueError(f"{path}: unknown image extension {path.suffix!r}") from error


def replace_folder(final: str | os.PathLike, write: Callable[[Path], Any], staging: Path | None = None) -> Path:
    """Runs ``write(staging)`` into a fresh staging folder, then swaps it in for ``final`` (:func:`swap_in`).

    A failure removes the staging folder, keeps ``final`` as it was and raises :class:`OutputWriteError` for write
    failures (full disk, read-only folder), the original error otherwise.
    """
    final = Path(final)
    staging = staging or final.with_name(f".{final.name}.partial")
    try:
        _remove(staging)
        staging.mkdir(parents=True)
        write(staging)
    except BaseException as error:
        _remove(staging)
        if is_write_failure(error) and not isinstance(error, OutputWriteError):
            raise write_error(final, error, final.is_dir()) from error
        raise
    return swap_in(staging, final)


def swap_in(staging: Path, final: Path) -> Path:
    """Replaces the folder ``final`` by the complete folder ``staging``.

    The previous ``final`` is renamed aside before the new one is renamed in and deleted only afterwards, so at every
    moment one whole version exists (a kill between the two renames leaves the previous one as
    ``.<name>.previous``); an old version is never deleted before the new one is in place.
    """
    kept = final.is_dir()
    previous = final.with_name(f".{final.name}.previous")
    try:
        _remove(previous)
        if kept:
            os.replace(final, previous)
        os.replace(staging, final)
    except OSError as error:
        if kept and not final.exists() and previous.exists():
            os.replace(previous, final)
        _remove(staging)
        raise write_error(final, error, kept) from error
    _remove(previous)
    return final
