"""Group commit of ConfirmPurchase on PostgreSQL (``LOYALTY_CONFIRM_BATCH``): confirms arriving together run
in one transaction, and every guarantee of a confirm alone still holds per confirm: its own failure writes
nothing and the others commit; two confirms of one member see each other in order (never more than the
balance); two of one key replay (or AlreadyExists); a lost connection at COMMIT writes nothing and answers
UNAVAILABLE. Numbers worked out by hand from the demo program (SPEC 3-5), arithmetic in the comments."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, select

from helpers.purchases import BUDGET_PROGRAM, coffee, enroll, spent, together
from helpers.storage import DEMO_PROGRAM
from loyalty.server import db, ledger
from loyalty.server.errors import AlreadyExists, FailedPrecondition, NotFound, Unavailable
from loyalty.server.models import purchases
from loyalty.server.convert import receipt_to_dict
from loyalty.server.processing import ProcessingService
from loyalty.v1 import admin_pb2
from loyalty.v1 import processing_pb2 as P
from loyalty.v1 import receipt_pb2 as R

def _open(url, clock, monkeypatch, *, batch, window_ms):
    monkeypatch.setenv("LOYALTY_CONFIRM_BATCH", str(batch))
    monkeypatch.setenv("LOYALTY_CONFIRM_BATCH_WINDOW_MS", str(window_ms))
    monkeypatch.setenv("LOYALTY_CONFIRM_BATCH_THREADS", "1")
    svc = ProcessingService.open(url, clock=clock)
    if svc.confirmation.batcher is not None:
        svc.confirmation.batcher.idle_wait = True       # requests a moment apart from idle share a batch
    return svc


@pytest.fixture
def gc(pg_url, clock, monkeypatch):
    """A service whose confirms wait up to 600 ms for a batch of up to 8 (so a test's staggered requests
    land in one batch)."""
    db.upgrade(pg_url)
    svc = _open(pg_url, clock, monkeypatch, batch=8, window_ms=600)
    svc.publish_program(admin_pb2.PublishProgramRequest(yaml=DEMO_PROGRAM, comment="tests"))
    try:
        yield svc
    finally:
        svc.close()


def _req(card, receipt):
    return P.ConfirmPurchaseRequest(member=R.MemberRef(card=card) if card else None, receipt=receipt)


def _count(svc, table=purchases):
    with svc.db.read() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar()


def _balances(svc, card):
    m = svc.get_member(P.GetMemberRequest(member=R.MemberRef(card=card)))
    return m.active_points, m.pending_points


@pytest.mark.postgres
def test_one_batch_mixes_winners_a_loser_a_duplicate_a_conflict_and_an_unknown_card(gc):
    enroll(gc, "7300001", points=250)
    enroll(gc, "7300002")
    batches_before = gc.confirmation.batcher.batches
    requests = [
        _req("7300001", coffee("gc-1", redeem=100)),    # 0: ok
        _req("7300001", coffee("gc-2", redeem=100)),    # 1: ok, sees 0's spend: 250 - 100 = 150 >= 100
        _req("7300001", coffee("gc-3", redeem=100)),    # 2: 250 - 200 = 50 left < 100: FailedPrecondition
        _req("7300002", coffee("gc-4", redeem=10)),     # 3: member with 0 points: FailedPrecondition
        _req("7300001", coffee("gc-1", redeem=100)),    # 4: the same request as 0: replays it
        _req("7300001", coffee("gc-1", redeem=50)),     # 5: 0's key, another payload: AlreadyExists
        _req("7399999", coffee("gc-5")),                # 6: unknown card: NotFound
        _req(None, coffee("gc-6")),                     # 7: anonymous: ok, no member
    ]
    r = together(gc, requests)
    assert gc.confirmation.batcher.batches - batches_before == 1          # all eight in one transaction
    assert not r[0].replayed and not r[1].replayed and not r[7].replayed
    assert isinstance(r[2], FailedPrecondition) and r[2].details["available_points"] == 50
    assert isinstance(r[3], FailedPrecondition) and r[3].details["available_points"] == 0
    assert r[4].replayed and r[4].purchase_id == r[0].purchase_id and r[4].answer == r[0].answer
    assert isinstance(r[5], AlreadyExists)
    assert isinstance(r[6], NotFound)
    # coffee 89900, 100 points = 10000 paid with points; earns floor((89900 - 10000) x 3% / 100) = 23 pending
    assert r[0].answer.totals.redeemed_points == 100 and r[0].answer.totals.accrued_points == 23
    assert _balances(gc, "7300001") == (250 - 2 * 100, 2 * 23)
    assert _balances(gc, "7300002") == (0, 0)
    assert _count(gc) == 3                                      # gc-1, gc-2, gc-6
    assert ledger.check(gc.db) == []
    # the loser, retried alone after the batch, still sees 50
    with pytest.raises(FailedPrecondition) as e:
        gc.confirm_purchase(requests[2])
    assert e.value.details["available_points"] == 50


@pytest.mark.postgres
def test_confirms_of_one_member_in_one_batch_follow_each_other(gc):
    enroll(gc, "7300010", points=300)
    # four receipts of 60 points each on one card: 300 -> 240 -> 180 -> 120 -> 60; every one earns
    # floor((89900 - 6000) x 3% / 100) = floor(25.17) = 25 pending
    r = together(gc, [_req("7300010", coffee(f"seq-{i}", redeem=60)) for i in range(4)])
    assert all(not x.replayed for x in r)
    assert len({x.purchase_id for x in r}) == 4
    assert _balances(gc, "7300010") == (300 - 4 * 60, 4 * 25)
    m = gc.get_member(P.GetMemberRequest(member=R.MemberRef(card="7300010")))
    # the tier metric adds the payable of each: 4 x 89900 (points do not lower it)
    assert m.purchases_sum == 4 * 89900
    assert ledger.check(gc.db) == []


@pytest.mark.postgres
def test_fifty_confirms_spending_one_card_never_exceed_the_balance(pg_url, clock, monkeypatch):
    db.upgrade(pg_url)
    svc = _open(pg_url, clock, monkeypatch, batch=32, window_ms=5)
    try:
        svc.publish_program(admin_pb2.PublishProgramRequest(yaml=DEMO_PROGRAM, comment="tests"))
        enroll(svc, "7300020", points=1000)
        barrier = threading.Barrier(50)

        def spend(i):
            req = _req("7300020", coffee(f"fifty-{i}", redeem=100))
            barrier.wait()
            try:
                return svc.confirm_purchase(req)
            except FailedPrecondition as exc:
                return exc

        items_before = svc.confirmation.batcher.items
        with ThreadPoolExecutor(50) as pool:
            results = list(pool.map(spend, range(50)))
        assert svc.confirmation.batcher.items - items_before == 50
        won = [x for x in results if not isinstance(x, Exception)]
        lost = [x for x in results if isinstance(x, FailedPrecondition)]
        # 1000 points / 100 per receipt: exactly 10 winners; each earns 23 pending (see above)
        assert (len(won), len(lost)) == (10, 40)
        assert all(exc.details["available_points"] < 100 for exc in lost)
        assert _balances(svc, "7300020") == (0, 10 * 23)
        assert _count(svc) == 10
        assert ledger.check(svc.db) == []
    finally:
        svc.close()


@pytest.mark.postgres
def test_a_connection_lost_in_the_write_round_is_run_again_and_written_once(gc, pg_url):
    """The write round carries the COMMIT: losing the connection there leaves the outcome unknown to the server,
    so it runs the batch again (the same keys: a stored purchase would replay) and answers what is true."""
    import psycopg

    enroll(gc, "7300030", points=500)
    admin = psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)
    killed, calls = [], []
    calculate = gc.reads.calculate
    requests = [_req("7300030", coffee(f"lost-{i}", redeem=100)) for i in range(3)] + \
               [_req(None, coffee("lost-anon"))]

    def calculate_then_kill(snap, receipt, member, conn=None, **kw):
        answer = calculate(snap, receipt, member, conn, **kw)
        calls.append(1)
        # the batch's last calculation: the next thing it sends is the write round with its COMMIT
        if len(calls) == len(requests) and conn is not None:
            pid = conn.connection.driver_connection.info.backend_pid
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            killed.append(pid)
        return answer

    gc.reads.calculate = calculate_then_kill
    batches_before = gc.confirmation.batcher.batches
    try:
        r = together(gc, requests)
    finally:
        gc.reads.calculate = calculate
        admin.close()
    assert len(killed) == 1 and gc.confirmation.batcher.batches - batches_before == 1
    # the batch ran again on a fresh connection: nothing had been stored, so it was written now, once:
    # 500 - 3 x 100 = 200, 3 x 23 pending
    assert all(not isinstance(x, Exception) and not x.replayed for x in r), r
    assert _count(gc) == 4
    assert _balances(gc, "7300030") == (200, 3 * 23)
    assert ledger.check(gc.db) == []
    # the clients' retries replay
    again = together(gc, requests)
    assert all(not isinstance(x, Exception) and x.replayed for x in again), again
    assert [x.purchase_id for x in again] == [x.purchase_id for x in r]
    assert _balances(gc, "7300030") == (200, 3 * 23)


@pytest.mark.postgres
def test_a_key_taken_by_another_process_meanwhile_is_replayed_and_the_rest_commit(gc, pg_url, clock, monkeypatch):
    enroll(gc, "7300040", points=500)
    monkeypatch.setenv("LOYALTY_CONFIRM_BATCH", "0")
    other = ProcessingService.open(pg_url, clock=clock)      # another process: no batching
    race = _req(None, coffee("race-1"))
    first = []
    calculate = gc.reads.calculate

    def other_confirms_first(snap, receipt, member, conn=None, **kw):
        # after this batch checked its keys and before it writes: the other process confirms race-1
        if not first and conn is not None:
            first.append(other.confirm_purchase(race))
        return calculate(snap, receipt, member, conn, **kw)

    gc.reads.calculate = other_confirms_first
    try:
        r = together(gc, [race, _req("7300040", coffee("race-2", redeem=100))])
    finally:
        gc.reads.calculate = calculate
        other.close()
    # the batch's insert of race-1 hit the unique key: rolled back, each confirm ran alone
    assert r[0].replayed and r[0].purchase_id == first[0].purchase_id and r[0].answer == first[0].answer
    assert not r[1].replayed and r[1].answer.totals.redeemed_points == 100
    assert _balances(gc, "7300040") == (400, 23)
    assert _count(gc) == 2
    assert ledger.check(gc.db) == []


@pytest.mark.postgres
def _future(svc, card, receipt):
    return svc.confirm_future(card or "", "", receipt_to_dict(receipt))


def test_the_future_api_answers_without_a_waiting_thread(gc):
    """``confirm_future`` (for the asyncio edge): bad input raises at once, the rest completes the future
    from the batch: a success, then its replay, then a loser with the available balance."""
    from loyalty.server.errors import InvalidArgument

    enroll(gc, "7300050", points=150)
    with pytest.raises(InvalidArgument) as e:
        _future(gc, "7300050", R.Receipt(store="msk-01", terminal="pos-3", at="x"))
    assert e.value.path == "receipt.number"
    first_id, first_answer, first_replayed = _future(gc, "7300050", coffee("fut-1", redeem=100)).result(10)
    assert not first_replayed and first_answer["totals"]["redeemed_points"] == 100
    again_id, _, again_replayed = _future(gc, "7300050", coffee("fut-1", redeem=100)).result(10)
    assert again_replayed and again_id == first_id
    loser = _future(gc, "7300050", coffee("fut-2", redeem=100))
    with pytest.raises(FailedPrecondition) as e:
        loser.result(10)
    assert e.value.details["available_points"] == 150 - 100
    assert _balances(gc, "7300050") == (50, 23)     # 23 pending: see the first test
    assert ledger.check(gc.db) == []


def test_sqlite_never_batches(sqlite_url, clock):
    db.upgrade(sqlite_url)
    svc = ProcessingService.open(sqlite_url, clock=clock)
    try:
        assert svc.confirmation.batcher is None
        assert _future(svc, None, coffee("lite-1")) is None
    finally:
        svc.close()


# ---- budgets: read once per batch, spent on the condition that the figures still hold ------------------------

def _milk(number):
    # 2 x 89.90 = 17980; budget-10 gives 10% = 1798 while the budget has spent less than 100
    return R.Receipt(store="msk-01", terminal="pos-3", number=number, at="2026-03-02T12:30:00+03:00",
                     lines=[R.Line(sku="milk-1l", categories=["dairy"], quantity=2000, price=8990)])


@pytest.mark.postgres
def test_confirms_of_one_batch_share_a_budget_in_key_order(gc):
    gc.publish_program(admin_pb2.PublishProgramRequest(yaml=BUDGET_PROGRAM))
    batches_before = gc.confirmation.batcher.batches
    r = together(gc, [_req(None, _milk(f"bud-{i}")) for i in (3, 1, 2, 0)])
    assert gc.confirmation.batcher.batches - batches_before == 1
    # receipt-key order inside the batch: bud-0 spends the budget (0 < 100), bud-1..3 see 1798 >= 100
    assert [x.answer.totals.discount for x in r] == [0, 0, 0, 1798]
    assert spent(gc, "budget-10") == 1798


@pytest.mark.postgres
def test_a_budget_spent_by_another_process_meanwhile_sends_the_batch_alone(gc, pg_url, clock, monkeypatch):
    gc.publish_program(admin_pb2.PublishProgramRequest(yaml=BUDGET_PROGRAM))
    monkeypatch.setenv("LOYALTY_CONFIRM_BATCH", "0")
    other = ProcessingService.open(pg_url, clock=clock)      # another process: no batching
    first = []
    calculate = gc.reads.calculate

    def other_spends_first(snap, receipt, member, conn=None, **kw):
        # the batch has read the budget (0 spent) and not written yet: the other process spends it all
        if not first and conn is not None:
            first.append(other.confirm_purchase(_req(None, _milk("bud-other"))))
        return calculate(snap, receipt, member, conn, **kw)

    gc.reads.calculate = other_spends_first
    batches_before = gc.confirmation.batcher.batches
    try:
        r = together(gc, [_req(None, _milk("bud-a")), _req(None, _milk("bud-b"))])
    finally:
        gc.reads.calculate = calculate
        other.close()
    assert first[0].answer.totals.discount == 1798
    # the batch decided bud-a on 0 spent; at its write the budget had 1798: rolled back, each confirm alone,
    # on the locked figure: no discount for either, and the budget spent once
    assert gc.confirmation.batcher.batches - batches_before == 1
    assert [x.answer.totals.discount for x in r] == [0, 0]
    assert all(not x.replayed for x in r)
    assert spent(gc, "budget-10") == 1798
    assert _count(gc) == 3
    assert ledger.check(gc.db) == []


@pytest.mark.postgres
def test_the_payload_hash_ignores_field_order_on_the_wire(gc):
    """A POS may encode fields in any order (and send a message in pieces): what counts as the same payload
    is what the server reads, so the retry replays instead of being AlreadyExists."""
    req = _req("7300060", coffee("order-1"))
    enroll(gc, "7300060")
    first = gc.confirm_purchase(req)
    raw = req.SerializeToString()
    # the same request with its two top-level fields swapped: receipt (field 2) first, then member (field 1)
    member = P.ConfirmPurchaseRequest(member=req.member).SerializeToString()
    receipt = P.ConfirmPurchaseRequest(receipt=req.receipt).SerializeToString()
    swapped = P.ConfirmPurchaseRequest.FromString(receipt + member)
    assert receipt + member != raw
    again = gc.confirm_purchase(swapped)
    assert again.replayed and again.purchase_id == first.purchase_id
    changed = _req("7300060", coffee("order-1", redeem=0))
    changed.receipt.lines[0].price += 1
    with pytest.raises(AlreadyExists):
        gc.confirm_purchase(changed)


@pytest.mark.postgres
@pytest.mark.parametrize("member", ["card", "phone", "anonymous", "empty member"])
def test_a_purchase_stored_by_an_earlier_release_replays(gc, member):
    """Releases before the payload hash over the decoded request stored ``_hash`` of the protobuf message: a
    POS retrying across the upgrade gets the stored answer (alone and in a batch), a changed payload is still
    AlreadyExists."""
    from sqlalchemy import update

    from loyalty.server import processing

    enroll(gc, "7300070", phone="+79001234570")
    req = _req(None, coffee(f"legacy-{member}"))
    if member == "card":
        req.member.card = "7300070"
    elif member == "phone":
        req.member.phone = "+7 900 123-45-70"          # stored as sent, normalised when looked up
    elif member == "empty member":
        req.member.SetInParent()
    req.receipt.lines[0].amount = 89900                # an explicit optional field takes part in the hash
    first = gc.confirm_purchase(req)
    with gc.db.write() as conn:
        conn.execute(update(purchases).where(purchases.c.number == req.receipt.number)
                     .values(request_hash=processing._hash(req)))
    again = gc.confirm_purchase(req)                    # a batch (group commit is on)
    assert again.replayed and again.purchase_id == first.purchase_id
    gc.confirmation.batcher, batcher = None, gc.confirmation.batcher           # and alone
    try:
        alone = gc.confirm_purchase(req)
    finally:
        gc.confirmation.batcher = batcher
    assert alone.replayed and alone.purchase_id == first.purchase_id
    req.receipt.redeem_points = 1
    with pytest.raises(AlreadyExists):
        gc.confirm_purchase(req)
