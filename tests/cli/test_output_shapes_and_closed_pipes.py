"""The one JSON shape of every command (numbers as numbers, moments RFC 3339 UTC with ``Z``), and a reader
that stops reading (``loyalty ... | head -1``) ending the command quietly with exit 0."""
from __future__ import annotations

import datetime as dt
import json
import pathlib
import subprocess
import sys

import pytest

from loyalty.cli.output import emit_json, message_dict
from loyalty.v1 import admin_pb2, processing_pb2, receipt_pb2, scenarios_pb2
from serverutil import CLEAN_CLI_ENV, cli, environment

ROOT = pathlib.Path(__file__).resolve().parents[2]
MOSCOW = dt.timezone(dt.timedelta(hours=3))


def printed(obj) -> object:
    import io
    from contextlib import redirect_stdout
    out = io.StringIO()
    with redirect_stdout(out):
        emit_json(obj)
    return json.loads(out.getvalue())


def test_int64_fields_are_numbers_at_every_depth():
    version = admin_pb2.ProgramVersion(version=2**40, program="demo")
    assert message_dict(version)["version"] == 2**40
    response = processing_pb2.CalculateReceiptResponse(answer=receipt_pb2.ReceiptAnswer(
        totals=receipt_pb2.Totals(amount=9_007_199_254_740_993, payable=-5),
        lines=[receipt_pb2.LineResult(sku="a", amount=17980, discounts=[receipt_pb2.Discount(
            promotion="p", amount=3596)])]))
    d = message_dict(response)
    assert d["answer"]["totals"]["amount"] == 9_007_199_254_740_993          # past a double's exact range
    assert d["answer"]["totals"]["payable"] == -5
    assert d["answer"]["lines"][0]["amount"] == 17980
    assert d["answer"]["lines"][0]["discounts"] == [{"promotion": "p", "amount": 3596}]
    stats = message_dict(scenarios_pb2.ScenarioStats(steps=[scenarios_pb2.StepStats(step="s", skipped=3)]))
    assert stats["steps"][0]["skipped"] == 3 and stats["runs_done"] == 0


def test_moments_are_utc_with_z_and_a_receipts_own_time_is_kept():
    out = printed({
        "started_at": dt.datetime(2026, 3, 2, 12, 30, 15, 123456, tzinfo=MOSCOW),
        "stored": dt.datetime(2026, 3, 2, 9, 30),                                  # naive: storage's UTC
        "published_at": "2026-03-02T12:30:00+03:00",
        "at": "2026-03-02T00:30:00+03:00",
        "receipt": {"at": "2026-03-02T12:30:00+03:00"},
        "birth_date": dt.date(1990, 5, 14),
        "registered_at": "",
    })
    assert out == {"started_at": "2026-03-02T09:30:15Z", "stored": "2026-03-02T09:30:00Z",
                   "published_at": "2026-03-02T09:30:00Z", "at": "2026-03-01T21:30:00Z",
                   "receipt": {"at": "2026-03-02T12:30:00+03:00"}, "birth_date": "1990-05-14",
                   "registered_at": ""}


def closed_pipe(*args, env=None) -> subprocess.CompletedProcess:
    """Run ``loyalty ARGS`` with its stdout a pipe whose reader has already gone (``| head`` done reading)."""
    proc = subprocess.Popen([sys.executable, "-c", "from loyalty.cli.main import main; main()", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment(env))
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(args, proc.returncode, "", err.decode())


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory):
    """A SQLite database with the demo program and members (``loyalty demo seed``)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('demo') / 'demo.db'}"
    seeded = cli("demo", "seed", "--database-url", url, env=CLEAN_CLI_ENV)
    assert seeded.returncode == 0, seeded.stderr
    return url


@pytest.mark.parametrize("args", [
    ("calc", "--program", str(ROOT / "server" / "demo" / "program.yaml"), "--receipt",
     str(ROOT / "examples" / "receipt-a.json"), "--pretty"),
    ("segments", "list"),
    ("ledger", "liability", "--json"),
], ids=lambda a: " ".join(a[:2]))
def test_a_closed_pipe_ends_quietly(args, home, demo_url):
    extra = () if args[0] == "calc" else ("--database-url", demo_url)
    result = closed_pipe(*args, *extra, env=home)
    assert (result.returncode, result.stderr) == (0, "")


def test_liability_at_is_utc(home, demo_url):
    report = json.loads(cli("ledger", "liability", "--json", "--database-url", demo_url, env=home).stdout)
    assert report["at"].endswith("Z") and dt.datetime.fromisoformat(report["at"]).tzinfo is not None
    # The demo members' opening balances (server/demo/__init__.py): 1000 + 250 + 400 + 0 + 3000.
    assert report["active_points"] == 4650
