"""Keyed patient pseudonyms (HMAC-SHA256 with a site key)."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest

from recnec_cli.errors import UsageError
from recnec_cli.pseudonym import KEY_ENV, load_key


def test_key_created_once_private_and_stable(tmp_path):
    path = tmp_path / "cfg" / "pseudonym.key"
    k1 = load_key(path, environ={})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    k2 = load_key(path, environ={})
    assert k1.secret == k2.secret and k1.pseudonym("0089") == k2.pseudonym("0089")
    assert len(k1.pseudonym("0089")) == 16 and k1.pseudonym("") == "" and k1.pseudonym(None) == ""


def test_pseudonym_is_not_the_unsalted_hash_and_depends_on_the_key(tmp_path):
    a = load_key(tmp_path / "a.key", environ={})
    b = load_key(tmp_path / "b.key", environ={})
    pid = "0089"
    unsalted = hashlib.sha256(pid.encode()).hexdigest()
    assert not unsalted.startswith(a.pseudonym(pid))
    assert a.pseudonym(pid) != b.pseudonym(pid)
    # trying every 4-digit record number with the unsalted hash finds nothing
    assert a.pseudonym(pid) not in {hashlib.sha256(f"{i:04d}".encode()).hexdigest()[:16] for i in range(10000)}


def test_key_from_environment_and_bad_keys_refused(tmp_path):
    k = load_key(tmp_path / "unused.key", environ={KEY_ENV: "ab" * 32})
    assert k.source == KEY_ENV and not (tmp_path / "unused.key").exists()
    with pytest.raises(UsageError):
        load_key(None, environ={KEY_ENV: "not-hex"})
    shared = tmp_path / "shared.key"
    shared.write_text("ab" * 32)
    os.chmod(shared, 0o644)
    with pytest.raises(UsageError, match="readable by other users"):
        load_key(shared, environ={})
