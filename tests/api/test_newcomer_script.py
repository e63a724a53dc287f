"""The newcomer's script (``examples/client_quickstart.py``: enrol, calculate, confirm, refund, list segments
page by page, a failure) runs against a real server, and mypy type-checks it through the typed client's
annotations: clean as written, and a misspelt method, field or argument type is caught."""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

import loyalty.clients
import loyalty.v1
from helpers.storage import IN_CI
from serverutil import start_server

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "examples" / "client_quickstart.py"
TYPOS = '''from loyalty.clients import LoyaltyClient
with LoyaltyClient("127.0.0.1:1") as client:
    client.enrol_member(card="1")
    print(client.get_member(member={"card": "1"}).active_point)
    client.get_program(version="3")
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("newcomer"))
    yield srv
    srv.stop()


def test_the_script_runs_against_a_real_server(server):
    done = subprocess.run([sys.executable, str(SCRIPT), server.target], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    first, segments, expected = done.stdout.splitlines()
    m = re.fullmatch(r"member \d+: pays (?P<pays>\d+), purchase \S+, refunded (?P<refunded>\d+)", first)
    assert m, first
    assert int(m["pays"]) > 0 and m["pays"] == m["refunded"]   # all of a receipt paid in money comes back
    with server.client() as client:
        listed = [s.id for s in client.list_segments(page_size=1000).segments]
    assert segments == "segments: " + (", ".join(listed) or "none")
    assert expected.startswith("as expected: NOT_FOUND")


def _typecheck(tmp_path: pathlib.Path, *files: pathlib.Path) -> subprocess.CompletedProcess:
    """mypy over ``files`` with the installed package visible as ``loyalty`` (an editable install maps the
    folders by an import hook mypy does not follow, so the test lays the two packages out itself)."""
    if not IN_CI:
        pytest.importorskip("mypy", reason="mypy is in the test extra: pip install -e '.[test]'")
    tree = tmp_path / "packages" / "loyalty"
    tree.mkdir(parents=True)
    (tree / "clients").symlink_to(pathlib.Path(loyalty.clients.__file__).parent)
    (tree / "v1").symlink_to(pathlib.Path(loyalty.v1.__file__).parent)
    env = {**os.environ, "MYPYPATH": str(tree.parent)}
    return subprocess.run([sys.executable, "-m", "mypy", "--follow-imports=silent", "--ignore-missing-imports",
                           "--no-incremental", "--cache-dir", os.devnull, *map(str, files)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_mypy_type_checks_the_script_and_catches_typos(tmp_path):
    typos = tmp_path / "typos.py"
    typos.write_text(TYPOS)
    done = _typecheck(tmp_path, SCRIPT, typos)
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    assert not [e for e in errors if SCRIPT.name in e], done.stdout
    assert [e.split(": error: ")[1] for e in errors] == [
        '"LoyaltyClient" has no attribute "enrol_member"  [attr-defined]',
        '"Member" has no attribute "active_point"; maybe "active_points"?  [attr-defined]',
        'Argument "version" to "get_program" of "SyncMethods" has incompatible type "str"; expected "int | None"  '
        '[arg-type]',
    ]
