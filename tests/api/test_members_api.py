"""Members over gRPC and the CLI, on SQLite and on PostgreSQL: keyed operations retried many times at once
(one effect, every answer the first one's), the profile and subscriptions segments use (enrolled and
updated), a card and a phone of two members in one reference, a reason for every adjustment, and errors
about huge values that a default gRPC client can still read.
"""
from __future__ import annotations

import concurrent.futures
import json

import grpc
import pytest
from sqlalchemy import create_engine, text

from loyalty.clients.client import LoyaltyError
from serverutil import BACKENDS, cli, server_on

AT = "2026-03-02T12:30:00+03:00"
# Default gRPC clients refuse trailers (metadata) over 8 KiB; a status must stay well under that.
TRAILER_BUDGET = 4096


@pytest.fixture(scope="module", params=BACKENDS)
def server(request, tmp_path_factory):
    with server_on(request.param, tmp_path_factory.mktemp(f"members-{request.param}")) as srv:
        yield srv


@pytest.fixture
def client(server):
    with server.client(retries=0, timeout=30) as c:
        yield c


def scalar(server, sql: str, **params):
    engine = create_engine(server.database_url)
    try:
        with engine.connect() as conn:
            return conn.execute(text(sql), params).scalar()
    finally:
        engine.dispose()


def at_once(n: int, fn):
    """``fn()`` from ``n`` threads released together; the answers (or the LoyaltyErrors) in order."""
    import threading
    barrier = threading.Barrier(n)

    def run(_):
        barrier.wait()
        try:
            return fn()
        except LoyaltyError as exc:
            return exc
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


def same_but_replayed(message):
    """A response without its ``replayed`` flag, for comparing a first answer with its replays."""
    copy = type(message)()
    copy.CopyFrom(message)
    if "replayed" in copy.DESCRIPTOR.fields_by_name:
        copy.replayed = False
    return copy


def coffee(number: str) -> dict:
    return {"store": "msk-01", "terminal": "pos-m", "number": number, "channel": "pos", "at": AT,
            "lines": [{"sku": "coffee-beans-1kg", "categories": ["coffee"], "quantity": 1000, "price": 89900}]}


# ---- keyed operations retried at once ----------------------------------------------------------------------

def test_twenty_identical_enrolments_at_once_are_one_member_and_twenty_equal_answers(server):
    request = {"card": "8100001", "phone": "+79008100001", "request_id": "enroll-8100001", "source": "form",
               "subscriptions": {"email": True}, "profile": {"city": "Moscow", "gender": "female"}}
    with server.client(retries=0, timeout=30) as c:
        answers = at_once(20, lambda: c.enroll_member(request))
    errors = [a for a in answers if isinstance(a, LoyaltyError)]
    assert errors == []
    assert all(a == answers[0] for a in answers)
    assert answers[0].card == "8100001" and answers[0].profile.city == "Moscow"
    assert scalar(server, "SELECT count(*) FROM members WHERE enroll_request_id = 'enroll-8100001'") == 1
    assert scalar(server, "SELECT count(*) FROM events WHERE kind = 'member_registered' AND member_id = :m",
                  m=int(answers[0].member_id)) == 1


def test_twenty_identical_adjustments_at_once_are_one_operation(server):
    with server.client(retries=0, timeout=30) as c:
        c.enroll_member({"card": "8100002", "request_id": "enroll-8100002"})
        request = {"member": {"card": "8100002"}, "kind": "credit", "points": 70, "reason": "goodwill",
                   "operation_id": "adjust-8100002"}
        answers = at_once(20, lambda: c.adjust_points(request))
        assert [a for a in answers if isinstance(a, LoyaltyError)] == []
        assert sum(not a.replayed for a in answers) == 1
        assert all(same_but_replayed(a) == same_but_replayed(answers[0]) for a in answers)
        assert answers[0].active_points == 70
        assert c.get_member({"member": {"card": "8100002"}}).active_points == 70
    assert scalar(server, "SELECT count(*) FROM ledger WHERE operation_id = 'adjust-8100002'") == 1


def test_twenty_identical_card_status_changes_at_once_are_one_change(server):
    with server.client(retries=0, timeout=30) as c:
        c.enroll_member({"card": "8100003", "request_id": "enroll-8100003", "subscriptions": {"sms": True}})
        answers = at_once(20, lambda: c.set_card_status({"card": "8100003", "status": "blocked",
                                                         "reason": "lost"}))
        assert [a for a in answers if isinstance(a, LoyaltyError)] == []
        assert all(a == answers[0] for a in answers)
        assert answers[0].status == "blocked" and dict(answers[0].subscriptions) == {"sms": False}
        # back to active restores exactly what was on, once
        assert dict(c.set_card_status({"card": "8100003", "status": "active"}).subscriptions) == {"sms": True}
    assert scalar(server, "SELECT count(*) FROM events WHERE kind = 'card_status_changed' AND member_id = "
                          "(SELECT member_id FROM cards WHERE number = '8100003')") == 2


def test_twenty_identical_member_updates_at_once_are_one_change(server):
    with server.client(retries=0, timeout=30) as c:
        c.enroll_member({"card": "8100004", "request_id": "enroll-8100004"})
        request = {"member": {"card": "8100004"}, "city": "Kazan", "custom": {"pet": "cat"},
                   "subscriptions": {"push": True}, "request_id": "update-8100004"}
        answers = at_once(20, lambda: c.update_member(request))
    assert [a for a in answers if isinstance(a, LoyaltyError)] == []
    assert all(a == answers[0] for a in answers)
    assert answers[0].profile.city == "Kazan" and dict(answers[0].subscriptions) == {"push": True}
    assert scalar(server, "SELECT count(*) FROM member_updates WHERE request_id = 'update-8100004'") == 1


def test_twenty_identical_phone_changes_found_by_that_phone_at_once_are_one_change(server):
    """Each call finds the member by the phone the first one changes: the others must replay, not miss it."""
    with server.client(retries=0, timeout=30) as c:
        c.enroll_member({"card": "8100005", "phone": "+79008100005", "request_id": "enroll-8100005"})
        request = {"member": {"phone": "+79008100005"}, "phone": "+79008100006", "request_id": "phone-8100005"}
        answers = at_once(20, lambda: c.update_member(request))
    assert [a for a in answers if isinstance(a, LoyaltyError)] == []
    assert all(a == answers[0] for a in answers) and answers[0].phone == "+79008100006"
    assert scalar(server, "SELECT count(*) FROM member_updates WHERE request_id = 'phone-8100005'") == 1


# ---- the profile and subscriptions -------------------------------------------------------------------------

def test_enrol_with_the_profile_segments_use_then_update_and_clear_it(client):
    m = client.enroll_member({
        "card": "8100010", "phone": "+7 900 810-00-10", "source": "import", "registered_at": "2024-05-01",
        "subscriptions": {"email": True, "sms": False},
        "profile": {"first_name": "Anna", "gender": "female", "birth_date": "1990-05-01", "city": "Moscow",
                    "email": "anna@example.com", "custom": {"pet": "cat"}}})
    assert (m.phone, m.source, m.registered_at) == ("+79008100010", "import", "2024-05-01T00:00:00+00:00")
    assert (m.profile.gender, m.profile.birth_date, m.profile.city) == ("female", "1990-05-01", "Moscow")
    assert dict(m.profile.custom) == {"pet": "cat"} and dict(m.subscriptions) == {"email": True, "sms": False}

    m = client.update_member({"member": {"phone": "+79008100010"}, "city": "Kazan", "birth_date": "",
                              "phone": "+79008100011", "custom": {"size": "M"}, "clear_custom": ["pet"],
                              "subscriptions": {"email": False, "sms": True}})
    assert (m.card, m.phone, m.profile.city, m.profile.birth_date) == ("8100010", "+79008100011", "Kazan", "")
    assert (m.profile.gender, m.profile.first_name) == ("female", "Anna")           # not given: unchanged
    assert dict(m.profile.custom) == {"size": "M"} and dict(m.subscriptions) == {"email": False, "sms": True}
    assert (m.source, m.registered_at) == ("import", "2024-05-01T00:00:00+00:00")
    assert client.get_member({"member": {"phone": "+79008100011"}}).card == "8100010"


def test_update_refuses_another_members_phone_and_a_reused_request_id(client):
    client.enroll_member({"card": "8100020", "phone": "+79008100020"})
    client.enroll_member({"card": "8100021", "phone": "+79008100021"})
    with pytest.raises(LoyaltyError) as err:
        client.update_member({"member": {"card": "8100021"}, "phone": "+7 900 810 00 20"})
    assert err.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert err.value.field == "phone" and "+79008100020" in err.value.message
    client.update_member({"member": {"card": "8100021"}, "city": "Omsk", "request_id": "u-8100021"})
    with pytest.raises(LoyaltyError) as err:
        client.update_member({"member": {"card": "8100021"}, "city": "Tver", "request_id": "u-8100021"})
    assert err.value.code == grpc.StatusCode.ALREADY_EXISTS and err.value.field == "request_id"
    assert client.get_member({"member": {"card": "8100021"}}).profile.city == "Omsk"


@pytest.mark.parametrize(("request_fields", "field"), [
    ({"email": "not-an-email"}, "email"),
    ({"phone": "call me"}, "phone"),
    ({"gender": "F"}, "gender"),
    ({"birth_date": "01.05.1990"}, "birth_date"),
    ({"city": "x" * 101}, "city"),
    ({"custom": {"": "x"}}, "custom"),
    ({"custom": {"pet": "x" * 1001}}, "custom['pet']"),
    ({"subscriptions": {"c" * 33: True}}, "subscriptions"),
    ({"custom": {"pet": "dog"}, "clear_custom": ["pet"]}, "clear_custom[0]"),
    ({"member": {"card": ""}, "city": "Omsk"}, "member.card"),
])
def test_update_names_the_bad_field(client, request_fields, field):
    client.enroll_member({"card": "8100030", "request_id": "enroll-8100030"})
    with pytest.raises(LoyaltyError) as err:
        client.update_member({"member": {"card": "8100030"}, **request_fields})
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.field == field


def test_enrol_names_bad_fields_and_refuses_a_registration_in_the_future(client):
    for request, field in (({"card": "8100040", "registered_at": "2999-01-01"}, "registered_at"),
                           ({"card": "8100040", "registered_at": "yesterday"}, "registered_at"),
                           ({"card": "8100040", "profile": {"email": "@"}}, "profile.email"),
                           ({"card": "8100040", "profile": {"custom": {"k" * 101: "v"}}}, "profile.custom")):
        with pytest.raises(LoyaltyError) as err:
            client.enroll_member(request)
        assert (err.value.code, err.value.field) == (grpc.StatusCode.INVALID_ARGUMENT, field)


def test_cli_enrols_and_updates_profile_and_subscriptions(server):
    enrolled = cli("member", "enroll", "--server", server.target, "--card", "8100050", "--phone", "+79008100050",
                   "--gender", "F", "--birth-date", "1990-05-01", "--city", "Moscow", "--email", "x@y.ru",
                   "--subscribe", "email", "--subscribe", "sms", "--field", "pet=cat", "--json")
    assert enrolled.returncode == 0, enrolled.stderr
    m = json.loads(enrolled.stdout)
    assert m["profile"]["gender"] == "female" and m["profile"]["birth_date"] == "1990-05-01"
    assert m["profile"]["custom"] == {"pet": "cat"} and m["subscriptions"] == {"email": True, "sms": True}
    assert m["source"] == "manual"

    updated = cli("member", "update", "8100050", "--server", server.target, "--city", "Kazan", "--clear",
                  "birth-date", "--unsubscribe", "sms", "--subscribe", "push", "--field", "size=M",
                  "--clear-field", "pet", "--json")
    assert updated.returncode == 0, updated.stderr
    m = json.loads(updated.stdout)
    assert m["profile"]["city"] == "Kazan" and m["profile"]["birth_date"] == ""
    assert m["profile"]["gender"] == "female" and m["profile"]["custom"] == {"size": "M"}
    assert m["subscriptions"] == {"email": True, "sms": False, "push": True}

    shown = cli("member", "get", "8100050", "--server", server.target)
    assert shown.returncode == 0 and "Kazan" in shown.stdout and "size=M" in shown.stdout

    bad = cli("member", "update", "8100050", "--server", server.target, "--email", "nope")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip() == "error: INVALID_ARGUMENT: email: not an email address: 'nope'"
    taken = cli("member", "update", "8100050", "--server", server.target, "--phone", "+79008100020")
    assert taken.returncode == 1 and "ALREADY_EXISTS" in taken.stderr and "+79008100020" in taken.stderr


# ---- a card and a phone of two members ---------------------------------------------------------------------

def test_a_card_and_a_phone_of_two_members_are_refused_naming_both(server, client):
    client.enroll_member({"card": "8100060", "phone": "+79008100060"})
    client.enroll_member({"card": "8100061", "phone": "+79008100061"})
    client.adjust_points({"member": {"card": "8100060"}, "kind": "credit", "points": 500, "reason": "test"})
    mixed = {"card": "8100060", "phone": "+79008100061"}
    calls = [
        ("calculate_receipt", {"member": mixed, "receipt": coffee("pair-1")}),
        ("confirm_purchase", {"member": mixed, "receipt": {**coffee("pair-2"), "redeem_points": 100}}),
        ("get_member", {"member": mixed}),
        ("adjust_points", {"member": mixed, "kind": "debit", "points": 10, "reason": "test"}),
        ("update_member", {"member": mixed, "city": "Omsk"}),
        # a phone nobody has is not the card's member's phone either
        ("get_member", {"member": {"card": "8100060", "phone": "+79008100069"}}),
    ]
    for name, request in calls:
        with pytest.raises(LoyaltyError) as err:
            getattr(client, name)(request)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT, name
        assert [f for f, _ in err.value.violations] == ["member.card", "member.phone"], name
        assert "member.card" in err.value.message and "member.phone" in err.value.message, name
    m = client.get_member({"member": {"card": "8100060"}})
    assert (m.active_points, m.profile.city) == (500, "")                    # nothing was booked to the card
    assert scalar(server, "SELECT count(*) FROM purchases WHERE number = 'pair-2'") == 0

    # the card and the phone of one member: fine, on every path
    same = {"card": "8100060", "phone": "+7 900 810 00 60"}
    assert client.calculate_receipt({"member": same, "receipt": coffee("pair-3")}).answer.member.card == "8100060"
    assert client.confirm_purchase({"member": same, "receipt": coffee("pair-4")}).answer.member.card == "8100060"
    assert client.get_member({"member": same}).card == "8100060"


# ---- adjustments need a reason -----------------------------------------------------------------------------

@pytest.mark.parametrize("reason", ["", "   "])
def test_an_adjustment_without_a_reason_is_refused(client, reason):
    with pytest.raises(LoyaltyError) as err:
        client.adjust_points({"member": {"card": "7000001"}, "kind": "credit", "points": 5, "reason": reason})
    assert (err.value.code, err.value.field) == (grpc.StatusCode.INVALID_ARGUMENT, "reason")


# ---- huge values in errors ---------------------------------------------------------------------------------

def _trailer_bytes(err: grpc.RpcError) -> int:
    return sum(len(k) + len(v) for k, v in err.trailing_metadata() or ()) + len((err.details() or "").encode())


HUGE = "7" * 10_000


@pytest.mark.parametrize(("method", "request_dict", "field"), [
    ("get_member", {"member": {"phone": HUGE}}, "member.phone"),
    ("get_member", {"member": {"card": HUGE}}, "member.card"),
    ("enroll_member", {"card": "8100070", "phone": "+" + HUGE}, "phone"),
    ("update_member", {"member": {"card": "7000001"}, "phone": "x" + HUGE}, "phone"),
    ("update_member", {"member": {"card": "7000001"}, "email": HUGE + "@"}, "email"),
    ("update_member", {"member": {"card": "7000001"}, "gender": HUGE}, "gender"),
    ("calculate_receipt", {"member": {"phone": HUGE}, "receipt": coffee("huge-1")}, "member.phone"),
    ("calculate_receipt", {"receipt": {**coffee("huge-2"), "store": HUGE}}, "receipt.store"),
    ("confirm_purchase", {"receipt": {**coffee("huge-3"), "lines": [
        {"sku": HUGE, "quantity": 1000, "price": 100}]}}, "receipt.lines[0].sku"),
    ("confirm_purchase", {"member": {"phone": HUGE}, "receipt": coffee("huge-4")}, "member.phone"),
    ("adjust_points", {"member": {"card": "7000001"}, "kind": HUGE, "points": 1, "reason": "x"}, "kind"),
])
def test_a_huge_value_is_invalid_argument_with_a_small_trailer(server, method, request_dict, field):
    """Through a default grpc channel (no options): a 20 kB trailer would come back RESOURCE_EXHAUSTED."""
    from google.protobuf import json_format
    from google.rpc import error_details_pb2, status_pb2

    from loyalty.clients import RPCS
    from loyalty.v1 import processing_pb2_grpc

    rpc = RPCS[method]
    with grpc.insecure_channel(server.target) as channel:
        stub = processing_pb2_grpc.ProcessingStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            getattr(stub, rpc.method)(json_format.ParseDict(request_dict, rpc.request()), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert _trailer_bytes(err.value) < TRAILER_BUDGET
    details = dict(err.value.trailing_metadata())["grpc-status-details-bin"]
    bad = error_details_pb2.BadRequest()
    status_pb2.Status.FromString(details).details[0].Unpack(bad)
    assert bad.field_violations[0].field == field
    assert err.value.details().startswith(field)


def test_a_status_stays_small_whatever_the_error_holds():
    """The edge's safety net, for errors whose texts no validation shortened (many fields, long non-ASCII
    reasons, long ErrorInfo metadata): the trailer stays under the budget and keeps the first field."""
    from google.rpc import error_details_pb2, status_pb2

    from loyalty.server.errors import AlreadyExists, InvalidArgument
    from loyalty.server.status import status_for

    def trailer(status) -> int:
        message = sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in status.details.encode())
        return message + sum(len(v) * 4 // 3 for _k, v in status.trailing_metadata)

    many = InvalidArgument("a" * 5000, "я" * 5000, also=tuple((f"f{i}" * 300, "я" * 5000) for i in range(50)))
    status = status_for(many)
    assert trailer(status) < TRAILER_BUDGET
    bad = error_details_pb2.BadRequest()
    status_pb2.Status.FromString(dict(status.trailing_metadata)["grpc-status-details-bin"]).details[0].Unpack(bad)
    assert bad.field_violations[0].field.startswith("aaaa") and "(5000 characters)" in bad.field_violations[0].field

    taken = AlreadyExists("я" * 20_000, **{f"key{i}": "v" * 10_000 for i in range(40)})
    assert trailer(status_for(taken)) < TRAILER_BUDGET
