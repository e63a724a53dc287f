"""A condition's time window counts from the event that started the run (SPEC section 8), not from the moment
a worker picked the event up, on SQLite and PostgreSQL, with simulated time and a worker that runs late.

- The welcome scenario (seeds/002): a member who registers and buys at once, before any worker ran, has
  "bought" at the check a day later: points and the promo e-mail, no SMS reminder, no call to the call centre.
- ``within``: "bought within 2 hours of a top-up" is a purchase in [top-up, top-up + 2 h]; one made before the
  top-up, or after those two hours (seen by a worker that was down then), does not count.
"""
from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select

from helpers.scenarios import WELCOME, active_points, enroll, ledger_rows, outbox, runs
from loyalty.server.segments.models import member_tags
from loyalty.v1 import processing_pb2 as P
from loyalty.v1 import receipt_pb2 as R


def buy(service, clock, card: str, number: str, printed: dt.timedelta = dt.timedelta(0)) -> None:
    """A purchase confirmed now, its receipt printed ``printed`` from now (the till's own clock)."""
    service.confirm_purchase(P.ConfirmPurchaseRequest(
        member=R.MemberRef(card=card),
        receipt=R.Receipt(store="msk-01", terminal="pos-3", number=number, at=(clock() + printed).isoformat(),
                          lines=[R.Line(sku="coffee-beans-1kg", categories=["coffee"], quantity=1000,
                                        price=89900)])))


def top_up(service, card: str, operation_id: str) -> None:
    service.adjust_points(P.AdjustPointsRequest(member=R.MemberRef(card=card), kind="top_up", points=100,
                                                operation_id=operation_id, reason="gift card"))


def tags(db, member_id: int) -> set[str]:
    with db.read() as conn:
        return set(conn.execute(select(member_tags.c.tag).where(member_tags.c.member_id == member_id)).scalars())


@pytest.mark.parametrize("printed", [0, -10], ids=["receipt-after", "receipt-opened-before-registering"])
def test_welcome_member_who_registers_and_buys_at_once_gets_the_reward_however_late_the_worker(
        scn, http_sink, clock, printed):
    """``printed``: minutes between the registration and the receipt's own time; -10 is a card registered at the
    till while its first receipt was open (the receipt is older than the registration, its confirmation not)."""
    service, sc, worker = scn
    sc.define(WELCOME.read_text(encoding="utf-8").replace("http://127.0.0.1:8089", http_sink.url))
    sc.add_promo_codes("welcome", ["WELCOME-A"])
    registered = clock()
    member = enroll(service, "7000001", source="form", phone="+79000000001", email="anna@example.com",
                    subs={"email": True, "sms": True})
    buy(service, clock, "7000001", "w-1", dt.timedelta(minutes=printed))     # at the till, right after registering
    clock.advance(hours=3)                         # no worker ran until now
    worker.run_until_idle()
    [run] = runs(service.db, "welcome")
    assert run["entered_at"] == registered         # the registration, not the pick-up three hours later
    clock.advance(days=1)                          # the pause is over: "bought within a day?" -> yes
    worker.run_until_idle()
    [run] = runs(service.db, "welcome")
    assert run["state"] == "done"
    # visits counted by hand (scenarios/test_welcome.py): welcome_email 1, pause 2, confirmed 3, reward 4
    assert [r for r in ledger_rows(service.db, member) if r[0].startswith("scenario:")] == [
        (f"scenario:{run['id']}:reward:4", member, 500)]
    assert active_points(service.db, member) == 500         # the purchase's own points are still pending
    assert [m["subject"] for m in outbox(service.db, channel="email")] == ["Welcome, Anna!", "Your welcome gift"]
    assert outbox(service.db, channel="sms") == [] and outbox(service.db, channel="webhook") == []
    assert http_sink.requests == []
    stats = {s["step"]: s for s in sc.stats("welcome")["steps"]}
    assert (stats["confirmed"]["yes"], stats["confirmed"]["no"], stats["reminded"]["entered"]) == (1, 0, 0)
    funnel = {s["stage"]: s["count"] for s in sc.funnel("welcome")["stages"]}
    assert funnel["goal:purchase_confirmed"] == 1  # the funnel's goal counts from the registration too


TOP_UP_THEN_BUY = """
id: top_up_then_buy
triggers: [top_up]
reentry: always
steps:
  - id: pause
    wait: 1h
  - id: bought
    condition: {event: {kind: purchase_confirmed, within: 2h}}
    yes: yes_tag
    no: no_tag
  - id: yes_tag
    add_tag: bought_after_top_up
    next: end
  - id: no_tag
    add_tag: no_purchase_after_top_up
"""


def test_within_counts_from_the_triggering_event_and_ends_within_after_it(scn, clock):
    service, sc, worker = scn
    sc.define(TOP_UP_THEN_BUY)
    before = enroll(service, "7000011", phone="+79000000011")     # bought, then topped up
    after = enroll(service, "7000012", phone="+79000000012")      # topped up, bought at once
    late = enroll(service, "7000013", phone="+79000000013")       # topped up, bought 2 h 15 min later
    t0 = clock()
    buy(service, clock, "7000011", "b-1")                         # 0:00 before's purchase
    clock.advance(minutes=10)
    top_up(service, "7000011", "top-before")                      # 0:10 window [0:10, 2:10]
    top_up(service, "7000012", "top-after")                       # 0:10 window [0:10, 2:10]
    clock.advance(minutes=10)
    buy(service, clock, "7000012", "a-1")                         # 0:20 inside, before any worker ran
    clock.advance(minutes=10)
    worker.run_until_idle()                                       # 0:30 the runs enter, wait 1 h
    assert {r["member_id"]: r["entered_at"] for r in runs(service.db, "top_up_then_buy")} == {
        before: t0 + dt.timedelta(minutes=10), after: t0 + dt.timedelta(minutes=10)}
    clock.advance(hours=1)
    top_up(service, "7000013", "top-late")                        # 1:30 window [1:30, 3:30]
    worker.run_until_idle()                                       # 1:30 before and after decided
    assert tags(service.db, before) == {"no_purchase_after_top_up"}   # a purchase before the top-up
    assert tags(service.db, after) == {"bought_after_top_up"}
    clock.advance(hours=2, minutes=15)                            # the worker is down from 1:30 to 4:00
    buy(service, clock, "7000013", "l-1")                         # 3:45: 15 minutes after the window
    clock.advance(minutes=15)
    worker.run_until_idle()                                       # 4:00 late's check, long after its window
    assert tags(service.db, late) == {"no_purchase_after_top_up"}
    assert {r["state"] for r in runs(service.db, "top_up_then_buy")} == {"done"}


BOUGHT_AGAIN = """
id: bought_again
triggers: [purchase_confirmed]
steps:
  - id: pause
    wait: 1d
  - id: again
    condition: {event: {kind: purchase_confirmed, within: 7d}}
    yes: loyal
    no: once
  - id: loyal
    add_tag: bought_again
    next: end
  - id: once
    add_tag: bought_once
"""


def test_the_event_that_started_the_run_is_not_one_that_happened_in_its_window(scn, clock):
    # reentry never: one run per member, started by the first purchase; the worker runs at that very moment
    # (the old window, from the pick-up, counted the purchase itself when the pick-up was at its instant)
    service, sc, worker = scn
    sc.define(BOUGHT_AGAIN)
    once = enroll(service, "7000021", phone="+79000000021")
    twice = enroll(service, "7000022", phone="+79000000022")
    buy(service, clock, "7000021", "o-1")
    buy(service, clock, "7000022", "t-1")
    worker.run_until_idle()
    clock.advance(hours=5)
    buy(service, clock, "7000022", "t-2")
    clock.advance(days=1)
    worker.run_until_idle()
    assert tags(service.db, once) == {"bought_once"}
    assert tags(service.db, twice) == {"bought_again"}
