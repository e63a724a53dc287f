"""Every way a confirm is written, against each other, on one generated workload.

Four databases get the same requests, each through one path of ConfirmPurchase:

- SQLite, row by row through ``ledger`` (``confirm_write.write_rows``);
- PostgreSQL, row by row (the path the set-based writer hands a confirm back to: a card and a phone, a member in
  debt, a group rolled back);
- PostgreSQL, set-based, each confirm alone as a group of one (group commit off);
- PostgreSQL, group commit: the requests of a round arrive together and share one transaction, every row of
  the batch in one statement (``confirm_sql.SetWrite``).

The three one-at-a-time paths confirm in the order a batch processes its confirms (receipt key, then arrival).
Every answer and every row must come out the same:
balances, lots (what each holds and when it activates and expires), ledger entries, purchase lines, promotion
usage, budgets and events, compared by purchase key and card (row ids come from sequences and differ). The
members are few, so one batch often holds several confirms of one member: redemptions after redemptions,
limited promotions used twice, upgrades. With ``activation_days: 0`` accrued points are active at once and a
later confirm of the batch may write them off (``SetWrite.exact`` False: one statement per confirm). Between
rounds some purchases are returned in full (the same refunds on every database); a return of points already
spent leaves its member in debt, which the next points made active settle (``ledger.settle_debt``).
"""
from __future__ import annotations

import datetime as dt
import os
import random

import pytest
from sqlalchemy import select

from helpers.purchases import together
from helpers.storage import DEMO_PROGRAM, create_database, drop_database
from loyalty.server import db, ledger
from loyalty.server.processing import confirm, confirm_write
from loyalty.server.processing.confirm_sql import SetWrite
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


PATHS = ("postgresql group commit", "sqlite row by row", "postgresql row by row", "postgresql set-based alone")


@pytest.fixture
def pg_urls():
    """Two more migrated PostgreSQL databases (copies of the template, as ``pg_url``)."""
    urls = [create_database(migrated=True) for _ in range(2)]
    try:
        yield urls
    finally:
        for url in urls:
            drop_database(url)


def _services(urls, clock, monkeypatch, program):
    """One service per path of ``PATHS``, over ``urls`` in that order, each with the same members."""
    out = []
    for path, url in zip(PATHS, urls):
        monkeypatch.setenv("LOYALTY_CONFIRM_BATCH", "16" if path == "postgresql group commit" else "0")
        monkeypatch.setenv("LOYALTY_CONFIRM_BATCH_WINDOW_MS", "500")
        monkeypatch.setenv("LOYALTY_CONFIRM_BATCH_THREADS", "1")
        db.upgrade(url)
        svc = ProcessingService.open(url, clock=clock)
        if svc.confirmation.batcher is not None:
            svc.confirmation.batcher.idle_wait = True   # requests a moment apart from idle share a batch
        if path == "postgresql row by row":
            svc.confirmation.set_based = False          # every confirm takes the path a group hands confirms back to
        svc.publish_program(admin_pb2.PublishProgramRequest(yaml=program, comment="tests"))
        for i, card in enumerate(CARDS):
            svc.enroll_member(P.EnrollMemberRequest(card=card, source="pos"))
            svc.adjust_points(P.AdjustPointsRequest(member=R.MemberRef(card=card), kind="credit",
                                                    points=300 * (i + 1), reason="opening",
                                                    operation_id=f"open:{card}"))
        out.append(svc)
    assert out[0].confirmation.batcher is not None and all(svc.confirmation.batcher is None for svc in out[1:])
    assert [svc.confirmation.set_based for svc in out] == [True, False, False, True]
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


def _t(moment) -> str:
    """A stored time as UTC text (SQLite hands back naive UTC, PostgreSQL aware times)."""
    if moment is None or moment.tzinfo is None:
        return str(moment)
    return str(moment.astimezone(dt.timezone.utc).replace(tzinfo=None))


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
            "lots": sorted((card_of[r.member_id], r.points, r.remaining, r.state, _t(r.activates_at),
                            _t(r.expires_at), key_of.get(r.purchase_id, ()), entry_key.get(r.entry_id, ()))
                           for r in conn.execute(select(point_lots))),
            "ledger": sorted((card_of[r.member_id], r.kind, r.points, r.active_delta, r.pending_delta,
                              key_of.get(r.purchase_id, ()), _t(r.created_at))
                             for r in conn.execute(select(ledger_rows))),
            "purchases": sorted((k, card_of.get(r.member_id), r.card, r.request_hash, r.amount, r.discount,
                                 r.payable, r.redeemed_points, r.redeemed_amount, r.accrued_points, r.status,
                                 _t(r.created_at), repr(r.answer))
                                for r in conn.execute(select(purchases)) for k in [key_of[r.id]]),
            "lines": sorted((key_of[r.purchase_id], r.line, r.sku, r.quantity, r.amount, r.payable, r.redeemed,
                             r.points) for r in conn.execute(select(purchase_lines))),
            "usage": sorted((card_of[r.member_id], r.promotion, r.period_key, r.uses)
                            for r in conn.execute(select(promotion_usage))),
            "budgets": sorted(tuple(r) for r in conn.execute(select(promotion_budgets))),
            "events": sorted((r.kind, card_of.get(r.member_id, ""), _t(r.created_at),
                              repr({k: v for k, v in sorted(r.payload.items()) if k != "purchase_id"}))
                             for r in conn.execute(select(events))),
        }
    return state


def _debt_then_settled(services, rng, clock, activation) -> None:
    """A member with no points buys (points accrued), spends them all on the next receipt, returns the first
    purchase (the points taken back are gone: a debt when they were active at once) and buys again: the new
    points pay the debt off first (``settle``, which a group hands back to be written row by row)."""
    card = "7400009"
    at = clock().astimezone(MSK).isoformat()
    for svc in services:
        svc.enroll_member(P.EnrollMemberRequest(card=card, source="pos"))
    big = R.Line(sku="coffee-beans-1kg", categories=["coffee"], quantity=10000, price=89900)
    first = P.ConfirmPurchaseRequest(member=R.MemberRef(card=card), receipt=R.Receipt(
        store="msk-01", terminal="pos-9", number="debt-1", at=at, lines=[big]))
    accrued = {together(svc, [first])[0].answer.totals.accrued_points for svc in services}
    assert len(accrued) == 1 and accrued.pop() > 0
    active = services[0].get_member(P.GetMemberRequest(member=R.MemberRef(card=card))).active_points
    second = P.ConfirmPurchaseRequest(member=R.MemberRef(card=card), receipt=R.Receipt(
        store="msk-01", terminal="pos-9", number="debt-2", at=at, lines=[big], redeem_points=active))
    refund = P.RefundPurchaseRequest(refund_id="debt-ret", all_remaining=True,
                                     purchase=P.PurchaseKey(store="msk-01", terminal="pos-9", number="debt-1"))
    third = P.ConfirmPurchaseRequest(member=R.MemberRef(card=card), receipt=R.Receipt(
        store="msk-01", terminal="pos-9", number="debt-3", at=at, lines=[big]))
    answers = []
    for svc in services:
        answers.append((_outcome(together(svc, [second])[0]), _without_id(svc.refund_purchase(refund)),
                        svc.get_member(P.GetMemberRequest(member=R.MemberRef(card=card))).active_points,
                        _outcome(together(svc, [third])[0])))
    assert all(a == answers[0] for a in answers), answers
    debt = answers[0][2]
    assert (debt < 0) == (activation == "active at once"), debt


def _without_id(response) -> bytes:
    """A response without its row id (ids come from each database's sequences)."""
    response.ClearField("purchase_id")
    return response.SerializeToString(deterministic=True)


def _refunds(rng, round_no, confirmed):
    """Full returns of some purchases confirmed so far (each at most once), the same on every database."""
    out = []
    for req in rng.sample(confirmed, min(len(confirmed), rng.choice((0, 1, 2)))):
        confirmed.remove(req)
        r = req.receipt
        out.append(P.RefundPurchaseRequest(refund_id=f"ret-{round_no}-{r.number}", all_remaining=True,
                                           purchase=P.PurchaseKey(store=r.store, terminal=r.terminal,
                                                                  number=r.number)))
    return out


@pytest.mark.postgres
@pytest.mark.parametrize("activation", ["pending", "active at once"])
def test_every_confirm_path_writes_the_same(pg_url, pg_urls, sqlite_url, clock, monkeypatch, activation):
    program = DEMO_PROGRAM
    if activation == "active at once":
        program = DEMO_PROGRAM.replace("activation_days: 14", "activation_days: 0", 1)
        assert program != DEMO_PROGRAM
    seed = int(os.environ.get("LOYALTY_BATCH_DIFF_SEED", random.randrange(1 << 30)))
    print(f"LOYALTY_BATCH_DIFF_SEED={seed}")
    rng = random.Random(seed)
    services = _services([pg_url, sqlite_url, *pg_urls], clock, monkeypatch, program)
    batched, one_at_a_time = services[0], services[1:]
    exact_seen, row_by_row, settled = [], {}, []
    send = SetWrite.send
    write = confirm_write.write_rows

    def spy_send(self, dconn):
        exact_seen.append(self.exact)
        return send(self, dconn)

    def spy_write(conn, rows):
        row_by_row[conn.dialect.name] = row_by_row.get(conn.dialect.name, 0) + 1
        if rows.settle:
            settled.append(conn.dialect.name)
        return write(conn, rows)

    monkeypatch.setattr(SetWrite, "send", spy_send)
    monkeypatch.setattr(confirm, "write_rows", spy_write)
    try:
        earlier: list = []
        confirmed: list = []
        shared = 0
        for round_no in range(ROUNDS):
            requests = _requests(rng, round_no, earlier, clock().astimezone(MSK).isoformat())
            before = batched.confirmation.batcher.batches
            got = together(batched, requests, gap=0.005)
            assert batched.confirmation.batcher.batches - before == 1, "the round did not land in one batch"
            order = sorted(range(len(requests)), key=lambda i: (requests[i].receipt.store,
                                                                 requests[i].receipt.terminal,
                                                                 requests[i].receipt.number, i))
            for path, svc in zip(PATHS[1:], one_at_a_time):
                want = [None] * len(requests)
                for i in order:
                    try:
                        want[i] = svc.confirm_purchase(requests[i])
                    except ServiceError as exc:
                        want[i] = exc
                for i, (g, w) in enumerate(zip(got, want)):
                    assert _outcome(g) == _outcome(w), f"{path}: round {round_no} request {i} (seed {seed})"
            cards_in = [r.member.card for r in requests if r.member.card in CARDS]
            shared += len(cards_in) - len(set(cards_in))
            new = [r for r, g in zip(requests, got) if r.receipt.number.startswith(f"r{round_no}-")]
            earlier += new
            confirmed += [r for r, g in zip(requests, got) if r in new and not isinstance(g, Exception)
                          and not g.replayed and r.member.card in CARDS]
            for refund in _refunds(rng, round_no, confirmed):
                answers = {path: _without_id(svc.refund_purchase(refund)) for path, svc in zip(PATHS, services)}
                assert len(set(answers.values())) == 1, f"refund {refund.refund_id} differs (seed {seed})"
            clock.advance(days=rng.choice((0, 1, 15)))    # some pending points become activatable
        assert shared > 0, "no batch held two confirms of one member"
        _debt_then_settled(services, rng, clock, activation)
        states = [_state(svc) for svc in services]
        for path, state in zip(PATHS[1:], states[1:]):
            for table in states[0]:
                assert state[table] == states[0][table], f"{path}: {table} differs (seed {seed})"
        for svc in services:
            assert ledger.check(svc.db) == []
        # the paths taken: one statement for a batch, and one per confirm when a member's later confirm may write
        # off points an earlier one of the batch made active; row by row on SQLite and where PostgreSQL's was forced
        assert exact_seen and (False in exact_seen) == (activation == "active at once"), exact_seen
        assert row_by_row["sqlite"] > 0 and row_by_row["postgresql"] > 0, row_by_row
        # the debt was settled on every path (a group hands the confirm back to be written row by row)
        if activation == "active at once":
            assert len(settled) >= 4 and set(settled) == {"sqlite", "postgresql"}, settled
        else:
            assert settled == []
    finally:
        for svc in services:
            svc.close()
