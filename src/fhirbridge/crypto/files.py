"""Private files: whatever fhirbridge writes that holds patient data or keys is 0600, its folders 0700,
whatever the umask (issue 13, S11).

A mode given to open() or mkdir() is masked by the process umask: it can only come out narrower, never
wider, so `mode=0o600` is safe under umask 0; but a file that already exists keeps its mode when it is
truncated, and `Path.mkdir(parents=True, mode=...)` gives the mode to the last folder only (its parents get
0777 minus the umask). Hence the helpers here: each sets the mode it wants with fchmod/chmod after creating,
which also lets a public file (a config, public keys) stay 0644 under a strict umask such as 0077.

`narrow` is for what an older version (or a wider umask) left behind: at start the data folder, its Case
folders, the SQLite files and the key files are narrowed to owner-only, with a warning naming the path and
the modes (paths and modes only: never what the file holds). A file that is not ours to change is
reported, not fatal: root-owned mounts and shared folders exist, and refusing to start helps nobody.
"""
from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from fhirbridge.errors import ConfigError

log = logging.getLogger(__name__)

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700
PUBLIC_FILE = 0o644   # what operators and peers read: the configuration, public key sets

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def open_private(path: str | os.PathLike, *, exclusive: bool = False) -> BinaryIO:
    """`path` opened for writing (truncated), mode 0600 whatever the umask or the mode it had before.
    Never follows a symlink at `path` (a planted link could otherwise point the write at any file)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NOFOLLOW | _CLOEXEC | (os.O_EXCL if exclusive else 0)
    fd = os.open(path, flags, PRIVATE_FILE)
    try:
        os.fchmod(fd, PRIVATE_FILE)  # O_TRUNC keeps an existing file's mode (an older version's 0644)
        return os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        raise


def write_atomic(path: str | os.PathLike, data: bytes, *, mode: int = PRIVATE_FILE, overwrite: bool = True) -> None:
    """Write `data` to `path` through a temporary file in the same folder, fsync'ed and renamed into place:
    a reader sees the old content or the new, never half. The file has `mode` from its creation (exactly:
    a public file stays readable under umask 0077). overwrite=False refuses an existing `path` with
    FileExistsError, also when it appears while writing."""
    path = os.fspath(path)
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(path)
    directory = os.path.dirname(os.path.abspath(path))
    # A temp name of our own: two writers of the same file never rename each other's half-written copy.
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    # The mode is given to open() itself so a private file is never, even briefly, in a wider-open file.
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | _NOFOLLOW | _CLOEXEC, mode & PRIVATE_FILE)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # the umask may have narrowed it (public files must stay readable)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                # link() fails if `path` appeared since the check above; replace() would clobber it.
                os.link(tmp, path)
            except FileExistsError:
                raise FileExistsError(path) from None
            except OSError:  # filesystem without hard links
                if os.path.lexists(path):
                    raise FileExistsError(path) from None
                os.replace(tmp, path)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def private_dir(path: str | os.PathLike) -> Path:
    """`path` as a folder, made with every missing parent 0700 whatever the umask. Folders that exist are
    left as they are (`narrow` is for those): an operator's /var/lib or a shared mount is not ours to change."""
    p = Path(path)
    missing = []
    for q in (p, *p.parents):
        if q.is_dir():
            break
        missing.append(q)
    for q in reversed(missing):
        try:
            os.mkdir(q, PRIVATE_DIR)
        except FileExistsError:
            if not q.is_dir():
                raise
            continue   # made meanwhile by another process (which makes it private too)
        os.chmod(q, PRIVATE_DIR)
    return p


def narrow(path: str | os.PathLike, mode: int, *, warn: bool = True) -> bool:
    """Take from `path` every permission bit `mode` lacks (0644 -> 0600, 0755 -> 0700), with a warning
    unless warn=False (a copy being made private, or a caller that says it better); True when it changed.
    A path that is missing, a symlink, or not ours is left alone (the last with a warning, whatever `warn`
    says: it stays readable to others until its owner narrows it)."""
    p = os.fspath(path)
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode):
        return False
    current = stat.S_IMODE(st.st_mode)
    if not current & ~mode & 0o777:
        return False
    new = current & mode
    if st.st_uid != os.geteuid():
        log.warning("%s is mode %03o, open to other users, and belongs to another user: ask its owner to run "
                    "chmod %03o %s", p, current, new, p)
        return False
    try:
        os.chmod(p, new)
    except OSError as exc:
        log.warning("%s is mode %03o, open to other users, and could not be narrowed (%s): run chmod %03o %s",
                    p, current, exc.strerror, new, p)
        return False
    if warn:
        log.warning("%s was mode %03o, open to other users; made it %03o (owner only). An older version, or a "
                    "wide umask, left it so", p, current, new)
    return True


def narrow_tree(root: str | os.PathLike, *, warn: bool = True) -> int:
    """`root` and everything under it made owner-only (folders 0700, files 0600); symlinks are not followed.
    Returns how many paths were narrowed."""
    root = Path(root)
    if not root.is_dir():
        return 0
    changed = int(narrow(root, PRIVATE_DIR, warn=warn))
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            changed += narrow(os.path.join(dirpath, name), PRIVATE_DIR, warn=warn)
        for name in filenames:
            changed += narrow(os.path.join(dirpath, name), PRIVATE_FILE, warn=warn)
    return changed


def narrow_files(paths: Iterable[str | os.PathLike]) -> int:
    """Each existing file of `paths` made 0600 (key files, the SQLite database and its companions)."""
    return sum(narrow(p, PRIVATE_FILE) for p in paths)


def fsync_file(file: BinaryIO) -> None:
    """Flush `file` to disk before it is given its final name."""
    file.flush()
    os.fsync(file.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in `path` durable (POSIX: the directory entry is data of the directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | _CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_tree(path: str | os.PathLike) -> None:
    """Remove a folder we made (a staging folder), quietly if it is already gone."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)


def read_config_file(path: str | os.PathLike, what: str) -> bytes:
    """The bytes of a file the configuration names (`what`: "key file", "certificate chain file"), or a
    ConfigError naming the file, never its content."""
    file = os.fspath(path)
    try:
        return Path(file).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} not found", file=file) from None
    except OSError as err:
        raise ConfigError(f"cannot read the {what}: {err.strerror}", file=file) from None
