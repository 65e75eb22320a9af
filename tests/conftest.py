"""Shared fixtures. Real data is read from ``$RECNEC_SHARED_DATA`` (default ``../shared/data``
beside the repository) and tests that need it skip with a clear reason when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("RECNEC_SHARED_DATA", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the real public MRI cases (``.../shared/data``)."""
    d = shared_data_dir()
    if not (d / "real").is_dir():
        pytest.skip(f"real MRI cases not found at {d} (set RECNEC_SHARED_DATA)")
    return d


@pytest.fixture(scope="session")
def real(shared_data: Path) -> Path:
    """``.../shared/data/real``: one folder per case, each with SOURCE.md."""
    return shared_data / "real"


@pytest.fixture(autouse=True, scope="session")
def _site_key_and_settle(tmp_path_factory):
    """Every test session gets its own pseudonym key file (never the user's ~/.config/recnec) and
    scans freshly written test studies at once (``RECNEC_SETTLE_MINUTES=0``); the deferral tests
    set their own settle time. Session-scoped so that module-scoped scan fixtures see it too."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECNEC_PSEUDONYM_KEY_FILE", str(tmp_path_factory.mktemp("key") / "pseudonym.key"))
        mp.setenv("RECNEC_SETTLE_MINUTES", "0")
        yield
