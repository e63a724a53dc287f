"""``serve`` on a database with no program says so in one line and how to publish the demo; ``loyalty demo
seed`` publishes it (and the demo members) so a till works; ``worker --once`` prints what it did and no
migration log lines."""
from __future__ import annotations

import json

import pytest

from loyalty.clients import LoyaltyError
from loyalty.server.demo import DEMO_PROGRAM_PATH
from serverutil import cli, fresh_postgres_database, pos, start_server

NO_PROGRAM = "no program is published: POS calls fail until one is; publish the demo with"


@pytest.mark.postgres
def test_serve_on_postgresql_without_a_program_says_how_to_publish_the_demo(tmp_path, home):
    with fresh_postgres_database() as url:
        server = start_server(tmp_path, database_url=url, args=("--no-demo",))
        try:
            printed = server.log_path.with_suffix(".out").read_text().splitlines()
            notices = [line for line in printed if "no program is published" in line]
            assert len(notices) == 1 and notices[0].startswith(NO_PROGRAM)
            assert "`loyalty demo seed --database-url postgresql+psycopg://" in notices[0]
            refused = pos("--json", env={**home, "LOYALTY_SERVER": server.target})
            assert refused.returncode == 1 and len(refused.stderr.splitlines()) == 1

            seeded = cli("demo", "seed", "--database-url", url, "--json", env=home)
            assert seeded.returncode == 0, seeded.stderr
            assert json.loads(seeded.stdout)["program_version"] == 1
            sold = pos("--json", "--return-line", "-1", env={**home, "LOYALTY_SERVER": server.target})
            assert sold.returncode == 0, sold.stderr
            assert json.loads(sold.stdout)["purchase"]["answer"]["member"]["card"] == "7000001"
        finally:
            server.stop()


def test_serve_with_the_demo_says_nothing_about_a_missing_program(tmp_path):
    server = start_server(tmp_path)
    try:
        printed = server.log_path.with_suffix(".out").read_text()
        assert "no program is published" not in printed
        assert printed.startswith("demo: program published as version 1, 5 member(s) created")
    finally:
        server.stop()


def test_a_restart_keeps_the_live_program_and_seeds_nothing(tmp_path):
    """``loyalty serve`` seeds the demo on a new embedded database only: restarted after the operator published
    a program of their own, it keeps that program live and creates no member (an erased demo card stays so)."""
    data = tmp_path / "data"
    first = start_server(tmp_path, demo=None, data_dir=data)
    try:
        assert first.log_path.with_suffix(".out").read_text().startswith("demo: program published as version 1")
        with first.client() as client:
            own = DEMO_PROGRAM_PATH.read_text().replace("program: demo", "program: ours", 1)
            assert client.publish_program({"yaml": own, "comment": "ours"}).version == 2
            client.erase_member({"card": "7000001", "reason": "GDPR request #46"})
    finally:
        assert first.stop() == 0
    again = start_server(tmp_path, demo=None, data_dir=data)
    try:
        assert "demo:" not in again.log_path.with_suffix(".out").read_text()
        with again.client() as client:
            assert client.get_program(version=0).version == 2
            with pytest.raises(LoyaltyError) as err:
                client.get_member({"member": {"card": "7000001"}})
            assert err.value.code.name == "NOT_FOUND"
    finally:
        assert again.stop() == 0
    # asked for explicitly, the demo still never replaces the live program
    seeded = cli("demo", "seed", "--database-url", f"sqlite:///{data / 'loyalty.db'}")
    assert seeded.returncode == 0, seeded.stderr
    assert "program not published (version 2, another program, is live)" in seeded.stdout


def test_worker_once_prints_what_it_did_and_no_migration_lines(tmp_path, home):
    url = f"sqlite:///{tmp_path / 'w.db'}"
    first = cli("worker", "--once", "--database-url", url, env=home)        # creates and migrates, quietly
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [
        "worker: idle after 1 tick(s); runs created 0, steps 0, deliveries 0, batch chunks 0"]
    assert first.stderr == ""

    assert cli("demo", "seed", "--database-url", url, env=home).returncode == 0
    started = cli("batch", "award", "--id", "b1", "--points", "7", "--reason", "test", "--members",
                  "7000001,7000002", "--no-wait", "--database-url", url, "--json", env=home)
    assert json.loads(started.stdout)["state"] == "running"
    done = cli("worker", "--once", "--json", "--database-url", url, env=home)
    assert done.returncode == 0 and done.stderr == ""
    report = json.loads(done.stdout)
    assert report["batch_chunks"] >= 1 and report["ticks"] == report["batch_chunks"] + 1   # then an idle tick
    status = json.loads(cli("batch", "status", "b1", "--json", "--database-url", url, env=home).stdout)
    assert (status["state"], status["processed"], status["points_moved"]) == ("done", 2, 14)
