"""Keyed operations of ``loyalty.v1.Scenarios`` under identical concurrent retries, over gRPC against a real
``loyalty serve`` (demo members), on SQLite and PostgreSQL: one effect, and every answer the same as the
first; never INTERNAL.

- StartBatch x 20 with one batch_id: one batch, 20 identical answers; after ``loyalty worker --once`` each
  member has exactly one entry of the batch and the balances moved once.
- StartBatch under one batch_id with two different requests at once: one of them is the batch (its callers
  all get its answer), the others are ALREADY_EXISTS.
- CreateScenario x 20 with one definition: one scenario, version 1, 20 identical answers; another definition
  under that id is ALREADY_EXISTS.
- RetryDeadLetter x 10 for one dead message: requeued once.
"""
from __future__ import annotations

import concurrent.futures

import grpc
import pytest
from sqlalchemy import create_engine, func, select

from helpers.scenarios import enroll, outbox
from loyalty.server.models import balances, ledger
from loyalty.server.scenarios.models import batch_members, batches, scenarios
from loyalty.v1 import scenarios_pb2 as S
from loyalty.v1 import scenarios_pb2_grpc
from serverutil import BACKENDS, cli, server_on

CALLS = 20


@pytest.fixture(scope="module", params=BACKENDS)
def server(request, tmp_path_factory):
    with server_on(request.param, tmp_path_factory.mktemp(f"scenario-keys-{request.param}")) as srv:
        yield srv


@pytest.fixture
def stub(server):
    channel = grpc.insecure_channel(server.target)
    yield scenarios_pb2_grpc.ScenariosStub(channel)
    channel.close()


@pytest.fixture
def sql(server):
    engine = create_engine(server.database_url)
    yield engine
    engine.dispose()


def at_once(calls):
    """Run the callables at the same time; each result is the answer or the ``grpc.RpcError``."""
    def one(fn):
        try:
            return fn()
        except grpc.RpcError as exc:
            return exc
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(one, calls))


def errors(results) -> list[str]:
    return [f"{r.code().name}: {r.details()}" for r in results if isinstance(r, grpc.RpcError)]


def test_twenty_identical_concurrent_start_batch_calls_are_one_batch(server, stub, sql):
    with sql.connect() as conn:
        members = conn.execute(select(func.count()).select_from(balances)).scalar_one()
        before = conn.execute(select(func.sum(balances.c.active))).scalar_one()
    request = S.StartBatchRequest(batch_id="spring", kind="award", points=7, reason="spring", all_members=True,
                                  expiry_days=30)
    results = at_once([lambda: stub.StartBatch(request, timeout=60)] * CALLS)
    assert errors(results) == []
    assert all(r == results[0] for r in results)
    assert (results[0].batch_id, results[0].state, results[0].total, results[0].processed) == (
        "spring", "running", members, 0)
    with sql.connect() as conn:
        assert conn.execute(select(func.count()).select_from(batches)).scalar_one() == 1
        assert conn.execute(select(func.count()).where(batch_members.c.batch_id == "spring")).scalar_one() == members
    assert stub.StartBatch(request, timeout=60) == results[0]           # a later retry: the same answer

    done = cli("worker", "--once", "--no-upgrade", "--database-url", server.database_url)
    assert done.returncode == 0, done.stderr
    progress = stub.GetBatchProgress(S.BatchRef(batch_id="spring"))
    assert (progress.state, progress.processed, progress.written, progress.points_moved) == (
        "done", members, members, 7 * members)
    with sql.connect() as conn:
        entries = conn.execute(select(ledger.c.member_id, ledger.c.points)
                               .where(ledger.c.key.like("batch:spring:%"))).all()
        after = conn.execute(select(func.sum(balances.c.active))).scalar_one()
    assert sorted(p for _, p in entries) == [7] * members and len({m for m, _ in entries}) == members
    assert after - before == 7 * members
    check = cli("ledger", "check", "--database-url", server.database_url)
    assert check.returncode == 0, check.stdout + check.stderr


def test_two_different_start_batch_requests_under_one_id_at_once_one_wins_the_others_already_exist(stub, sql):
    five = S.StartBatchRequest(batch_id="gift", kind="award", points=5, reason="gift", members=["7000001", "7000002"])
    six = S.StartBatchRequest(batch_id="gift", kind="award", points=6, reason="gift", members=["7000001", "7000002"])
    requests = [five, six] * (CALLS // 2)
    results = at_once([lambda r=r: stub.StartBatch(r, timeout=60) for r in requests])
    answers = [r for r in results if not isinstance(r, grpc.RpcError)]
    refused = [r for r in results if isinstance(r, grpc.RpcError)]
    assert {r.code() for r in refused} == {grpc.StatusCode.ALREADY_EXISTS}, errors(results)
    assert len(answers) == CALLS // 2 and all(a == answers[0] for a in answers)
    winner = five if answers[0].points == 5 else six
    assert all(isinstance(r, grpc.RpcError) == (q is not winner) for q, r in zip(requests, results))
    with sql.connect() as conn:
        assert conn.execute(select(batches.c.points).where(batches.c.id == "gift")).scalars().all() == [
            winner.points]
        assert conn.execute(select(func.count()).where(batch_members.c.batch_id == "gift")).scalar_one() == 2


WELCOME_LITE = """id: hello
triggers: [member_registered]
steps:
  - id: bonus
    award_points: {points: 10, reason: hello}
"""


def test_twenty_identical_concurrent_create_scenario_calls_are_one_scenario(stub, sql):
    definition = S.ScenarioDefinition(yaml=WELCOME_LITE)
    results = at_once([lambda: stub.CreateScenario(definition, timeout=60)] * CALLS)
    assert errors(results) == []
    assert all(r == results[0] for r in results)
    assert (results[0].id, results[0].version, results[0].steps) == ("hello", 1, 1)
    assert stub.CreateScenario(definition, timeout=60) == results[0]     # a later retry: the same answer
    with sql.connect() as conn:
        assert conn.execute(select(scenarios.c.version).where(scenarios.c.id == "hello")).scalars().all() == [1]
    with pytest.raises(grpc.RpcError) as exc:
        stub.CreateScenario(S.ScenarioDefinition(yaml=WELCOME_LITE.replace("10", "20")), timeout=60)
    assert exc.value.code() == grpc.StatusCode.ALREADY_EXISTS


# ---- RetryDeadLetter: no idempotency key in the request, so one effect is what is pinned --------------------

def test_concurrent_retries_of_one_dead_letter_requeue_it_once(scn, http_sink):
    """Ten RetryDeadLetter calls for one dead webhook at once (in process, both backends): the row is put back
    once (attempts reset once, one more delivery); the other calls find it no longer dead (NOT_FOUND), never
    a database error."""
    from loyalty.server.errors import NotFound
    service, sc, worker = scn
    sc.define({"id": "hook", "triggers": ["member_registered"],
               "steps": [{"id": "call", "webhook": {"url": http_sink.url}}]})
    enroll(service, "7000103")
    http_sink.status = 404
    worker.run_until_idle()
    [dead] = sc.dead_letters()

    def retry(_):
        try:
            return sc.retry_dead_letter("message", dead["id"])
        except NotFound as exc:
            return exc
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(retry, range(10)))
    assert sum(1 for r in results if r == {"kind": "message", "id": dead["id"], "retried": True}) == 1
    assert sum(1 for r in results if isinstance(r, NotFound)) == 9
    http_sink.status = 200
    worker.run_until_idle()
    assert [(r["state"], r["attempts"]) for r in outbox(service.db)] == [("sent", 1)]
    assert len(http_sink.requests) == 2                  # the first (404) and the one retry
