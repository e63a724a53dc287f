"""``serve --log-format json``: every log line is a JSON object; every call has one, carrying its request id
(the caller's ``x-request-id`` or a new one, sent back in the trailing metadata, errors included), method,
status code, duration, peer and request key; an ``authorization`` header's value never reaches the log."""
from __future__ import annotations

import json

import grpc
import pytest

from loyalty.server.logs import request_id
from loyalty.v1 import processing_pb2, processing_pb2_grpc
from serverutil import now_at, start_server

SECRET = "Bearer s3cr3t-token-do-not-log"


def _receipt(number: str) -> dict:
    return {"store": "msk-01", "terminal": "pos-j", "number": number, "at": now_at(),
            "lines": [{"sku": "milk-1l", "categories": ["dairy"], "quantity": 1000, "price": 8990}]}


def _trailing_id(metadata) -> str:
    return dict(metadata)["x-request-id"]


@pytest.fixture(scope="module")
def calls(tmp_path_factory):
    """A JSON-logging server after three calls: ``(log lines parsed, what each call's caller saw)``."""
    tmp = tmp_path_factory.mktemp("jsonlog")
    srv = start_server(tmp, args=("--log-format", "json"))
    seen = {}
    try:
        with grpc.insecure_channel(srv.target) as channel:
            processing = processing_pb2_grpc.ProcessingStub(channel)
            _, call = processing.CalculateReceipt.with_call(
                processing_pb2.CalculateReceiptRequest(member={"card": "7000001"}, receipt=_receipt("j-1")),
                metadata=(("x-request-id", "till-42.req:0007"), ("authorization", SECRET)), timeout=10)
            seen["given"] = _trailing_id(call.trailing_metadata())
            _, call = processing.ConfirmPurchase.with_call(
                processing_pb2.ConfirmPurchaseRequest(member={"card": "7000002"}, receipt=_receipt("j-2")),
                metadata=(("x-request-id", "bad id with spaces " + SECRET),), timeout=10)
            seen["generated"] = _trailing_id(call.trailing_metadata())
            with pytest.raises(grpc.RpcError) as failed:
                processing.GetMember(processing_pb2.GetMemberRequest(member={"card": "0000"}),
                                     metadata=(("authorization", SECRET),), timeout=10)
            seen["error"] = (failed.value.code(), _trailing_id(failed.value.trailing_metadata()))
    finally:
        assert srv.stop() == 0
    text = srv.log()
    assert text.strip()
    return text, [json.loads(line) for line in text.splitlines() if line.strip()], seen


def _call_line(lines, rid):
    found = [line for line in lines if line.get("request_id") == rid and "method" in line]
    assert len(found) == 1, f"{rid}: {found}"
    return found[0]


def test_every_line_is_a_json_object_with_the_common_fields(calls):
    _text, lines, _seen = calls
    for line in lines:
        assert {"ts", "level", "logger", "pid", "message"} <= line.keys()
        assert line["ts"].endswith("+00:00")
    assert any("serving on" in line["message"] for line in lines)


def test_a_call_with_a_request_id_is_logged_under_it_and_gets_it_back(calls):
    _text, lines, seen = calls
    assert seen["given"] == "till-42.req:0007"
    line = _call_line(lines, "till-42.req:0007")
    assert line["method"] == "CalculateReceipt" and line["code"] == "OK" and line["level"] == "INFO"
    assert line["key"] == "receipt=msk-01/pos-j/j-1 card=7000001"
    assert line["peer"].startswith(("ipv4:127.0.0.1:", "ipv6:"))
    assert 0 < line["duration_ms"] < 10_000


def test_a_call_without_a_usable_request_id_gets_a_new_one(calls):
    _text, lines, seen = calls
    rid = seen["generated"]
    assert rid and " " not in rid and "s3cr3t" not in rid
    line = _call_line(lines, rid)
    assert line["method"] == "ConfirmPurchase" and line["code"] == "OK"
    assert line["key"] == "receipt=msk-01/pos-j/j-2 card=7000002"


def test_a_failed_call_has_its_code_detail_and_request_id(calls):
    _text, lines, seen = calls
    code, rid = seen["error"]
    assert code == grpc.StatusCode.NOT_FOUND
    line = _call_line(lines, rid)
    assert line["method"] == "GetMember" and line["code"] == "NOT_FOUND" and line["key"] == "card=0000"
    assert line["detail"]


def test_secrets_never_reach_the_log(calls):
    text, _lines, _seen = calls
    assert "s3cr3t" not in text and "authorization" not in text.lower()


def test_generated_request_ids_are_distinct_and_a_bad_one_is_replaced():
    ids = {request_id(()) for _ in range(1000)}
    assert len(ids) == 1000
    assert request_id((("x-request-id", "abc-1"),)) == "abc-1"
    assert request_id((("x-request-id", "x" * 129),)) != "x" * 129
    assert request_id((("x-request-id", "a\nb"),)) != "a\nb"


def test_a_callers_text_cannot_forge_a_line_of_the_text_log(tmp_path):
    """A receipt number and a card with line breaks and a terminal escape, in the default text log: the call
    is one line, the characters written as escapes; no line of the log starts with the forged text."""
    server = start_server(tmp_path)
    forged = "\n2026-12-04 04:09:59 INFO FORGED \x1b[31m"
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = processing_pb2_grpc.ProcessingStub(channel)
            stub.CalculateReceipt(processing_pb2.CalculateReceiptRequest(receipt={
                "store": "msk-01", "terminal": "pos-1", "number": "n" + forged, "at": now_at(),
                "lines": [{"sku": "milk-1l", "categories": ["dairy"], "quantity": 1000, "price": 8990}]}), timeout=10)
            with pytest.raises(grpc.RpcError):
                stub.GetMember(processing_pb2.GetMemberRequest(member={"card": "99" + forged}), timeout=10)
    finally:
        assert server.stop() == 0
    log = server.log()
    assert "\x1b" not in log
    assert not [line for line in log.splitlines() if "FORGED" in line and not line.startswith("20")], log
    assert not [line for line in log.splitlines() if line.startswith("2026-12-04 04:09:59")], log
    calls = [line for line in log.splitlines() if "FORGED" in line]
    assert len(calls) >= 2 and all("\\n2026-12-04 04:09:59" in line and "\\x1b[31m" in line for line in calls)
