"""Durability on PostgreSQL with real worker processes: workers SIGKILLed at random points during runs and
during a batch, then restarted, leave exactly the ledger, outbox and statistics of an undisturbed run; two
workers on one queue do every step once. Each test prints its random seed."""
from __future__ import annotations

import os
import random
import time
import types

import pytest
from sqlalchemy import func, select

from helpers.scenarios import kill, ledger_rows, outbox, start_worker, stop
from loyalty.server import db, ledger
from loyalty.server.models import balances
from loyalty.server.scenarios import ScenarioService
from loyalty.server.scenarios.models import scenario_outbox, scenario_runs, scenario_step_log
from loyalty.v1 import processing_pb2 as P

pytestmark = pytest.mark.postgres

STEPS = ["a1", "mail", "w", "a2", "hook", "sms"]        # visits 1..6, by hand


def _setup(url, sink, members: int):
    from loyalty.server.processing import ProcessingService
    db.upgrade(url)
    service = ProcessingService.open(url)
    sc = ScenarioService(service.db)
    sc.define({"id": "k", "triggers": ["member_registered"], "steps": [
        {"id": "a1", "award_points": {"points": 100, "expiry_days": 30}},
        {"id": "mail", "send_email": {"subject": "hi", "body": "hi {first_name}", "transactional": True}},
        {"id": "w", "wait": "1s"},
        {"id": "a2", "award_points": {"points": 50, "expiry_days": 30}},
        {"id": "hook", "webhook": {"url": sink.url + "/hook"}},
        {"id": "sms", "send_sms": {"body": "bye", "transactional": True}}]})
    ids = [int(service.enroll_member(P.EnrollMemberRequest(
        card=f"80{i:05d}", source="api", phone=f"+7901{i:07d}",
        profile=P.Profile(first_name="N", email=f"m{i}@example.com"))).member_id) for i in range(members)]
    return service, sc, ids


def _wait(service, timeout: float, expected_runs: int) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with service.db.read() as conn:
            active = conn.execute(select(func.count()).where(scenario_runs.c.state == "active")).scalar_one()
            done = conn.execute(select(func.count()).where(scenario_runs.c.state == "done")).scalar_one()
            pending = conn.execute(select(func.count()).where(scenario_outbox.c.state == "pending")).scalar_one()
        if not active and not pending and done == expected_runs:
            return
        time.sleep(0.2)
    raise AssertionError(f"not finished in {timeout} s: {active} runs active, {pending} messages pending")


def _assert_exactly_once(service, sink, ids):
    with service.db.read() as conn:
        runs = {r.member_id: r for r in conn.execute(select(scenario_runs))}
        log = conn.execute(select(scenario_step_log.c.step, scenario_step_log.c.outcome, func.count())
                           .group_by(scenario_step_log.c.step, scenario_step_log.c.outcome)).all()
    assert sorted(runs) == sorted(ids) and {r.state for r in runs.values()} == {"done"}
    counts = {(step, outcome): n for step, outcome, n in log}
    for step in STEPS:
        assert counts[(step, "entered")] == len(ids) and counts[(step, "completed")] == len(ids), step
    expected_ledger = sorted((f"scenario:{runs[m].id}:{step}:{visit}", m, pts)
                             for m in ids for step, visit, pts in (("a1", 1, 100), ("a2", 4, 50)))
    assert sorted(ledger_rows(service.db)) == expected_ledger
    rows = outbox(service.db)
    assert sorted(r["key"] for r in rows) == sorted(f"scenario:{runs[m].id}:{step}:{visit}" for m in ids
                                                    for step, visit in (("mail", 2), ("hook", 5), ("sms", 6)))
    assert {r["state"] for r in rows} == {"sent"}
    # delivery is at least once: every webhook arrived, a repeat (a kill between send and mark) has the same key
    assert {r["key"] for r in sink.requests} == {r["key"] for r in rows if r["channel"] == "webhook"}
    with service.db.read() as conn:
        assert conn.execute(select(func.sum(balances.c.active))).scalar_one() == 150 * len(ids)
    assert ledger.check(service.db) == []


def test_workers_killed_at_random_points_lose_no_run_and_repeat_no_effect(pg_url, http_sink):
    seed = int(os.environ.get("LOYALTY_TEST_SEED") or random.randrange(10**6))
    print(f"seed {seed}")
    rnd = random.Random(seed)
    service, sc, ids = _setup(pg_url, http_sink, 40)
    try:
        for _ in range(5):
            proc = start_worker(pg_url, "--lease", "1")
            time.sleep(rnd.uniform(0.8, 2.0))
            kill(proc)
        proc = start_worker(pg_url, "--lease", "1")
        try:
            _wait(service, 40, len(ids))
        finally:
            stop(proc)
        _assert_exactly_once(service, http_sink, ids)
    finally:
        service.close()


def test_two_workers_on_one_queue_do_every_step_once(pg_url, http_sink):
    service, sc, ids = _setup(pg_url, http_sink, 60)
    procs = [start_worker(pg_url), start_worker(pg_url)]
    try:
        _wait(service, 40, len(ids))
    finally:
        for p in procs:
            stop(p)
    try:
        _assert_exactly_once(service, http_sink, ids)
        assert len(http_sink.requests) == len(ids)        # no kill: not even a repeated delivery
    finally:
        service.close()


def test_batch_killed_at_random_points_resumes_to_exactly_one_entry_per_member(pg_url):
    from loyalty.server.segments.demo_seed import seed_population
    seed = int(os.environ.get("LOYALTY_TEST_SEED") or random.randrange(10**6))
    print(f"seed {seed}")
    rnd = random.Random(seed)
    db.upgrade(pg_url)
    seed_population(pg_url, members_n=3000, purchases_n=0)
    sc = ScenarioService.open(pg_url)
    service = types.SimpleNamespace(db=sc.db)
    with sc.db.read() as conn:
        before = conn.execute(select(func.sum(balances.c.active))).scalar_one()
    try:
        assert sc.start_batch("promo", "award", 7, reason="promo", expiry_days=60, all_members=True)["total"] == 3000
        for _ in range(3):
            proc = start_worker(pg_url, "--batch-chunk", "100")
            time.sleep(rnd.uniform(1.0, 2.0))
            kill(proc)
        proc = start_worker(pg_url, "--batch-chunk", "100")
        try:
            deadline = time.monotonic() + 40
            while sc.batch_progress("promo")["state"] != "done" and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            stop(proc)
        b = sc.batch_progress("promo")
        assert (b["state"], b["processed"], b["written"], b["points_moved"]) == ("done", 3000, 3000, 21000)
        with sc.db.read() as conn:
            after = conn.execute(select(func.sum(balances.c.active))).scalar_one()
        assert after - before == 3000 * 7
        rows = [r for r in ledger_rows(sc.db) if r[0].startswith("batch:promo:")]
        assert len(rows) == 3000 and len({r[1] for r in rows}) == 3000 and {r[2] for r in rows} == {7}
        assert ledger.check(service.db) == []
    finally:
        sc.close()
