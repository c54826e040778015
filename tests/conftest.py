"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The real data (``shared/data`` beside the repo, or ``$IWAE_SHARED_DATA``).

    Skips the test if it is absent, unless ``IWAE_REQUIRE_DATA=1``, which makes it fail.
    """
    path = Path(
        os.environ.get("IWAE_SHARED_DATA")
        or Path(__file__).resolve().parents[1].parent / "shared" / "data"
    )
    if (path / "mnist").is_dir() and (path / "omniglot").is_dir():
        return path
    reason = f"real data not found in {path} (expected mnist/ and omniglot/; set IWAE_SHARED_DATA)"
    if os.environ.get("IWAE_REQUIRE_DATA") == "1":
        pytest.fail(reason + " and IWAE_REQUIRE_DATA=1")
    pytest.skip(reason)
