"""Fixtures of the CLI tests: ``home``, the environment of a user whose data dir (``LOYALTY_HOME``) is an empty
temp folder and who names no server or database, so no test sees the machine's own data dir or variables."""
from __future__ import annotations

import pytest

from serverutil import CLEAN_CLI_ENV


@pytest.fixture
def home(tmp_path) -> dict:
    """``{**CLEAN_CLI_ENV, "LOYALTY_HOME": <tmp>/home}``: pass as ``env=`` to ``cli`` / ``pos``."""
    return {**CLEAN_CLI_ENV, "LOYALTY_HOME": str(tmp_path / "home")}
