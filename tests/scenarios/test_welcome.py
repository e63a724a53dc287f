"""The welcome scenario of the seeds (002, Altcraft guide), shipped as ``server/scenarios/examples/welcome.yaml``,
end to end with simulated time on SQLite and PostgreSQL: every path of its graph, messages through the
outbox with subscriptions respected, points in the ledger, the promo code, the webhook to the call centre,
statistics and the funnel.

Step visits (the ``visit`` in effect keys ``scenario:<run>:<step>:<visit>``) are counted by hand from the
file: welcome_email 1, pause 2, confirmed 3, then reward 4 (yes) or reminded 4 -> sms_reminder 5 ->
sms_pause 6 -> back_to_check 7 -> confirmed 8 -> reward 9 (yes) or reminded 9 -> call_centre 10.
"""
from __future__ import annotations

import datetime as dt

from helpers.scenarios import WELCOME, active_points, enroll, ledger_rows, message_event, outbox, runs
from loyalty.v1 import processing_pb2 as P
from loyalty.v1 import receipt_pb2 as R


def setup_welcome(scn, http_sink):
    service, sc, worker = scn
    text = WELCOME.read_text(encoding="utf-8").replace("http://127.0.0.1:8089", http_sink.url)
    sc.define(text)
    sc.add_promo_codes("welcome", ["WELCOME-A", "WELCOME-B"])
    return service, sc, worker


def anna(service, **kw):
    kw.setdefault("subs", {"email": True, "sms": True})
    return enroll(service, "7000001", source="form", phone="+79000000001", email="anna@example.com", **kw)


def coffee_purchase(service, number="w-1"):
    service.confirm_purchase(P.ConfirmPurchaseRequest(
        member=R.MemberRef(card="7000001"),
        receipt=R.Receipt(store="msk-01", terminal="pos-3", number=number, at="2026-03-03T12:30:00+03:00",
                          lines=[R.Line(sku="coffee-beans-1kg", categories=["coffee"], quantity=1000,
                                        price=89900)])))


def test_clicked_welcome_email_gets_points_promo_code_and_its_email(scn, http_sink, clock):
    service, sc, worker = setup_welcome(scn, http_sink)
    t0 = clock()
    member = anna(service)
    worker.run_until_idle()
    sent = outbox(service.db, channel="email")
    assert [(m["subject"], m["recipient"], m["state"]) for m in sent] == [
        ("Welcome, Anna!", "anna@example.com", "sent")]
    assert "your card 7000001 is ready" in sent[0]["body"]
    assert ledger_rows(service.db, member) == []

    message_event(service.db, member, "email", "clicked", t0 + dt.timedelta(hours=2))
    clock.advance(days=1)
    worker.run_until_idle()
    run = runs(service.db, "welcome")[0]
    assert run["state"] == "done"
    assert ledger_rows(service.db, member) == [(f"scenario:{run['id']}:reward:4", member, 500)]
    assert active_points(service.db, member) == 500
    emails = outbox(service.db, channel="email")
    assert [m["state"] for m in emails] == ["sent", "sent"]
    assert emails[1]["body"] == "Anna, 500 points are yours and here is your promo code: WELCOME-A"
    assert outbox(service.db, channel="sms") == [] and http_sink.requests == []

    stats = {s["step"]: s for s in sc.stats("welcome")["steps"]}
    assert (stats["confirmed"]["entered"], stats["confirmed"]["yes"], stats["confirmed"]["no"]) == (1, 1, 0)
    assert stats["reward"]["completed"] == 1 and stats["reminded"]["entered"] == 0
    assert sc.stats("welcome")["triggers"][0]["triggered"] == 1      # source form is triggers[0]


def test_no_confirmation_sends_one_sms_then_a_purchase_in_the_pause_gets_the_reward(scn, http_sink, clock):
    service, sc, worker = setup_welcome(scn, http_sink)
    member = anna(service)
    worker.run_until_idle()
    clock.advance(days=1)                  # day 1: not confirmed -> no SMS sent yet -> SMS, pause
    worker.run_until_idle()
    sms = outbox(service.db, channel="sms")
    assert [(m["recipient"], m["state"]) for m in sms] == [("+79000000001", "sent")]
    assert sms[0]["body"] == "Anna, confirm your registration and get 500 points"
    clock.advance(hours=12)
    coffee_purchase(service)               # confirmed during the SMS pause
    worker.run_until_idle()
    clock.advance(hours=12)                # day 2: back to the check -> purchase since entry -> yes
    worker.run_until_idle()
    run = runs(service.db, "welcome")[0]
    assert run["state"] == "done"
    assert (f"scenario:{run['id']}:reward:9", member, 500) in ledger_rows(service.db, member)
    assert len(outbox(service.db, channel="sms")) == 1 and http_sink.requests == []
    stats = {s["step"]: s for s in sc.stats("welcome")["steps"]}
    assert (stats["confirmed"]["entered"], stats["confirmed"]["yes"], stats["confirmed"]["no"]) == (2, 1, 1)
    assert (stats["reminded"]["yes"], stats["reminded"]["no"]) == (0, 1)
    funnel = {s["stage"]: s["count"] for s in sc.funnel("welcome")["stages"]}
    assert funnel["triggered"] == 1 and funnel["sms_reminder"] == 1 and funnel["goal:purchase_confirmed"] == 1


def test_never_confirmed_after_one_reminder_calls_the_call_centre_once(scn, http_sink, clock):
    service, sc, worker = setup_welcome(scn, http_sink)
    member = anna(service)
    worker.run_until_idle()
    for _ in range(4):                     # days 1..4: the run ends on day 2; later days change nothing
        clock.advance(days=1)
        worker.run_until_idle()
    assert runs(service.db, "welcome")[0]["state"] == "done"
    assert len(outbox(service.db, channel="sms")) == 1
    assert len(http_sink.requests) == 1
    call = http_sink.requests[0]
    assert call["path"] == "/call-centre"
    assert call["json"] == {"member_id": str(member), "name": "Anna ", "phone": "+79000000001", "card": "7000001"}
    assert call["key"] == f"scenario:{runs(service.db)[0]['id']}:call_centre:10"
    assert ledger_rows(service.db, member) == []
    funnel = {s["stage"]: s["count"] for s in sc.funnel("welcome")["stages"]}
    assert funnel["call_centre"] == 1 and funnel["reward"] == 0 and funnel["goal:purchase_confirmed"] == 0


def test_unsubscribed_member_gets_no_marketing_message_and_still_reaches_the_call_centre(scn, http_sink, clock):
    service, sc, worker = setup_welcome(scn, http_sink)
    anna(service, subs={"email": False})
    for _ in range(3):
        worker.run_until_idle()
        clock.advance(days=1)
    worker.run_until_idle()
    states = [(m["channel"], m["state"]) for m in outbox(service.db)]
    assert states == [("email", "skipped"), ("sms", "skipped"), ("webhook", "sent")]
    assert outbox(service.db, channel="email")[0]["last_error"] == "not subscribed to email"
    assert len(http_sink.requests) == 1


def test_blocked_card_gets_no_marketing_email(scn, http_sink, clock):
    service, sc, worker = setup_welcome(scn, http_sink)
    anna(service)
    service.set_card_status(P.SetCardStatusRequest(card="7000001", status="blocked", reason="test"))
    worker.run_until_idle()
    [email] = outbox(service.db, channel="email")
    assert email["state"] == "skipped" and "blocked" in email["last_error"]
