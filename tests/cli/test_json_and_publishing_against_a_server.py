"""Through a real ``loyalty serve`` (SQLite and PostgreSQL): ``--json`` prints numbers as numbers and every
moment as RFC 3339 UTC with ``Z``; ``loyalty-pos`` takes its server from ``LOYALTY_SERVER``; publishing a
file identical to the live version (line endings and trailing spaces aside) stores no version and says so,
while a changed comment is a new version; ``publish --json`` is the version record."""
from __future__ import annotations

import hashlib
import json
import pathlib
import re

import pytest

from serverutil import BACKENDS, cli, pos, server_on

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEMO = ROOT / "server" / "demo" / "program.yaml"
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


@pytest.fixture(scope="module", params=BACKENDS)
def server(request, tmp_path_factory):
    with server_on(request.param, tmp_path_factory.mktemp(f"cli-{request.param}")) as srv:
        yield srv


def run_json(*args, env=None):
    result = cli(*args, "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_member_json_has_numbers_and_utc_times(server, home):
    m = run_json("member", "get", "7000001", "--server", server.target, env=home)
    # The demo's Anna: a 1000-point opening balance (server/demo), Basic, 20000.00 to Silver.
    assert (m["active_points"], m["pending_points"], m["purchases_sum"]) == (1000, 0, 0)
    assert m["to_next_tier"] == 2_000_000 and isinstance(m["next_expiry_points"], int)
    assert RFC3339_UTC.match(m["registered_at"]) and RFC3339_UTC.match(m["next_expiry_at"])


def test_member_adjust_json_numbers(server, home):
    out = run_json("member", "adjust", "7000002", "--kind", "credit", "--points", "250", "--reason", "test",
                   "--operation-id", "cli-json-1", "--server", server.target, env=home)
    again = run_json("member", "adjust", "7000002", "--kind", "credit", "--points", "250", "--reason", "test",
                     "--operation-id", "cli-json-1", "--server", server.target, env=home)
    assert again["replayed"] is True and again["active_points"] == out["active_points"]
    assert isinstance(out["active_points"], int) and isinstance(out["pending_points"], int)


def test_loyalty_pos_honours_loyalty_server_and_prints_numbers(server, home):
    result = pos("--card", "", "--number", "cli-pos-1", "--at", "2026-03-02T12:30:00+03:00", "--return-line", "-1",
                 "--json",
                 env={**home, "LOYALTY_SERVER": server.target})
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    t = out["purchase"]["answer"]["totals"]
    # SPEC 4's goods and a loaf: 2 x 89.90 + 450.00 + 899.00 + 54.90 = 1583.70
    assert t["amount"] == 158_370 and isinstance(t["payable"], int)
    assert out["scans"][-1]["payable"] == t["payable"] and out["refund"] is None
    assert [s["sku"] for s in out["scans"]] == ["milk-1l", "cheese-200", "coffee-beans-1kg", "bread-white"]
    assert out["receipt"]["at"] == "2026-03-02T12:30:00+03:00"          # the till's local time, as given
    assert out["member"] is None                                          # an anonymous receipt


def test_loyalty_pos_without_a_server_is_one_line(home):
    result = pos("--timeout", "0.5", env={**home, "LOYALTY_SERVER": "127.0.0.1:1"})
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: UNAVAILABLE")


def test_publishing_the_live_program_again_stores_nothing(server, home, tmp_path):
    before = run_json("program", "versions", "--server", server.target, env=home)["versions"]
    live = before[0]
    same = cli("program", "publish", str(DEMO), "--server", server.target, env=home)
    assert same.returncode == 0, same.stderr
    assert same.stdout.strip() == (f"{DEMO} is identical to the live version {live['version']} of demo: "
                                   f"nothing published")
    # The same text saved on Windows with stray spaces at line ends is the same file.
    resaved = tmp_path / "demo.yaml"
    resaved.write_bytes(DEMO.read_text().replace("\n", "  \r\n").encode() + b"\r\n\r\n")
    record = run_json("program", "publish", str(resaved), "--server", server.target, env=home)
    assert record == {**{k: v for k, v in live.items() if k != "yaml"}, "unchanged": True}
    assert run_json("program", "versions", "--server", server.target, env=home)["versions"] == before


@pytest.mark.parametrize("change", [
    lambda text: text.replace("percent_off: 20", "percent_off: 15"),
    lambda text: "# reviewed by finance\n" + text,                     # a comment is kept, so it is a change
], ids=["a promotion", "a comment"])
def test_publish_json_is_the_new_version_record(server, home, tmp_path, change):
    run_json("program", "publish", str(DEMO), "--server", server.target, env=home)      # the demo is live
    changed = tmp_path / "changed.yaml"
    changed.write_text(change(DEMO.read_text()))
    assert changed.read_text() != DEMO.read_text()
    before = run_json("program", "versions", "--server", server.target, env=home)["versions"]
    assert before[0]["checksum"] == hashlib.sha256(DEMO.read_bytes()).hexdigest()
    record = run_json("program", "publish", str(changed), "--comment", "15%", "--server", server.target, env=home)
    assert "yaml" not in record
    assert record["version"] == before[0]["version"] + 1 and isinstance(record["version"], int)
    assert (record["program"], record["comment"], record["current"], record["unchanged"]) == (
        "demo", "15%", True, False)
    assert RFC3339_UTC.match(record["published_at"])
    assert record["checksum"] == hashlib.sha256(changed.read_bytes()).hexdigest()
    shown = run_json("program", "show", "--server", server.target, env=home)
    assert shown["yaml"] == changed.read_text() and shown["version"] == record["version"]


def test_tables_print_the_same_utc_times_as_json(server, home):
    versions = run_json("program", "versions", "--server", server.target, env=home)["versions"]
    table = cli("program", "versions", "--server", server.target, env={**home, "COLUMNS": "200"})
    assert table.returncode == 0, table.stderr
    assert all(v["published_at"] in table.stdout for v in versions)
    member = run_json("member", "get", "7000005", "--server", server.target, env=home)
    shown = cli("member", "get", "7000005", "--server", server.target, env={**home, "COLUMNS": "200"}).stdout
    assert member["registered_at"] in shown and f"on {member['next_expiry_at']}" in shown
