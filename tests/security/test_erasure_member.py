"""Personal data through a real server, on SQLite and PostgreSQL: ``ExportMember`` / ``loyalty member export``
gives every part of what is held about one member; ``EraseMember`` / ``loyalty member erase`` removes the
profile, contacts and card numbers everywhere while the ledger, purchases and balances stay (``loyalty ledger
check`` passes and the liability does not move), is audited once, and answers a repeated request as the same
erasure.

The member of each test: enrolled with a full profile and an e-mail subscription, 1000 points credited, one
purchase of two lines paying 100 points, in a static segment that is tagged, and greeted by the welcome
scenario (one run, one e-mail, delivered by ``loyalty worker --once``).
"""
from __future__ import annotations

import json
import pathlib

import grpc
import pytest

from helpers.security import enroll_with_points, new_card, rows
from loyalty.clients.client import LoyaltyError
from loyalty.v1 import scenarios_pb2, scenarios_pb2_grpc, segments_pb2, segments_pb2_grpc
from serverutil import cli, now_at

WELCOME = (pathlib.Path(__file__).resolve().parents[2] / "server" / "scenarios" / "examples" / "welcome.yaml")


@pytest.fixture(scope="module", autouse=True)
def welcome_scenario(server):
    with grpc.insecure_channel(server.target) as channel:
        scenarios_pb2_grpc.ScenariosStub(channel).CreateScenario(
            scenarios_pb2.ScenarioDefinition(yaml=WELCOME.read_text()), timeout=30)


def rich_member(server, client) -> dict:
    card = new_card()
    phone = f"+7{card}00"
    member_id = enroll_with_points(client, card, 1000)
    client.update_member({"member": {"card": card}, "phone": phone, "subscriptions": {"email": True},
                          "first_name": "Olga", "last_name": "Kuznetsova", "email": f"o{card}@example.org",
                          "birth_date": "1985-02-03", "city": "Tver", "custom": {"pet": "cat"}})
    bought = client.confirm_purchase({"member": {"card": card}, "receipt": {
        "store": "msk-01", "terminal": "pos-e", "number": f"e-{member_id}", "channel": "pos", "at": now_at(),
        "redeem_points": 100, "lines": [
            {"sku": "milk-1l", "categories": ["dairy"], "quantity": 2000, "price": 8990},
            {"sku": "coffee-beans-1kg", "categories": ["coffee"], "quantity": 1000, "price": 89900}]}})
    segment, tag = f"seg{card}", f"tag{card}"
    with grpc.insecure_channel(server.target) as channel:
        stub = segments_pb2_grpc.SegmentsStub(channel)
        stub.CreateSegment(segments_pb2.DefineSegmentRequest(id=segment, type="static"), timeout=30)
        stub.AddMembers(segments_pb2.ChangeMembersRequest(id=segment, members=[card]), timeout=30)
        stub.SetTag(segments_pb2.SetTagRequest(id=segment, tag=tag), timeout=30)
    worker = cli("worker", "--once", "--database-url", server.database_url, timeout=120)
    assert worker.returncode == 0, worker.stderr
    return {"card": card, "phone": phone, "member_id": member_id, "segment": segment, "tag": tag,
            "purchase_id": bought.purchase_id, "redeemed": bought.answer.totals.redeemed_points}


def liability_figures(output: str) -> dict:
    """``loyalty ledger liability --json`` without the moment it was computed at."""
    figures = json.loads(output)
    del figures["at"]
    return figures


def test_export_holds_every_part_of_what_is_kept_about_the_member(server, client):
    m = rich_member(server, client)
    exported = cli("member", "export", m["card"], "--server", server.target)
    assert exported.returncode == 0, exported.stderr
    doc = json.loads(exported.stdout)
    assert doc["member_id"] == m["member_id"]
    profile = doc["profile"]
    assert (profile["first_name"], profile["last_name"], profile["phone"], profile["city"], profile["custom"]) == \
        ("Olga", "Kuznetsova", m["phone"], "Tver", {"pet": "cat"})
    assert profile["birth_date"] == "1985-02-03" and profile["email"] == f"o{m['card']}@example.org"
    assert [c["number"] for c in doc["cards"]] == [m["card"]]
    assert [(s["channel"], s["on"]) for s in doc["subscriptions"]] == [("email", True)]
    assert m["redeemed"] == 100 and doc["balance"]["active"] == 1000 - 100
    assert {e["kind"] for e in doc["ledger"]} == {"adjustment", "redemption", "accrual"}
    assert sum(e["active_delta"] for e in doc["ledger"]) == 900
    assert doc["point_lots"] and doc["operations"][0]["reason"] == "test opening balance"
    [purchase] = doc["purchases"]
    assert (str(purchase["id"]), purchase["redeemed_points"]) == (m["purchase_id"], 100)
    assert [(ln["sku"], ln["quantity"]) for ln in purchase["lines"]] == [("milk-1l", 2000), ("coffee-beans-1kg", 1000)]
    assert [s["segment_id"] for s in doc["segments"]] == [m["segment"]]
    assert [t["tag"] for t in doc["tags"]] == [m["tag"]]
    assert [r["scenario_id"] for r in doc["scenario_runs"]] == ["welcome"]
    [message] = doc["scenario_messages"]
    assert message["channel"] == "email" and "Olga" in message["body"]
    assert {"member_registered", "purchase_confirmed"} <= {e["kind"] for e in doc["events"]}
    # who read it is audited
    [row] = [e for e in client.list_audit({"page_size": 1000}).entries if e.rpc == "ExportMember"
             and e.target == f"member:{m['member_id']}"]
    assert row.outcome == "OK"


def test_erasure_removes_personal_data_and_keeps_the_books(server, client):
    m = rich_member(server, client)
    url, card, member_id = server.database_url, m["card"], m["member_id"]
    liability = cli("ledger", "liability", "--database-url", url, "--json")
    assert liability.returncode == 0, liability.stderr
    kept = {table: rows(url, f"SELECT count(*) AS n FROM {table} WHERE member_id = :m", m=member_id)
            for table in ("ledger", "point_lots", "purchases", "operations", "segment_members", "member_tags")}
    balance = rows(url, "SELECT active, pending, purchases_sum, tier FROM balances WHERE member_id = :m", m=member_id)

    done = client.erase_member({"card": card, "reason": "GDPR request #42"})
    assert (done.member_id, done.replayed, done.cards) == (str(member_id), False, 1)

    for ref in ({"card": card}, {"phone": m["phone"]}):
        with pytest.raises(LoyaltyError) as err:
            client.get_member({"member": ref})
        assert err.value.code.name == "NOT_FOUND"
    [profile] = rows(url, "SELECT * FROM members WHERE id = :m", m=member_id)
    custom = profile["custom"] if isinstance(profile["custom"], dict) else json.loads(profile["custom"])
    assert (profile["phone"], profile["first_name"], profile["last_name"], profile["gender"], profile["email"],
            profile["city"], profile["birth_date"], custom) == (None, "", "", "", "", "", None, {})
    [card_row] = rows(url, "SELECT id, number FROM cards WHERE member_id = :m", m=member_id)
    assert card_row["number"] == f"erased:{card_row['id']}"
    assert rows(url, "SELECT DISTINCT card FROM purchases WHERE member_id = :m", m=member_id) == \
        [{"card": card_row["number"]}]
    for table, column in (("events", "payload"), ("member_updates", "changes"), ("scenario_outbox", "payload"),
                          ("scenario_runs", "context")):
        for row in rows(url, f"SELECT {column} AS v FROM {table} WHERE member_id = :m", m=member_id):
            text = row["v"] if isinstance(row["v"], str) else json.dumps(row["v"])
            assert card not in text and "Olga" not in text and m["phone"] not in text, (table, text)
    assert rows(url, "SELECT recipient, body FROM scenario_outbox WHERE member_id = :m", m=member_id) == \
        [{"recipient": "", "body": ""}]
    assert {r["on"] for r in rows(url, "SELECT \"on\" FROM subscriptions WHERE member_id = :m", m=member_id)} \
        in ({False}, {0})
    # the books: every row kept, the balance as it was, the ledger agrees, the liability has not moved
    assert {t: rows(url, f"SELECT count(*) AS n FROM {t} WHERE member_id = :m", m=member_id) for t in kept} == kept
    assert rows(url, "SELECT active, pending, purchases_sum, tier FROM balances WHERE member_id = :m",
                m=member_id) == balance
    check = cli("ledger", "check", "--database-url", url)
    assert check.returncode == 0, check.stdout + check.stderr
    assert liability_figures(cli("ledger", "liability", "--database-url", url, "--json").stdout) == \
        liability_figures(liability.stdout)

    # the same request again: the same erasure, nothing more done, audited once
    again = cli("member", "erase", card, "--reason", "GDPR request #42", "--server", server.target, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["replayed"] is True
    assert client.erase_member({"card": card, "reason": "retry"}).erased_at == done.erased_at
    audited = [e for e in client.list_audit({"page_size": 1000}).entries if e.rpc == "EraseMember"]
    assert [(e.target, e.outcome) for e in audited] == [(f"member:{member_id}", "OK")]
    with pytest.raises(LoyaltyError) as err:
        client.export_member({"card": card})
    assert err.value.code.name == "NOT_FOUND"


def test_erasure_needs_a_reason_and_a_known_card(server, client):
    card = new_card()
    enroll_with_points(client, card)
    no_reason = cli("member", "erase", card, "--reason", " ", "--server", server.target)
    assert no_reason.returncode == 2 and "reason" in no_reason.stderr and "Traceback" not in no_reason.stderr
    assert client.get_member({"member": {"card": card}}).card == card     # nothing was erased
    with pytest.raises(LoyaltyError) as err:
        client.erase_member({"card": "00000001", "reason": "GDPR request #43"})
    assert err.value.code.name == "NOT_FOUND" and "00000001" in err.value.message
    # the refusal is audited, without the card it named (the audit log outlives an erasure)
    [refused] = rows(server.database_url, "SELECT detail FROM audit_log WHERE rpc = 'EraseMember' "
                                          "AND outcome = 'NOT_FOUND'")
    assert "00000001" not in refused["detail"] and "<member>" in refused["detail"]


def test_erasure_reaches_the_anonymous_purchases_of_a_suspended_card(server, client):
    card = new_card()
    member_id = enroll_with_points(client, card)
    client.set_card_status({"card": card, "status": "suspended", "reason": "lost"})
    bought = client.confirm_purchase({"member": {"card": card}, "receipt": {
        "store": "msk-01", "terminal": "pos-s", "number": f"s-{member_id}", "channel": "pos", "at": now_at(),
        "lines": [{"sku": "milk-1l", "categories": ["dairy"], "quantity": 1000, "price": 8990}]}})
    url = server.database_url
    # a suspended card buys anonymously: the purchase has no member, but keeps the card it was made with
    assert rows(url, "SELECT member_id, card FROM purchases WHERE id = :p", p=int(bought.purchase_id)) == \
        [{"member_id": None, "card": card}]
    client.erase_member({"card": card, "reason": "GDPR request #44"})
    [purchase] = rows(url, "SELECT card FROM purchases WHERE id = :p", p=int(bought.purchase_id))
    assert purchase["card"].startswith("erased:")
    [event] = rows(url, "SELECT payload FROM events WHERE key = :k", k=f"purchase_confirmed:{bought.purchase_id}")
    payload = event["payload"] if isinstance(event["payload"], str) else json.dumps(event["payload"])
    assert card not in payload and purchase["card"] in payload


def test_an_erased_card_marker_names_no_one_and_a_retry_gets_no_personal_data(server, client):
    """The marker ``erased:<card id>`` is no card a request may name (look-up, points, status, enrolment,
    erasure, export), so the erased member cannot be found or written to through it; a confirm retried after
    the erasure replays an answer without the card or phone; the enrolment's request id is gone."""
    card = new_card()
    phone = f"+7{card}01"
    member_id = enroll_with_points(client, card, 500)
    client.update_member({"member": {"card": card}, "phone": phone, "first_name": "Anna"})
    receipt = {"store": "msk-01", "terminal": "pos-m", "number": f"m-{member_id}", "channel": "pos", "at": now_at(),
               "lines": [{"sku": "milk-1l", "categories": ["dairy"], "quantity": 1000, "price": 8990}]}
    first = client.confirm_purchase({"member": {"card": card, "phone": phone}, "receipt": receipt})
    assert first.answer.member.card == card
    client.erase_member({"card": card, "reason": "GDPR request #45"})
    url = server.database_url
    [marker] = [r["number"] for r in rows(url, "SELECT number FROM cards WHERE member_id = :m", m=member_id)]
    calls = [
        lambda: client.get_member({"member": {"card": marker}}),
        lambda: client.get_member({"member": {"card": marker.upper()}}),
        lambda: client.adjust_points({"member": {"card": marker}, "kind": "credit", "points": 10,
                                      "reason": "marker", "operation_id": f"marker-{member_id}"}),
        lambda: client.update_member({"member": {"card": marker}, "first_name": "Back"}),
        lambda: client.set_card_status({"card": marker, "status": "blocked", "reason": "marker"}),
        lambda: client.confirm_purchase({"member": {"card": marker}, "receipt": {**receipt, "number": "m2"}}),
        lambda: client.enroll_member({"card": f"erased:{10**9}"}),
        lambda: client.erase_member({"card": marker, "reason": "again"}),
        lambda: client.export_member({"card": marker}),
    ]
    for call in calls:
        with pytest.raises(LoyaltyError) as err:
            call()
        assert err.value.code.name == "INVALID_ARGUMENT" and "erased" in str(err.value), err.value
    assert rows(url, "SELECT first_name, enroll_request_id FROM members WHERE id = :m", m=member_id) == \
        [{"first_name": "", "enroll_request_id": None}]
    assert len(rows(url, "SELECT card_digest FROM member_erasures WHERE member_id = :m", m=member_id)) == 1
    # the same confirm again (the till never got the answer): the books, not the person
    again = client.confirm_purchase({"member": {"card": card, "phone": phone}, "receipt": receipt})
    assert again.replayed and again.purchase_id == first.purchase_id
    assert again.answer.member.card == marker and card not in str(again) and phone not in str(again)
    for row in rows(url, "SELECT answer AS v FROM purchases WHERE member_id = :m", m=member_id):
        text = row["v"] if isinstance(row["v"], str) else json.dumps(row["v"])
        assert card not in text and phone not in text, text
