"""Private files and folders for retrieved images (images are PHI: their headers name the patient).

Files are created 0600 with O_EXCL (never through an existing name or link), folders 0700 whatever the
umask. A small local helper until the project's shared one (crypto) exists; same contract.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import BinaryIO

FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dir(path: Path) -> Path:
    """`path` (and missing parents) as a folder only its owner can read; returns it."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    os.chmod(path, DIR_MODE)   # mkdir's mode is filtered by the umask, and an existing folder keeps its own
    return path


def create_private(path: Path) -> BinaryIO:
    """A new file at `path`, 0600, open for binary writing; FileExistsError if anything is already there."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), FILE_MODE)
    return os.fdopen(fd, "wb")


def remove_tree(path: Path) -> None:
    """Remove a folder we made (a staging folder), quietly if it is already gone."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)


def fsync_file(file: BinaryIO) -> None:
    """Flush `file` to disk before it is given its final name."""
    file.flush()
    os.fsync(file.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (POSIX: the directory entry is data of the directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
