"""A purchase happens when its receipt says (SPEC 6-7), through the public gRPC API on SQLite and PostgreSQL.

History loaded months after the fact (here: receipts of January to April 2026 confirmed by a server whose clock
reads December 2026) counts on the receipts' own local dates: the seeds' Loymax segment finds its members, the
points of a receipt whose return window is long past are active at once, and an impossible offset is refused.

Numbers by hand, demo program (Basic 3%, activation 14 days, point = 1.00 RUB): a receipt of one line of
35 000.00 (3 500 000 kopecks) earns floor(3 500 000 x 3 / 100 / 100) = 1 050 points; one of 30 000.00 earns
900.
"""
from __future__ import annotations

import datetime as dt
import json

import grpc
import pytest

from loyalty.clients.client import LoyaltyError
from loyalty.v1 import segments_pb2 as S, segments_pb2_grpc
from serverutil import BACKENDS, now_at, server_on


@pytest.fixture(params=BACKENDS)
def server(request, tmp_path):
    with server_on(request.param, tmp_path) as srv:
        yield srv


def receipt(number: str, at: str, price: int) -> dict:
    return {"store": "msk-02", "terminal": "pos-9", "number": number, "channel": "pos", "at": at,
            "lines": [{"sku": "tv-55", "categories": ["tv"], "quantity": 1000, "price": price}]}


def enroll(client, card: str, gender: str, email_on: bool) -> None:
    client.enroll_member({"card": card, "source": "import", "profile": {"gender": gender},
                          "subscriptions": {"email": email_on}, "request_id": f"enroll-{card}"})


# The seeds' segment (004_*): women whose last receipt falls between 1 January and 1 April, e-mail on, more than
# 1000 points accrued.
LOYMAX = {"all": [{"gender": "female"}, {"subscribed": "email"}, {"points": {"accrued_total": {"gt": 1000}}},
                  {"purchases": {"last_date": {"between": ["2026-01-01", "2026-04-01"]}}}]}


def test_history_confirmed_late_counts_on_its_receipt_dates(server):
    # card -> (gender, e-mail on, [(receipt at, price)]), and whether the seeds' segment must hold the member
    population = {
        "8100001": ("female", True, [("2026-02-10T12:00:00+03:00", 3500000)], True),
        "8100002": ("female", True, [("2026-03-31T19:00:00+03:00", 3500000)], True),
        # 01:00 in Moscow on 1 January is 31 December in UTC: the local date counts
        "8100003": ("female", True, [("2026-01-01T01:00:00+03:00", 3500000)], True),
        # 00:30 on 2 April in Moscow is still 1 April in UTC: outside, by its local date
        "8100004": ("female", True, [("2026-04-02T00:30:00+03:00", 3500000)], False),
        # a later receipt moves the last purchase out of the window
        "8100005": ("female", True, [("2026-02-10T12:00:00+03:00", 3500000),
                                     ("2026-05-05T12:00:00+03:00", 100000)], False),
        "8100006": ("female", False, [("2026-02-10T12:00:00+03:00", 3500000)], False),     # e-mail off
        "8100007": ("male", True, [("2026-02-10T12:00:00+03:00", 3500000)], False),
        "8100008": ("female", True, [("2026-02-10T12:00:00+03:00", 3000000)], False),      # 900 points
    }
    with server.client(timeout=20) as client:
        for card, (gender, email_on, receipts, _) in population.items():
            enroll(client, card, gender, email_on)
            for n, (at, price) in enumerate(receipts):
                reply = client.confirm_purchase({"member": {"card": card},
                                                 "receipt": receipt(f"{card}-{n}", at, price)})
                if n == 0:                  # a new member's first receipt: Basic, 3%
                    assert reply.answer.totals.accrued_points == price * 3 // 10000
        # February's points: 14 days of return window long past, so active at once, nothing pending
        first = client.get_member({"member": {"card": "8100001"}})
        assert (first.active_points, first.pending_points) == (1050, 0)

        segments = segments_pb2_grpc.SegmentsStub(client.channel)
        segments.CreateSegment(S.DefineSegmentRequest(id="loymax-q1", type="updatable",
                                                      conditions_json=json.dumps(LOYMAX)), timeout=20)
        run = segments.RecalculateSegment(S.RecalculateSegmentRequest(id="loymax-q1"), timeout=60)
        preview = segments.PreviewMembers(S.PreviewRequest(id="loymax-q1", columns=["card"], limit=100),
                                          timeout=20)
        found = sorted(r.values[0] for r in preview.rows if r.values[0].startswith("81"))
    assert found == sorted(card for card, (*_, inside) in population.items() if inside)
    assert run.member_count >= len(found)


def test_receipt_at_with_an_impossible_offset_is_invalid_argument_naming_it(server):
    with server.client(retries=0) as client:
        for at in ("2026-03-02T12:30:00+25:00", "2026-03-02T12:30:00+03:60", "2026-03-02T12:30:00-19:00"):
            for call in (client.calculate_receipt, client.confirm_purchase):
                with pytest.raises(LoyaltyError) as err:
                    call({"member": {"card": "7000001"}, "receipt": receipt(f"bad-{at}", at, 10000)})
                assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
                assert err.value.field == "receipt.at", err.value.message
        # the widest real offsets are fine
        for n, at in enumerate(("2026-03-02T12:30:00+14:00", "2026-03-02T12:30:00-12:00")):
            assert client.confirm_purchase({"member": {"card": "7000001"},
                                            "receipt": receipt(f"edge-{n}", at, 10000)}).purchase_id


def test_a_receipt_of_today_stays_pending_for_its_return_window(server):
    now = dt.datetime.now(dt.timezone(dt.timedelta(hours=3))).replace(microsecond=0)
    with server.client() as client:
        enroll(client, "8200001", "female", True)
        client.confirm_purchase({"member": {"card": "8200001"},
                                 "receipt": receipt("today-1", now.isoformat(), 3500000)})
        # 13 days ago: one more day to wait
        client.confirm_purchase({"member": {"card": "8200001"},
                                 "receipt": receipt("today-2", (now - dt.timedelta(days=13)).isoformat(), 100000)})
        # 15 days ago: past its window, active at once. The first receipt (35 000.00 >= 20 000.00) made the member
        # Silver, so these earn 5%: floor(100000 x 5 / 100 / 100) = 50 points each
        client.confirm_purchase({"member": {"card": "8200001"},
                                 "receipt": receipt("today-3", (now - dt.timedelta(days=15)).isoformat(), 100000)})
        m = client.get_member({"member": {"card": "8200001"}})
    assert (m.active_points, m.pending_points) == (50, 1050 + 50)


LIMITED = """
program: limits
accrual: {activation_days: 14, expiry_days: 365}
tiers: {levels: [{name: Basic, from: 0, accrual_percent: 3}]}
promotions:
  - id: once-a-month-10
    effect: {percent_off: 10}
    limits: {uses_per_member: 1, period: month}
"""


def test_usage_limits_count_in_the_receipts_own_periods(server):
    """A promotion usable once a month, with February's and March's receipts all confirmed in December: one use
    in February, one in March (by the receipts' local dates), none left for another February receipt: the
    periods come from the receipt, not from the server's clock."""
    with server.client() as client:
        client.publish_program({"yaml": LIMITED, "comment": "limits"})
        enroll(client, "8400001", "female", True)

        def discount(number: str, at: str) -> int:
            reply = client.confirm_purchase({"member": {"card": "8400001"}, "receipt": receipt(number, at, 100000)})
            return reply.answer.totals.discount

        # 10% of 1 000.00 = 100.00 (10000 kopecks) when the promotion applies
        assert discount("m-1", "2026-02-10T12:00:00+03:00") == 10000
        assert discount("m-2", "2026-02-27T12:00:00+03:00") == 0           # February's use is taken
        # 00:30 on 1 March in Moscow is still February in UTC: March by the receipt's local time
        assert discount("m-3", "2026-03-01T00:30:00+03:00") == 10000
        assert discount("m-4", "2026-03-31T23:00:00+03:00") == 0
        assert discount("m-5", "2026-04-01T09:00:00+03:00") == 10000


def test_a_till_clock_a_little_fast_is_taken_as_now_and_a_wrong_date_is_refused(server):
    with server.client(retries=0) as client:
        enroll(client, "8500001", "female", True)
        # five minutes ahead (a fast till): its points wait out the window from now, like a receipt of now
        ahead = client.confirm_purchase({"member": {"card": "8500001"},
                                         "receipt": receipt("fast-1", now_at(minutes=-5), 100000)})
        assert (ahead.answer.member.active_after, ahead.answer.member.pending_after) == (0, 30)
        # two days ahead: the till's date is wrong; nothing is written
        for call in (client.calculate_receipt, client.confirm_purchase):
            with pytest.raises(LoyaltyError) as err:
                call({"member": {"card": "8500001"}, "receipt": receipt("fast-2", now_at(days=-2), 100000)})
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.field == "receipt.at"
        m = client.get_member({"member": {"card": "8500001"}})
        assert (m.active_points, m.pending_points) == (0, 30)
