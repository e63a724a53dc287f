"""Group commit against confirms one at a time, on generated workloads (PostgreSQL).

Two databases get the same requests: one service batches them (``_confirm_batch``: one transaction, every
row of the batch in one statement, ``_BatchWrite``), the other confirms each alone (``_confirm_tx_pg``) in the
order a batch processes them (receipt key, then arrival). Every answer and every row must come out the same:
balances, lots (what each holds and when it activates and expires), ledger entries, purchase lines, promotion
usage, budgets and events, compared by purchase key and card (row ids come from sequences and differ). The
members are few, so one batch often holds several confirms of one member: redemptions after redemptions,
limited promotions used twice, upgrades. With ``activation_days: 0`` accrued points are active at once and a
later confirm of the batch may write them off (``_BatchWrite.exact`` False: one statement per confirm).
"""
from __future__ import annotations

import datetime as dt
import os
import random

import pytest
from sqlalchemy import select

from helpers.purchases import together
from helpers.storage import DEMO_PROGRAM, create_database, drop_database
from loyalty.server import db, ledger, processing
from loyalty.server.errors import ServiceError
from loyalty.server.models import (balances, cards, events, ledger as ledger_rows, point_lots, promotion_budgets,
                                   promotion_usage, purchase_lines, purchases)
from loyalty.server.processing import ProcessingService
from loyalty.v1 import admin_pb2
from loyalty.v1 import processing_pb2 as P
from loyalty.v1 import receipt_pb2 as R

CARDS = ["7400001", "7400002", "7400003", "7400004"]
GOODS = [("milk-1l", "dairy", 8990), ("coffee-beans-1kg", "coffee", 89900), ("bread-white", "bread", 5490),
         ("cheese-200", "dairy", 45000), ("apple-gala", "fruit", 18900)]
AT = "2026-03-02T12:30:00+03:00"
MSK = dt.timezone(dt.timedelta(hours=3))
ROUNDS = int(os.environ.get("LOYALTY_BATCH_DIFF_ROUNDS", "8"))


@pytest.fixture
def pg_url_alone():
    """A second migrated database (a copy of the template, as ``pg_url``) for the confirms one at a time."""
    url = create_database(migrated=True)
    try:
        yield url
    finally:
        drop_database(url)


def _services(batched_url, alone_url, clock, monkeypatch, program):
    out = []
    for url, batch in ((batched_url, "16"), (alone_url, "0")):
        monkeypatch.setenv("LOYALTY_CONFIRM_BATCH", batch)
        monkeypatch.setenv("LOYALTY_CONFIRM_BATCH_WINDOW_MS", "500")
        monkeypatch.setenv("LOYALTY_CONFIRM_BATCH_THREADS", "1")
        db.upgrade(url)
        svc = ProcessingService.open(url, clock=clock)
        if svc._batcher is not None:
            svc._batcher.idle_wait = True   # requests a moment apart from idle share a batch
        svc.publish_program(admin_pb2.PublishProgramRequest(yaml=program, comment="tests"))
        for i, card in enumerate(CARDS):
            svc.enroll_member(P.EnrollMemberRequest(card=card, source="pos"))
            svc.adjust_points(P.AdjustPointsRequest(member=R.MemberRef(card=card), kind="credit",
                                                    points=300 * (i + 1), reason="opening",
                                                    operation_id=f"open:{card}"))
        out.append(svc)
    assert out[0]._batcher is not None and out[1]._batcher is None
    return out


def _receipt(rng, number, at=AT):
    lines = []
    for _ in range(rng.randint(1, 4)):
        sku, category, price = rng.choice(GOODS)
        lines.append(R.Line(sku=sku, categories=[category], quantity=rng.choice((1000, 2000, 1500)), price=price))
    coupons = ["WELCOME"] if rng.random() < 0.2 else []
    return R.Receipt(store="msk-01", terminal=f"pos-{rng.randint(1, 2)}", number=number, at=at, lines=lines,
                     coupons=coupons, redeem_points=rng.choice((0, 0, 50, 120, 400)))


def _requests(rng, round_no, earlier, at=AT):
    """A round's requests, printed at ``at`` (the simulated clock's local time: their points wait out the
    return window, SPEC 6)."""
    out = []
    for k in range(rng.randint(6, 14)):
        roll = rng.random()
        if earlier and roll < 0.1:                          # a retry of an earlier request: replayed
            out.append(rng.choice(earlier))
            continue
        card = rng.choice(CARDS + CARDS + ["", "7499999"])  # mostly members; anonymous; an unknown card
        req = P.ConfirmPurchaseRequest(receipt=_receipt(rng, f"r{round_no}-{k}", at))
        if card:
            req.member.card = card
        if earlier and roll < 0.15:                         # an earlier key with another payload: AlreadyExists
            req.receipt.store, req.receipt.terminal, req.receipt.number = (
                rng.choice(earlier).receipt.store, "pos-1", f"r{round_no - 1}-0")
        out.append(req)
    return out


def _outcome(x):
    if isinstance(x, ServiceError):
        return type(x).__name__, x.details.get("available_points")
    if isinstance(x, Exception):
        raise x
    return "ok", x.replayed, x.answer.SerializeToString(deterministic=True)


def _state(svc):
    """Everything a confirm writes, keyed by card and purchase key instead of row ids."""
    with svc.db.read() as conn:
        card_of = {m: c for m, c in conn.execute(select(cards.c.member_id, cards.c.number))}
        key_of = {r.id: (r.store, r.terminal, r.number) for r in conn.execute(select(purchases))}
        entry_key = {r.id: (r.key.split(":")[-1], key_of.get(r.purchase_id), r.kind)
                     for r in conn.execute(select(ledger_rows))}
        state = {
            "balances": sorted((card_of[r.member_id], r.active, r.pending, r.purchases_sum, r.tier)
                               for r in conn.execute(select(balances))),
            "lots": sorted((card_of[r.member_id], r.points, r.remaining, r.state, str(r.activates_at),
                            str(r.expires_at), key_of.get(r.purchase_id, ()), entry_key.get(r.entry_id, ()))
                           for r in conn.execute(select(point_lots))),
            "ledger": sorted((card_of[r.member_id], r.kind, r.points, r.active_delta, r.pending_delta,
                              key_of.get(r.purchase_id, ()), str(r.created_at))
                             for r in conn.execute(select(ledger_rows))),
            "purchases": sorted((k, card_of.get(r.member_id), r.card, r.request_hash, r.amount, r.discount,
                                 r.payable, r.redeemed_points, r.redeemed_amount, r.accrued_points, r.status,
                                 str(r.created_at), repr(r.answer))
                                for r in conn.execute(select(purchases)) for k in [key_of[r.id]]),
            "lines": sorted((key_of[r.purchase_id], r.line, r.sku, r.quantity, r.amount, r.payable, r.redeemed,
                             r.points) for r in conn.execute(select(purchase_lines))),
            "usage": sorted((card_of[r.member_id], r.promotion, r.period_key, r.uses)
                            for r in conn.execute(select(promotion_usage))),
            "budgets": sorted(tuple(r) for r in conn.execute(select(promotion_budgets))),
            "events": sorted((r.kind, card_of.get(r.member_id, ""), str(r.created_at),
                              repr({k: v for k, v in sorted(r.payload.items()) if k != "purchase_id"}))
                             for r in conn.execute(select(events))),
        }
    return state


@pytest.mark.postgres
@pytest.mark.parametrize("activation", ["pending", "active at once"])
def test_batches_write_what_confirms_one_at_a_time_write(pg_url, pg_url_alone, clock, monkeypatch, activation):
    program = DEMO_PROGRAM
    if activation == "active at once":
        program = DEMO_PROGRAM.replace("activation_days: 14", "activation_days: 0", 1)
        assert program != DEMO_PROGRAM
    seed = int(os.environ.get("LOYALTY_BATCH_DIFF_SEED", random.randrange(1 << 30)))
    print(f"LOYALTY_BATCH_DIFF_SEED={seed}")
    rng = random.Random(seed)
    batched, alone = _services(pg_url, pg_url_alone, clock, monkeypatch, program)
    exact_seen = []
    send = processing._BatchWrite.send

    def spy(self, dconn):
        exact_seen.append(self.exact)
        return send(self, dconn)

    monkeypatch.setattr(processing._BatchWrite, "send", spy)
    try:
        earlier: list = []
        shared = 0
        for round_no in range(ROUNDS):
            requests = _requests(rng, round_no, earlier, clock().astimezone(MSK).isoformat())
            before = batched._batcher.batches
            got = together(batched, requests, gap=0.005)
            assert batched._batcher.batches - before == 1, "the round did not land in one batch"
            order = sorted(range(len(requests)), key=lambda i: (requests[i].receipt.store,
                                                                 requests[i].receipt.terminal,
                                                                 requests[i].receipt.number, i))
            want = [None] * len(requests)
            for i in order:
                try:
                    want[i] = alone.confirm_purchase(requests[i])
                except ServiceError as exc:
                    want[i] = exc
            for i, (g, w) in enumerate(zip(got, want)):
                assert _outcome(g) == _outcome(w), f"round {round_no} request {i} (seed {seed})"
            cards_in = [r.member.card for r in requests if r.member.card in CARDS]
            shared += len(cards_in) - len(set(cards_in))
            earlier += [r for r in requests if r.receipt.number.startswith(f"r{round_no}-")]
            clock.advance(days=rng.choice((0, 1, 15)))    # some pending points become activatable
        assert shared > 0, "no batch held two confirms of one member"
        a, b = _state(batched), _state(alone)
        for table in a:
            assert a[table] == b[table], f"{table} differs (seed {seed})"
        assert ledger.check(batched.db) == [] and ledger.check(alone.db) == []
        # both ways of writing a batch were taken: one statement, and one per confirm when a member's later
        # confirm may write off points an earlier one of the batch made active
        assert exact_seen and (False in exact_seen) == (activation == "active at once"), exact_seen
    finally:
        batched.close()
        alone.close()
