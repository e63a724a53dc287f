"""Operation limits on ConfirmPurchase through a real server, on SQLite and on PostgreSQL (where confirms go
through group commit, the server's default there): a hard limit refuses with FAILED_PRECONDITION naming the
limit (ErrorInfo and PreconditionFailure) and writes nothing; a soft limit lets the confirm through and
records it for ``loyalty limits list``; the day is the receipt's; a retried confirm replays and is not counted;
racing confirms of one card never pass a hard limit together.

The program of this module (the demo program plus):

    card_daily_confirms:          soft 2, hard 3
    card_daily_writeoff_points:   soft 100, hard 300
    terminal_confirms_per_minute: hard 4

Every test uses its own cards and terminals, so the figures below are worked out from that test's confirms
alone.
"""
from __future__ import annotations

import concurrent.futures
import json
import threading

import pytest

from helpers.security import enroll_with_points, new_card, receipt, rows
from helpers.storage import DEMO_PROGRAM
from loyalty.clients.client import LoyaltyError
from serverutil import cli, now_at

LIMITS = """
operation_limits:
  card_daily_confirms: {soft: 2, hard: 3}
  card_daily_writeoff_points: {soft: 100, hard: 300}
  terminal_confirms_per_minute: {hard: 4}
"""


@pytest.fixture(scope="module", autouse=True)
def limited_program(server):
    with server.client(retries=0, timeout=30) as c:
        c.publish_program({"yaml": DEMO_PROGRAM + LIMITS, "comment": "operation limits"})


def confirm(client, card: str | None, number: str, *, terminal: str, at: str | None = None, redeem: int = 0):
    request = {"receipt": receipt("msk-01", terminal, number, at or now_at(), redeem=redeem)}
    if card:
        request["member"] = {"card": card}
    return client.confirm_purchase(request)


def refused(client, *args, **kwargs) -> LoyaltyError:
    with pytest.raises(LoyaltyError) as err:
        confirm(client, *args, **kwargs)
    return err.value


def purchases_of(server, member_id: int) -> int:
    return rows(server.database_url, "SELECT count(*) AS n FROM purchases WHERE member_id = :m", m=member_id)[0]["n"]


def breaches(server, card: str) -> list[tuple]:
    listed = cli("limits", "list", "--server", server.target, "--json")
    assert listed.returncode == 0, listed.stderr
    return sorted((b["limit"], int(b["threshold"]), int(b["value"]), b["number"])
                  for b in json.loads(listed.stdout)["breaches"] if b["card"] == card)


def test_the_fourth_confirm_of_a_card_on_one_receipt_day_is_refused_and_writes_nothing(server, client):
    card = new_card()
    member_id = enroll_with_points(client, card, 1000)
    terminal = f"t-{card}"
    for n in range(3):                                  # 1, 2, 3 confirms: up to the hard limit of 3
        assert not confirm(client, card, f"c{n}", terminal=terminal).replayed
    before = client.get_member({"member": {"card": card}})
    err = refused(client, card, "c3", terminal=terminal)
    assert err.code.name == "FAILED_PRECONDITION"
    assert (err.reason, err.metadata["limit"], err.metadata["hard"], err.metadata["value"]) == \
        ("OPERATION_LIMIT", "card_daily_confirms", "3", "4")
    assert err.preconditions == [("OPERATION_LIMIT", "card_daily_confirms")]
    assert "card_daily_confirms" in err.message
    after = client.get_member({"member": {"card": card}})
    assert (after.active_points, after.pending_points, after.purchases_sum) == \
        (before.active_points, before.pending_points, before.purchases_sum)
    assert purchases_of(server, member_id) == 3
    assert rows(server.database_url, "SELECT count(*) AS n FROM purchases WHERE number = 'c3' AND terminal = :t",
                t=terminal) == [{"n": 0}]
    # the third confirm passed the soft limit of 2: recorded for review, once
    assert breaches(server, card) == [("card_daily_confirms", 2, 3, "c2")]
    # the day is the receipt's: a receipt of yesterday is another day's first confirm
    assert not confirm(client, card, "y0", terminal=terminal, at=now_at(days=1)).replayed


def test_a_retried_confirm_replays_and_is_not_counted_again(server, client):
    card = new_card()
    member_id = enroll_with_points(client, card, 1000)
    terminal = f"t-{card}"
    at = now_at()
    first = confirm(client, card, "r0", terminal=terminal, at=at)
    for _ in range(3):                                  # the till retries: the same key, the same payload
        again = confirm(client, card, "r0", terminal=terminal, at=at)
        assert again.replayed and again.purchase_id == first.purchase_id
    confirm(client, card, "r1", terminal=terminal)
    confirm(client, card, "r2", terminal=terminal)      # the third counted confirm: allowed
    assert purchases_of(server, member_id) == 3
    assert refused(client, card, "r3", terminal=terminal).metadata["limit"] == "card_daily_confirms"


def test_points_written_off_in_a_day_past_the_hard_limit_are_refused(server, client):
    card = new_card()
    enroll_with_points(client, card, 1000)
    terminal = f"t-{card}"
    confirm(client, card, "w0", terminal=terminal, redeem=200)       # 200: past the soft 100
    err = refused(client, card, "w1", terminal=terminal, redeem=150)  # 350 > 300
    assert (err.metadata["limit"], err.metadata["value"]) == ("card_daily_writeoff_points", "350")
    assert err.preconditions == [("OPERATION_LIMIT", "card_daily_writeoff_points")]
    assert client.get_member({"member": {"card": card}}).active_points == 800
    confirm(client, card, "w2", terminal=terminal, redeem=100)       # 300: at the hard limit, not past it
    assert client.get_member({"member": {"card": card}}).active_points == 700
    assert breaches(server, card) == [("card_daily_writeoff_points", 100, 200, "w0"),
                                      ("card_daily_writeoff_points", 100, 300, "w2")]


def test_a_terminal_confirming_faster_than_its_rate_is_refused(server, client):
    terminal = f"rate-{new_card()}"
    for n in range(4):                                  # anonymous receipts count for their terminal too
        confirm(client, None, f"a{n}", terminal=terminal)
    err = refused(client, None, "a4", terminal=terminal)
    assert (err.metadata["limit"], err.metadata["value"]) == ("terminal_confirms_per_minute", "5")
    assert rows(server.database_url, "SELECT count(*) AS n FROM purchases WHERE terminal = :t", t=terminal) == \
        [{"n": 4}]
    confirm(client, None, "a4", terminal=terminal + "-next")   # another till of the store is not limited by it


def test_racing_confirms_of_one_card_never_pass_the_hard_limit_together(server, client):
    card = new_card()
    member_id = enroll_with_points(client, card, 1000)
    barrier = threading.Barrier(8)

    def one(n: int):
        barrier.wait()
        try:
            # a terminal each: only the card's limit is in play
            return confirm(client, card, f"race{n}", terminal=f"t-{card}-{n}")
        except LoyaltyError as exc:
            return exc
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(one, range(8)))
    refusals = [o for o in outcomes if isinstance(o, LoyaltyError)]
    assert len(refusals) == 5 and {(e.code.name, e.metadata["limit"]) for e in refusals} == \
        {("FAILED_PRECONDITION", "card_daily_confirms")}
    assert purchases_of(server, member_id) == 3


def test_racing_confirms_at_one_terminal_never_pass_its_rate_together(server, client):
    terminal = f"race-{new_card()}"
    barrier = threading.Barrier(8)

    def one(n: int):
        barrier.wait()
        try:
            return confirm(client, None, f"t{n}", terminal=terminal)     # anonymous: no member lock orders them
        except LoyaltyError as exc:
            return exc
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(one, range(8)))
    refusals = [o for o in outcomes if isinstance(o, LoyaltyError)]
    assert len(refusals) == 4 and {e.metadata["limit"] for e in refusals} == {"terminal_confirms_per_minute"}
    assert rows(server.database_url, "SELECT count(*) AS n FROM purchases WHERE terminal = :t", t=terminal) == \
        [{"n": 4}]


def test_limits_in_the_program_file_are_validated_with_their_path(server, client):
    bad = DEMO_PROGRAM + "\noperation_limits:\n  card_daily_confirms: {soft: 5, hard: 5}\n"
    with pytest.raises(LoyaltyError) as err:
        client.publish_program({"yaml": bad})
    assert (err.value.code.name, err.value.field) == ("INVALID_ARGUMENT", "operation_limits.card_daily_confirms.soft")
    unknown = DEMO_PROGRAM + "\noperation_limits:\n  card_weekly_confirms: {hard: 5}\n"
    with pytest.raises(LoyaltyError) as err:
        client.publish_program({"yaml": unknown})
    assert err.value.field == "operation_limits.card_weekly_confirms"
