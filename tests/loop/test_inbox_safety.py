"""Whoever can drop files in the inbox must not be able to make fhirbridge write anywhere else: planted
symlinks are never followed, the inbox's own folders are private (0700) whatever the umask, and a symlinked
inbox or subfolder is refused with a clear error."""
from __future__ import annotations

import os
import stat

import pytest

from fhirbridge.errors import ConfigError
from fhirbridge.loop.receive import process_inbox

pytestmark = pytest.mark.sekmet

JUNK = b'{"protected":"garbage"}'


@pytest.fixture
def inbox(hospital):
    path = hospital.app.config.inbox
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim.txt"
    path.write_text("precious\n")
    return path


@pytest.mark.parametrize("planted", [
    ["x.jwe.reason.txt"],                  # the reason file of the refused x.jwe
    ["x.jwe", "x.1.jwe.reason.txt"],       # x.jwe taken (by a link), so the next name's reason file
], ids=["reason", "next-name"])
def test_a_planted_symlink_in_refused_is_not_followed(hospital, inbox, victim, planted):
    refused = inbox / "refused"
    refused.mkdir()
    for name in planted:
        (refused / name).symlink_to(victim)
    (inbox / "x.jwe").write_bytes(JUNK)
    result = process_inbox(hospital.app)
    assert [p.name for p, _ in result.refused] == ["x.jwe"]
    assert victim.read_text() == "precious\n"
    assert all((refused / name).is_symlink() for name in planted)
    files = [p for p in refused.iterdir() if not p.is_symlink()]
    assert [p.read_bytes() for p in files if p.name.endswith(".jwe")] == [JUNK]
    reasons = [p for p in files if p.name.endswith(".txt")]
    assert len(reasons) == 1 and "refused" in reasons[0].read_text()
    assert stat.S_IMODE(reasons[0].stat().st_mode) == 0o600


def test_inbox_folders_are_0700_under_umask_022(hospital, inbox):
    (inbox / "x.jwe").write_bytes(JUNK)
    old = os.umask(0o022)
    try:
        process_inbox(hospital.app)
    finally:
        os.umask(old)
    for name in ("processing", "accepted", "refused"):
        assert stat.S_IMODE((inbox / name).stat().st_mode) == 0o700, name


def test_an_existing_open_folder_is_made_private(hospital, inbox):
    (inbox / "refused").mkdir(mode=0o777)
    os.chmod(inbox / "refused", 0o777)
    process_inbox(hospital.app)
    assert stat.S_IMODE((inbox / "refused").stat().st_mode) == 0o700


def test_a_symlinked_refused_folder_is_refused(hospital, inbox, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (inbox / "refused").symlink_to(elsewhere, target_is_directory=True)
    (inbox / "x.jwe").write_bytes(JUNK)
    with pytest.raises(ConfigError, match=r"refused.*symbolic link"):
        process_inbox(hospital.app)
    assert list(elsewhere.iterdir()) == []
    assert (inbox / "x.jwe").read_bytes() == JUNK    # nothing was claimed


def test_a_symlinked_inbox_is_refused(hospital, tmp_path):
    real = tmp_path / "real-inbox"
    real.mkdir()
    (real / "x.jwe").write_bytes(JUNK)
    hospital.app.config.inbox.parent.mkdir(parents=True, exist_ok=True)
    hospital.app.config.inbox.symlink_to(real, target_is_directory=True)
    with pytest.raises(ConfigError, match="inbox.*symbolic link"):
        process_inbox(hospital.app)
    assert sorted(p.name for p in real.iterdir()) == ["x.jwe"]


def test_a_dropped_symlink_is_refused_unread(hospital, inbox, victim):
    (inbox / "x.jwe").symlink_to(victim)
    result = process_inbox(hospital.app)
    assert len(result.refused) == 1 and "not a regular file" in result.refused[0][1]
    assert victim.read_text() == "precious\n"


@pytest.mark.timeout(60)
def test_a_dropped_fifo_does_not_hang_the_inbox(hospital, inbox):
    os.mkfifo(inbox / "pipe.jwe")
    result = process_inbox(hospital.app)
    assert len(result.refused) == 1 and "not a regular file" in result.refused[0][1]
