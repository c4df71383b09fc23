"""crypto.files: the one private-file helper (issue 13, S11). Modes come out as asked whatever the umask: a
private file 0600 under umask 0, a public one 0644 under umask 0077; an older install's wide modes are
narrowed with a warning that names the path, never what the file holds."""
from __future__ import annotations

import logging
import os
import stat
from contextlib import contextmanager

import pytest

from fhirbridge.crypto import files, keys


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@contextmanager
def umask(value: int):
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def test_an_atomic_write_is_private_under_umask_0_and_public_only_when_asked(tmp_path):
    with umask(0o000):
        files.write_atomic(tmp_path / "record.json", b"{}")
        files.write_atomic(tmp_path / "again.json", b"{}")
        files.write_atomic(tmp_path / "again.json", b"{}")        # replacing keeps it private
    with umask(0o077):
        files.write_atomic(tmp_path / "fhirbridge.toml", b"x = 1\n", mode=files.PUBLIC_FILE)
    assert mode(tmp_path / "record.json") == 0o600 and mode(tmp_path / "again.json") == 0o600
    assert mode(tmp_path / "fhirbridge.toml") == 0o644   # the umask does not narrow what must stay readable
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.json", "fhirbridge.toml", "record.json"]


def test_an_atomic_write_that_must_not_overwrite_refuses_and_keeps_the_file(tmp_path):
    target = tmp_path / "k.json"
    target.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        files.write_atomic(target, b"new", overwrite=False)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["k.json"]


def test_open_private_narrows_a_file_it_truncates_and_never_follows_a_link(tmp_path):
    old = tmp_path / "download.tmp"
    old.write_bytes(b"older version's copy")
    os.chmod(old, 0o644)
    with umask(0o000), files.open_private(old) as f:
        f.write(b"new")
    assert mode(old) == 0o600 and old.read_bytes() == b"new"

    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (tmp_path / "planted").symlink_to(victim)
    with pytest.raises(OSError):
        files.open_private(tmp_path / "planted")
    assert victim.read_bytes() == b"keep"


def test_a_private_dir_makes_every_missing_parent_0700_and_leaves_existing_ones(tmp_path):
    os.chmod(tmp_path, 0o755)
    with umask(0o000):
        made = files.private_dir(tmp_path / "a" / "b" / "c")
        files.private_dir(tmp_path / "a" / "b" / "c")            # already there: fine
    assert made == tmp_path / "a" / "b" / "c" and made.is_dir()
    assert [mode(tmp_path / p) for p in ("a", "a/b", "a/b/c")] == [0o700, 0o700, 0o700]
    assert mode(tmp_path) == 0o755                              # not ours to change


def test_narrowing_an_older_install_warns_with_the_path_only(tmp_path, caplog):
    secret = "Quixotlbrenner 1961-04-12"
    tree = tmp_path / "var"
    (tree / "cases" / "c1").mkdir(parents=True)
    (tree / "cases" / "c1" / "collected.jwe").write_text(secret)
    for p, m in ((tree, 0o755), (tree / "cases", 0o755), (tree / "cases" / "c1", 0o775),
                 (tree / "cases" / "c1" / "collected.jwe", 0o644)):
        os.chmod(p, m)
    outside = tmp_path / "outside.txt"
    outside.write_text("not ours to change")
    os.chmod(outside, 0o644)
    (tree / "link").symlink_to(outside)
    with caplog.at_level(logging.WARNING, logger="fhirbridge.crypto.files"):
        assert files.narrow_tree(tree) == 4
        assert files.narrow_tree(tree) == 0          # nothing left to narrow: no second warning
    assert [mode(p) for p in (tree, tree / "cases", tree / "cases" / "c1")] == [0o700] * 3
    assert mode(tree / "cases" / "c1" / "collected.jwe") == 0o600
    assert mode(outside) == 0o644                               # a link is never followed
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 4 and all("owner only" in m for m in messages)
    assert any(str(tree / "cases" / "c1" / "collected.jwe") in m and "644" in m for m in messages)
    assert not any(secret in m for m in messages)


def test_a_file_that_is_not_ours_is_reported_not_fatal(tmp_path, caplog):
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs.db"
        theirs.write_bytes(b"")
        os.chmod(theirs, 0o644)
        os.chown(theirs, 4242, 4242)
    else:   # a file of root's, readable by all, that we could not narrow anyway
        theirs = next(p for p in ("/etc/passwd", "/etc/group") if os.stat(p).st_mode & 0o044)
    with caplog.at_level(logging.WARNING, logger="fhirbridge.crypto.files"):
        assert files.narrow(theirs, files.PRIVATE_FILE) is False
    assert mode(theirs) == 0o644
    assert any("another user" in r.getMessage() and "chmod 600" in r.getMessage() for r in caplog.records)


def test_key_files_are_written_through_it_under_any_umask(tmp_path):
    jwks = keys.generate_jwks()
    with umask(0o000):
        keys.write_private_jwks(tmp_path / "h.private.jwks.json", jwks)
    with umask(0o077):
        keys.write_public_jwks(tmp_path / "h.public.jwks.json", jwks)
    assert mode(tmp_path / "h.private.jwks.json") == 0o600 and mode(tmp_path / "h.public.jwks.json") == 0o644
    os.chmod(tmp_path / "h.private.jwks.json", 0o644)          # an older copy left readable
    keys.KeyRing.load(tmp_path / "h.private.jwks.json")
    assert mode(tmp_path / "h.private.jwks.json") == 0o600
