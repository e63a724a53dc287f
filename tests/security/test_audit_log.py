"""The audit log through a real server, on SQLite and PostgreSQL: every admin change and manual points operation
leaves one row (actor, RPC, target, the request's digest, outcome) written with the change; a retried
adjustment leaves no second row; refused admin calls leave a row with their status and change nothing; the
table refuses UPDATE and DELETE; ``ListAudit`` pages and ``loyalty audit list`` filters.

Digests are worked out here from the request the test sent (sha256 of its deterministic protobuf encoding),
not read back from the server's code.
"""
from __future__ import annotations

import datetime as dt
import json

import grpc
import pytest
from sqlalchemy.exc import DBAPIError

from helpers.security import enroll_with_points, execute, new_card, rows, sha256_of
from helpers.storage import DEMO_PROGRAM
from loyalty.clients.client import LoyaltyError, build_request
from loyalty.v1 import segments_pb2, segments_pb2_grpc
from serverutil import cli


def entries(client, **filters) -> list:
    """Every row of the audit log (all pages of ListAudit)."""
    out, token = [], ""
    while True:
        page = client.list_audit({**filters, "page_size": 50, "page_token": token})
        out += page.entries
        token = page.next_page_token
        if not token:
            return out


def with_digest(client, digest: str) -> list:
    return [e for e in entries(client) if e.digest == digest]


def test_a_points_adjustment_is_one_row_and_its_retry_adds_none(server, client):
    card = new_card()
    member_id = enroll_with_points(client, card)
    request = build_request("adjust_points", {"member": {"card": card}, "kind": "credit", "points": 250,
                                              "reason": "goodwill for a late delivery",
                                              "operation_id": f"gw-{member_id}"})
    first = client.adjust_points(request)
    again = client.adjust_points(request)
    assert (first.replayed, again.replayed) == (False, True)
    [row] = with_digest(client, sha256_of(request))
    assert (row.actor, row.actor_kind, row.rpc, row.outcome) == ("local", "local", "AdjustPoints", "OK")
    assert row.target == f"member:{member_id} operation:gw-{member_id}"
    assert dt.datetime.fromisoformat(row.at) > dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    # the card number is not in the append-only log (an erasure must be able to remove it everywhere)
    assert card not in row.target and card not in row.detail


def test_card_status_and_a_program_publication_are_recorded(server, client):
    card = new_card()
    member_id = enroll_with_points(client, card)
    status = build_request("set_card_status", {"card": card, "status": "blocked", "reason": "card reported stolen"})
    client.set_card_status(status)
    # a changed file: publishing the live one again makes no version (and changes nothing to audit)
    publish = build_request("publish_program", {"yaml": DEMO_PROGRAM + "\n# audited\n", "comment": "audit test"})
    version = client.publish_program(publish).version
    [status_row] = with_digest(client, sha256_of(status))
    assert (status_row.rpc, status_row.target) == ("SetCardStatus", f"member:{member_id} status:active->blocked")
    [publish_row] = with_digest(client, sha256_of(publish))
    assert (publish_row.rpc, publish_row.target, publish_row.outcome) == ("PublishProgram", f"program:{version}",
                                                                           "OK")


def test_segment_changes_are_recorded(server, client):
    card = new_card()
    member_id = enroll_with_points(client, card)
    create = segments_pb2.DefineSegmentRequest(id=f"vip{card}", title="VIP", type="static")
    add = segments_pb2.ChangeMembersRequest(id=f"vip{card}", members=[card], actor="crm")
    with grpc.insecure_channel(server.target) as channel:
        stub = segments_pb2_grpc.SegmentsStub(channel)
        stub.CreateSegment(create, timeout=30)
        assert stub.AddMembers(add, timeout=30).changed == 1
    [created] = with_digest(client, sha256_of(create))
    [added] = with_digest(client, sha256_of(add))
    assert (created.rpc, created.target, created.outcome) == ("CreateSegment", f"segment:vip{card}", "OK")
    assert (added.rpc, added.target, added.outcome) == ("AddMembers", f"segment:vip{card}", "OK")
    assert member_id  # the member is named by the segment's membership, not in the row


def test_refused_admin_calls_are_recorded_with_their_status_and_change_nothing(server, client):
    card = new_card()
    member_id = enroll_with_points(client, card, 100)
    refused = {
        # unknown member
        "NOT_FOUND": build_request("adjust_points", {"member": {"card": "00000000"}, "kind": "credit",
                                                     "points": 5, "reason": "r", "operation_id": f"nf-{card}"}),
        # a bad argument, named by its field
        "INVALID_ARGUMENT": build_request("adjust_points", {"member": {"card": card}, "kind": "credit",
                                                            "points": 0, "reason": "r", "operation_id": f"ia-{card}"}),
        # more than the 100 points the member has
        "FAILED_PRECONDITION": build_request("adjust_points", {"member": {"card": card}, "kind": "debit",
                                                               "points": 101, "reason": "r",
                                                               "operation_id": f"fp-{card}"}),
    }
    for status, request in refused.items():
        with pytest.raises(LoyaltyError) as err:
            client.adjust_points(request)
        assert err.value.code.name == status
        [row] = with_digest(client, sha256_of(request))
        assert (row.rpc, row.outcome, row.actor) == ("AdjustPoints", status, "local")
        assert row.target == f"operation:{request.operation_id}"
        # the message, but for the member's card: the audit log outlives an erasure
        assert row.detail == err.value.message.replace("00000000", "<member>").replace(card, "<member>")
        assert "00000000" not in row.detail and card not in row.detail
    # a phone as a till formats it is quoted back normalised: neither form stays in the log
    unknown_phone = build_request("adjust_points", {"member": {"phone": "+7 (955) 000-12-34"}, "kind": "credit",
                                                    "points": 5, "reason": "r", "operation_id": f"ph-{card}"})
    with pytest.raises(LoyaltyError) as err:
        client.adjust_points(unknown_phone)
    assert err.value.code.name == "NOT_FOUND" and "+79550001234" in err.value.message
    [row] = with_digest(client, sha256_of(unknown_phone))
    assert "+79550001234" not in row.detail and "955" not in row.detail and "<member>" in row.detail
    assert client.get_member({"member": {"card": card}}).active_points == 100
    assert rows(server.database_url, "SELECT count(*) AS n FROM operations WHERE member_id = :m",
                m=member_id) == [{"n": 1}]      # the opening credit only


_OVERWRITE = {   # a row written over in place: SQLite's REPLACE, PostgreSQL's upsert
    "sqlite": "INSERT OR REPLACE INTO audit_log (id, at, actor, actor_kind, rpc, target, digest, outcome, detail) "
              "SELECT min(id), at, 'x', 'x', 'x', 'x', 'x', 'x', 'x' FROM audit_log",
    "postgresql": "INSERT INTO audit_log (id, at, actor, actor_kind, rpc, target, digest, outcome, detail) "
                  "SELECT min(id), min(at), 'x', 'x', 'x', 'x', 'x', 'x', 'x' FROM audit_log "
                  "ON CONFLICT (id) DO UPDATE SET actor = 'x'",
}


@pytest.mark.parametrize("statement", ["UPDATE audit_log SET actor = 'someone else'", "DELETE FROM audit_log",
                                       "overwrite"])
def test_the_audit_log_refuses_updates_and_deletes(server, client, statement):
    enroll_with_points(client, new_card(), 10)
    before = rows(server.database_url, "SELECT * FROM audit_log ORDER BY id")
    assert before
    if statement == "overwrite":
        statement = _OVERWRITE["sqlite" if server.database_url.startswith("sqlite") else "postgresql"]
    with pytest.raises(DBAPIError, match="append-only"):
        execute(server.database_url, statement)
    assert rows(server.database_url, "SELECT * FROM audit_log ORDER BY id") == before


def test_list_audit_pages_through_every_row_once(server, client):
    for _ in range(3):
        enroll_with_points(client, new_card(), 10)
    everything = entries(client)
    paged, token = [], ""
    while True:
        page = client.list_audit({"page_size": 2, "page_token": token})
        assert len(page.entries) <= 2
        paged += page.entries
        token = page.next_page_token
        if not token:
            break
    assert [e.id for e in paged] == [e.id for e in everything] == sorted({e.id for e in everything})
    with pytest.raises(LoyaltyError) as err:
        client.list_audit({"page_token": "not-a-token"})
    assert (err.value.code.name, err.value.field) == ("INVALID_ARGUMENT", "page_token")
    assert "not a page token of this list" in err.value.message             # as every list says it
    # as every list: a page of more than 1000 is capped, not refused; a negative one is refused
    assert [e.id for e in client.list_audit({"page_size": 5000}).entries] == [e.id for e in everything]
    with pytest.raises(LoyaltyError) as err:
        client.list_audit({"page_size": -1})
    assert err.value.field == "page_size" and "must not be negative" in err.value.message


def test_loyalty_audit_list_filters_by_actor_and_time(server, client):
    enroll_with_points(client, new_card(), 10)
    listed = cli("audit", "list", "--server", server.target, "--json")
    assert listed.returncode == 0, listed.stderr
    all_rows = json.loads(listed.stdout)
    assert all_rows and {r["actor"] for r in all_rows} == {"local"}
    assert [int(r["id"]) for r in all_rows] == [e.id for e in entries(client)]
    assert json.loads(cli("audit", "list", "--server", server.target, "--json", "--actor", "nobody").stdout) == []
    tomorrow = (dt.date.today() + dt.timedelta(days=2)).isoformat()
    assert json.loads(cli("audit", "list", "--server", server.target, "--json", "--since", tomorrow).stdout) == []
    bad = cli("audit", "list", "--server", server.target, "--since", "last tuesday")
    assert bad.returncode == 2 and "since" in bad.stderr and "Traceback" not in bad.stderr


def test_the_cli_on_the_database_audits_as_the_server_does(server, client):
    url = server.database_url
    unknown = cli("member", "erase", "00000002", "--reason", "GDPR request #7", "--database-url", url)
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr and "Traceback" not in unknown.stderr
    request = build_request("erase_member", {"card": "00000002", "reason": "GDPR request #7"})
    [row] = with_digest(client, sha256_of(request))
    assert (row.rpc, row.outcome, row.actor, row.actor_kind) == ("EraseMember", "NOT_FOUND", "local", "local")
    listed = cli("audit", "list", "--database-url", url, "--json")
    assert listed.returncode == 0, listed.stderr
    assert [int(r["id"]) for r in json.loads(listed.stdout)] == [e.id for e in entries(client)]
