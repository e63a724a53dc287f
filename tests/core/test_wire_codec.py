"""The CalculateReceipt wire codec (``loyalty.server._wire``) against protobuf itself.

protobuf's parser and serializer (upb) are the independent oracle: whatever bytes we feed, the compiled
decoder must give exactly ``convert.receipt_to_dict(CalculateReceiptRequest.FromString(b).receipt)`` (and the
member's card and phone), or fail with ``ValueError`` exactly when ``FromString`` raises ``DecodeError``; the
encoder must give exactly the bytes ``SerializeToString`` gives for ``convert.answer_to_proto(answer)``.
Requests come from ``loyalty.core.workload`` (canonical encodings) and from a field-soup generator written
here (merged occurrences, unknown fields and groups, known fields under the wrong wire type, non-minimal
varints, negative int64s, non-ASCII strings); answers from the engine on generated programs, plus hand-made
ones for the corners the engine rarely reaches. Both implementations behind ``convert`` (compiled and the
protobuf reference) go through the same differential checks.
"""
from __future__ import annotations

import importlib
import os
import random

import pytest
from google.protobuf.message import DecodeError

from loyalty.core import Engine, InputError, program_from_dict
from loyalty.core import workload
from loyalty.server import convert
from loyalty.v1 import processing_pb2, receipt_pb2

IN_CI = os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _compiled():
    try:
        return importlib.import_module("loyalty.server._wire")
    except ImportError as exc:
        if IN_CI:
            pytest.fail(f"loyalty.server._wire cannot be imported (CI=true: it must be built): {exc}", pytrace=False)
        pytest.skip(f"loyalty.server._wire cannot be imported: {exc}")


@pytest.fixture(scope="session", params=["compiled", "reference"])
def codec(request):
    """``(decode, encode)`` of one implementation."""
    if request.param == "compiled":
        wire = _compiled()
        return wire.decode_calculate_request, wire.encode_calculate_response
    return convert.decode_calculate_request_py, convert.encode_calculate_response_py


@pytest.fixture(scope="session")
def wire():
    return _compiled()


# ---- the oracle -------------------------------------------------------------------------------------------------

def expected_request(data: bytes):
    """What decoding must give, by protobuf; None when protobuf refuses the bytes."""
    try:
        message = processing_pb2.CalculateReceiptRequest.FromString(data)
    except DecodeError:
        return None
    return message.member.card, message.member.phone, convert.receipt_to_dict(message.receipt)


def expected_response(answer: dict, program_version: int) -> bytes:
    message = convert.answer_to_proto(dict(answer, program_version=program_version))
    return processing_pb2.CalculateReceiptResponse(answer=message).SerializeToString()


def check_decode(decode, data: bytes) -> None:
    want = expected_request(data)
    if want is None:
        with pytest.raises(ValueError):
            decode(data)
    else:
        got = decode(data)
        assert got == want, data.hex()
        # same keys in the same order as receipt_to_dict, and the same types (bool stays bool)
        assert [list(ln) for ln in got[2]["lines"]] == [list(ln) for ln in want[2]["lines"]]
        assert list(got[2]) == list(want[2])
        assert [[type(v) for v in ln.values()] for ln in got[2]["lines"]] == \
               [[type(v) for v in ln.values()] for ln in want[2]["lines"]]


# ---- a wire writer of our own, to make the bytes protobuf would never make ---------------------------------------

U64 = (1 << 64) - 1


def varint(n: int, pad: int = 0, limit: int = 10) -> bytes:
    """Base 128, two's complement for negatives; up to ``pad`` extra continuation bytes (a non-minimal
    encoding) while the whole stays within ``limit`` bytes (10 for values, 5 for tags and lengths)."""
    n &= U64
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    pad = min(pad, limit - len(out) - 1)
    if pad > 0:
        out.append(n | 0x80)
        out += b"\x80" * (pad - 1)
        out.append(0)
    else:
        out.append(n)
    return bytes(out)


def key(field: int, wire_type: int, pad: int = 0) -> bytes:
    return varint(field << 3 | wire_type, pad, 5)


def f_varint(field: int, value: int, pad: int = 0) -> bytes:
    return key(field, 0) + varint(value, pad)


def f_bytes(field: int, payload: bytes, pad: int = 0) -> bytes:
    return key(field, 2) + varint(len(payload), pad, 5) + payload


def f_str(field: int, text: str) -> bytes:
    return f_bytes(field, text.encode("utf-8"))


def f_group(field: int, body: bytes = b"") -> bytes:
    return key(field, 3) + body + key(field, 4)


STRINGS = ("", "a", "sku-00001", "молоко 3,2%", "🍎 яблоко", "x" * 130, "\x00", "dept-07", "+7 (900) 000-00-01")
INT64S = (0, 1, -1, 127, 128, 300, 16384, 2**31, -(2**31), 2**63 - 1, -(2**63), 99_999_999, 1234)


def soup_value(rng: random.Random, wire_type: int, depth: int = 0) -> bytes:
    """The payload of an unknown field of ``wire_type`` (after its key)."""
    if wire_type == 0:
        return varint(rng.choice(INT64S), rng.choice((0, 0, 0, 1, 3)) if rng.random() < 0.2 else 0)
    if wire_type == 1:
        return bytes(rng.randrange(256) for _ in range(8))
    if wire_type == 5:
        return bytes(rng.randrange(256) for _ in range(4))
    payload = bytes(rng.randrange(256) for _ in range(rng.randrange(6)))
    return varint(len(payload), 1 if rng.random() < 0.1 else 0, 5) + payload


def unknown_field(rng: random.Random, known: int, depth: int = 0) -> bytes:
    """A field the message does not know (a number above ``known``), any wire type, groups nesting."""
    field = rng.choice((known + 1, known + 5, 100, 2047, 536_870_911))
    wire_type = rng.choice((0, 1, 2, 5, 3 if depth < 3 else 0))
    if wire_type == 3:
        body = b"".join(unknown_field(rng, 0, depth + 1) for _ in range(rng.randrange(3)))
        return f_group(field, body)
    return key(field, wire_type, 1 if rng.random() < 0.05 else 0) + soup_value(rng, wire_type)


def wrong_type(rng: random.Random, field: int, right: int) -> bytes:
    """A known field under a wire type it does not have: protobuf keeps it as an unknown field."""
    wire_type = rng.choice([w for w in (0, 1, 2, 5, 3) if w != right])
    if wire_type == 3:
        return f_group(field)
    return key(field, wire_type) + soup_value(rng, wire_type)


def line_soup(rng: random.Random) -> bytes:
    parts = []
    for _ in range(rng.randrange(0, 14)):
        r = rng.random()
        field = rng.randint(1, 10)
        if r < 0.08:
            parts.append(unknown_field(rng, 10))
        elif r < 0.14:
            parts.append(wrong_type(rng, field, 2 if field <= 2 else 0))
        elif field <= 2:
            parts.append(f_str(field, rng.choice(STRINGS)))
        elif field <= 7:
            parts.append(f_varint(field, rng.choice(INT64S), rng.choice((0, 0, 0, 2))))
        else:
            parts.append(f_varint(field, rng.choice((0, 1, 1, 2, 255, -1))))
    return b"".join(parts)


def receipt_soup(rng: random.Random) -> bytes:
    parts = []
    for _ in range(rng.randrange(0, 16)):
        r = rng.random()
        field = rng.randint(1, 8)
        if r < 0.06:
            parts.append(unknown_field(rng, 8))
        elif r < 0.1:
            parts.append(wrong_type(rng, field, 0 if field == 7 else 2))
        elif field == 8 or r < 0.4:
            parts.append(f_bytes(8, line_soup(rng), rng.choice((0, 0, 0, 1))))
        elif field == 7:
            parts.append(f_varint(7, rng.choice(INT64S)))
        else:
            parts.append(f_str(field, rng.choice(STRINGS)))
    return b"".join(parts)


def request_soup(rng: random.Random) -> bytes:
    parts = []
    for _ in range(rng.randrange(0, 5)):
        r = rng.random()
        if r < 0.3:
            member = b"".join(rng.choice((f_str(1, rng.choice(STRINGS)), f_str(2, rng.choice(STRINGS)),
                                          unknown_field(rng, 2), wrong_type(rng, 1, 2)))
                              for _ in range(rng.randrange(3)))
            parts.append(f_bytes(1, member))
        elif r < 0.85:
            parts.append(f_bytes(2, receipt_soup(rng)))
        elif r < 0.92:
            parts.append(unknown_field(rng, 2))
        else:
            parts.append(wrong_type(rng, rng.randint(1, 2), 2))
    return b"".join(parts)


# ---- requests ---------------------------------------------------------------------------------------------------

def workload_requests(n: int, seed: int):
    rng = random.Random(seed)
    programs = [workload.random_program(rng, rng.choice((5, 20, 40))) for _ in range(4)]
    for i in range(n):
        receipt, member, _ = workload.random_request(rng, programs[i % len(programs)], rng.choice((0, 1, 3, 20, 60)))
        ref = {}
        if member is not None:
            ref = {"card": member["card"]} if rng.random() < 0.8 else {"phone": "+7900" + member["card"]}
        kwargs = {"receipt": receipt}
        if ref or rng.random() < 0.5:
            kwargs["member"] = ref
        yield processing_pb2.CalculateReceiptRequest(**kwargs).SerializeToString()


def test_generated_requests_decode_as_protobuf_reads_them(codec):
    decode, _ = codec
    count = 0
    for data in workload_requests(1500, seed=11):
        check_decode(decode, data)
        count += 1
    assert count == 1500


def test_field_soup_decodes_as_protobuf_reads_it(codec):
    """Merged repeats, unknown fields and groups, wrong wire types, non-minimal varints, negatives."""
    decode, _ = codec
    rng = random.Random(12)
    refused = 0
    for _ in range(3000):
        data = request_soup(rng)
        refused += expected_request(data) is None
        check_decode(decode, data)
    assert refused == 0   # the soup is well-formed: every refusal would have been a bug in one of the two


def test_mutated_bytes_are_refused_exactly_when_protobuf_refuses_them(codec):
    """Truncations, flipped and inserted bytes of valid requests: ValueError iff DecodeError, else equal."""
    decode, _ = codec
    rng = random.Random(13)
    outcomes = {"refused": 0, "accepted": 0}
    sources = [request_soup(rng) for _ in range(200)] + list(workload_requests(100, seed=14))
    for data in sources:
        if not data:
            continue
        for _ in range(8):
            b = bytearray(data)
            r = rng.random()
            i = rng.randrange(len(b))
            if r < 0.35:
                b = b[:i]
            elif r < 0.7:
                b[i] ^= 1 << rng.randrange(8)
            else:
                b[i:i] = bytes([rng.randrange(256)])
            outcomes["refused" if expected_request(bytes(b)) is None else "accepted"] += 1
            check_decode(decode, bytes(b))
    assert outcomes["refused"] > 100 and outcomes["accepted"] > 100, outcomes


def test_a_hand_encoded_request_decodes_to_the_hand_written_dict(wire):
    # member {card "7"}               0a 03 | 0a 01 37
    # receipt {                       12 .. |
    #   store "s"                     0a 01 73
    #   redeem_points -2              38 fe ff ff ff ff ff ff ff ff 01   (two's complement, 10 bytes)
    #   lines { sku "m"               42 .. | 0a 01 6d
    #           quantity 2500         18 c4 13      (2500 = 0x9c4 -> c4 13)
    #           amount 0              28 00         (present although zero: optional)
    #           no_redeem true } }    50 01
    line = bytes.fromhex("0a016d" "18c413" "2800" "5001")
    receipt = bytes.fromhex("0a0173" "38feffffffffffffffff01") + b"\x42" + bytes([len(line)]) + line
    data = bytes.fromhex("0a030a0137") + b"\x12" + bytes([len(receipt)]) + receipt
    card, phone, got = wire.decode_calculate_request(data)
    assert (card, phone) == ("7", "")
    assert got == {"store": "s", "terminal": "", "number": "", "coupons": [], "redeem_points": -2,
                   "lines": [{"sku": "m", "quantity": 2500, "price": 0, "external_discount": 0, "min_price": 0,
                              "no_discount": False, "no_accrual": False, "no_redeem": True, "amount": 0}]}
    assert "at" not in got and "channel" not in got


def test_a_receipt_sent_in_two_pieces_is_merged(wire):
    # proto3 merges repeated occurrences of a message field: last scalar wins, repeated fields concatenate
    first = f_str(1, "msk-01") + f_str(6, "A") + f_bytes(8, f_str(1, "l1")) + f_str(5, "2026-03-02T12:30")
    second = f_str(1, "spb-01") + f_str(6, "B") + f_bytes(8, f_str(1, "l2")) + f_varint(7, 5)
    card, phone, got = wire.decode_calculate_request(f_bytes(2, first) + f_bytes(1, f_str(2, "+79")) +
                                                     f_bytes(2, second))
    assert (card, phone) == ("", "+79")
    assert got["store"] == "spb-01" and got["coupons"] == ["A", "B"] and got["redeem_points"] == 5
    assert [ln["sku"] for ln in got["lines"]] == ["l1", "l2"] and got["at"] == "2026-03-02T12:30"


MALFORMED = {
    "truncated varint": f_bytes(2, f_str(1, "s")) + b"\x12\x02\x38\x80",
    "truncated varint at the end": b"\x12\x01\x38",
    "varint of 11 bytes": f_bytes(2, b"\x38" + b"\xff" * 10 + b"\x01"),
    "length past the end": b"\x12\x05\x0a\x01s",
    "string length past its message": f_bytes(2, b"\x0a\x05abc"),
    "line length past the receipt": f_bytes(2, b"\x42\x09" + f_str(1, "m")),
    "truncated fixed64": f_bytes(2, key(20, 1) + b"\x00" * 7),
    "truncated fixed32": f_bytes(2, key(20, 5) + b"\x00" * 3),
    "wire type 6": b"\x0e",
    "wire type 7 in a line": f_bytes(2, f_bytes(8, b"\x0f")),
    "field number 0": b"\x02\x00",
    "field number 0 in a line": f_bytes(2, f_bytes(8, b"\x00\x01")),
    "group whose tag 0 swallows its end": bytes.fromhex("13" "00" "14"),
    "end group without a start": f_bytes(2, key(9, 4)),
    "group without its end": f_bytes(2, key(9, 3) + f_varint(1, 1)),
    "group ended by another number": f_bytes(2, key(9, 3) + key(10, 4)),
    "tag of 6 bytes": b"\x8a\x80\x80\x80\x80\x00\x00",
    "tag beyond 32 bits": b"\x8a\x80\x80\x80\x10\x00",
    "length of 6 bytes": b"\x12\x80\x80\x80\x80\x80\x00",
    "groups nested 101 deep": f_bytes(2, key(20, 3) * 101 + key(20, 4) * 101),
    "invalid UTF-8 in the store": f_bytes(2, f_bytes(1, b"\xff")),
    "invalid UTF-8 in a sku": f_bytes(2, f_bytes(8, f_bytes(1, b"ab\xc3"))),
    "surrogate in a category": f_bytes(2, f_bytes(8, f_bytes(2, b"\xed\xa0\x80"))),
    "overlong UTF-8 in a coupon": f_bytes(2, f_bytes(6, b"\xc0\x80")),
    "invalid UTF-8 in the card": f_bytes(1, f_bytes(1, b"\x80")),
    "invalid UTF-8 in the phone": f_bytes(1, f_bytes(2, b"\xf5\x80\x80\x80")),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_request_is_a_value_error(codec, name):
    decode, _ = codec
    data = MALFORMED[name]
    with pytest.raises(DecodeError):       # the oracle agrees these bytes are not a request
        processing_pb2.CalculateReceiptRequest.FromString(data)
    with pytest.raises(ValueError):
        decode(data)


def test_what_protobuf_accepts_is_accepted(wire):
    """Not errors: a known field under another wire type is an unknown field; groups 100 deep at the top."""
    cases = [
        f_bytes(2, f_varint(1, 5) + f_str(2, "t")),                  # store as a varint: skipped
        f_bytes(2, key(7, 2) + varint(1) + b"\x05"),                  # redeem_points length-delimited: skipped
        f_bytes(2, f_group(8) + f_bytes(8, b"")),                     # lines as a group, then a real empty line
        f_varint(2, 1) + f_bytes(2, f_str(3, "n")),                   # receipt as a varint: skipped
        key(20, 3) * 100 + key(20, 4) * 100,
        f_bytes(2, key(20, 3) * 99 + key(20, 4) * 99),
        f_bytes(2, f_bytes(8, key(20, 3) * 98 + key(20, 4) * 98)),
        # inside an unknown group upb skips field number 0 like any other (tag 00, its varint 13, end 14)
        bytes.fromhex("13" "00" "13" "14"),
        bytes.fromhex("12 06" "a3 01" "00 00" "a4 01"),
        b"",
    ]
    for data in cases:
        assert expected_request(data) is not None
        check_decode(wire.decode_calculate_request, data)
    assert wire.decode_calculate_request(b"") == ("", "", {"store": "", "terminal": "", "number": "",
                                                          "coupons": [], "redeem_points": 0, "lines": []})


def test_groups_count_against_the_depth_limit_with_the_messages_they_are_in(wire):
    for depth, wrap in ((99, lambda g: f_bytes(2, g)), (98, lambda g: f_bytes(2, f_bytes(8, g)))):
        ok = wrap(key(20, 3) * depth + key(20, 4) * depth)
        too_deep = wrap(key(20, 3) * (depth + 1) + key(20, 4) * (depth + 1))
        assert expected_request(ok) is not None and expected_request(too_deep) is None
        wire.decode_calculate_request(ok)
        with pytest.raises(ValueError):
            wire.decode_calculate_request(too_deep)


def test_decode_takes_bytes_only(wire):
    with pytest.raises(TypeError):
        wire.decode_calculate_request(bytearray(b""))
    with pytest.raises(TypeError):
        wire.decode_calculate_request(None)


# ---- answers ----------------------------------------------------------------------------------------------------

def engine_answers(n: int, seed: int):
    rng = random.Random(seed)
    engines = []
    for _ in range(4):
        program = workload.random_program(rng, rng.choice((5, 20, 60)))
        engines.append((program, Engine(program_from_dict(program))))
    made = 0
    while made < n:
        program, engine = engines[made % len(engines)]
        receipt, member, budgets = workload.random_request(rng, program, rng.choice((0, 1, 5, 20, 80)))
        try:
            answer = engine.calculate(receipt, member, budgets)
        except InputError:
            continue
        made += 1
        yield answer


def test_engine_answers_encode_to_protobufs_bytes(codec):
    _, encode = codec
    rng = random.Random(21)
    shapes = {"member": 0, "hints": 0, "discounts": 0, "to_next_tier": 0, "over 127 bytes": 0}
    for answer in engine_answers(1500, seed=22):
        version = rng.choice((0, 1, 7, 300, 2**40))
        got = encode(answer, version)
        assert got == expected_response(answer, version)
        parsed = processing_pb2.CalculateReceiptResponse.FromString(got)
        assert parsed.answer == convert.answer_to_proto(dict(answer, program_version=version))
        shapes["member"] += bool(answer.get("member"))
        shapes["hints"] += bool(answer.get("hints"))
        shapes["discounts"] += any(ln.get("discounts") for ln in answer["lines"])
        shapes["to_next_tier"] += (answer.get("member") or {}).get("to_next_tier") is not None
        shapes["over 127 bytes"] += len(got) > 130
    assert all(v > 10 for v in shapes.values()), shapes     # the corners were actually reached


def member_state(**over):
    m = {"card": "7000001", "status": "active", "tier": "Basic", "anonymous": False, "active_before": 1000,
         "active_after": 900, "pending_before": 0, "pending_after": 30, "next_tier": "Silver", "to_next_tier": 5}
    m.update(over)
    return m


def answer_of(lines=1, **over):
    a = {"lines": [{"sku": f"sku-{i}", "amount": 100 * (i + 1), "external_discount": 0,
                    "discounts": [{"promotion": "p", "amount": 10}], "payable": 90 * (i + 1), "redeemed": 0,
                    "points": i} for i in range(lines)],
         "totals": {"amount": 100, "external_discount": 0, "discount": 10, "payable": 90, "max_points": 0,
                    "redeemed_points": 0, "redeemed_amount": 0, "accrued_points": 0},
         "promotions": ["p"], "hints": [], "messages": [], "member": member_state()}
    a.update(over)
    return a


HAND_ANSWERS = {
    "to_next_tier zero is present": answer_of(member=member_state(to_next_tier=0)),
    "to_next_tier None is absent": answer_of(member=member_state(to_next_tier=None, next_tier=None)),
    "anonymous member with None fields": answer_of(member={"card": None, "status": None, "tier": None,
                                                           "anonymous": True, "active_before": 0, "active_after": 0,
                                                           "pending_before": 0, "pending_after": 0,
                                                           "next_tier": None, "to_next_tier": None}),
    "no member": answer_of(member=None),
    "empty member dict": answer_of(member={}),
    "negative balances": answer_of(member=member_state(active_after=-5, active_before=-2**63)),
    "all totals zero and no lines": answer_of(lines=0, totals=dict.fromkeys(answer_of()["totals"], 0),
                                              promotions=[]),
    "keys the engine may leave out": {"lines": [{"sku": "s", "amount": 1, "payable": 1, "redeemed": 0, "points": 0}],
                                      "totals": {"amount": 1, "discount": 0, "payable": 1, "max_points": 0,
                                                 "redeemed_points": 0, "redeemed_amount": 0, "accrued_points": 0}},
    "non-ASCII and long strings": answer_of(promotions=["скидка-10", "x" * 200],
                                            messages=["card 7000001 is blocked: served as anonymous", "é" * 70],
                                            hints=[{"promotion": "p", "condition": "receipt_total_at_least",
                                                    "missing": 150, "message": "add 1.50 to get 10% off"}]),
    "an answer over 16 KiB (three-byte lengths, the heap buffer)": answer_of(lines=700),
    "None is the default, as in a message constructor": dict(
        answer_of(promotions=None, messages=None, totals=dict(answer_of()["totals"], discount=None),
                  hints=[{"promotion": "p", "condition": None, "missing": None, "message": "m"}]),
        lines=[{"sku": "s", "amount": None, "external_discount": None, "discounts": [{"promotion": None, "amount": 3}],
                "payable": 1, "redeemed": None, "points": None}]),
    "an answer of 130 bytes": answer_of(lines=0, promotions=["y" * 110]),
}


@pytest.mark.parametrize("name", sorted(HAND_ANSWERS))
def test_hand_made_answers_encode_to_protobufs_bytes(codec, name):
    _, encode = codec
    answer = HAND_ANSWERS[name]
    for version in (0, 3):
        assert encode(answer, version) == expected_response(answer, version)
    if "16 KiB" in name:
        assert len(encode(answer, 3)) > 16384


def test_a_hand_encoded_answer(wire):
    # CalculateReceiptResponse { answer (0a, len) {
    #   lines { sku "a" (0a 01 61)  amount 5 (10 05)  payable 5 (28 05) }   -> 0a 07 | 0a 01 61 10 05 28 05
    #   totals { amount 5 (08 05) }                                          -> 12 02 | 08 05
    #   member { anonymous true (20 01)  to_next_tier 0 (50 00) }            -> 32 04 | 20 01 50 00
    #   program_version 2 (38 02) } }
    answer = {"lines": [{"sku": "a", "amount": 5, "payable": 5, "redeemed": 0, "points": 0}],
              "totals": {"amount": 5, "discount": 0, "payable": 0, "max_points": 0, "redeemed_points": 0,
                         "redeemed_amount": 0, "accrued_points": 0},
              "member": {"card": None, "anonymous": True, "to_next_tier": 0}}
    body = bytes.fromhex("0a07" "0a0161" "1005" "2805" "1202" "0805" "3204" "2001" "5000" "3802")   # 21 bytes
    assert wire.encode_calculate_response(answer, 2) == b"\x0a" + bytes([len(body)]) + body


def test_bad_answer_values_are_refused_not_encoded(wire):
    with pytest.raises(TypeError):
        wire.encode_calculate_response(answer_of(promotions=[5]), 1)
    with pytest.raises(TypeError):
        wire.encode_calculate_response(answer_of(totals=dict(answer_of()["totals"], amount=1.5)), 1)
    with pytest.raises(ValueError):
        wire.encode_calculate_response(answer_of(totals=dict(answer_of()["totals"], amount=2**63)), 1)
    with pytest.raises(KeyError):
        wire.encode_calculate_response({"lines": []}, 1)


def test_the_selector_picks_the_compiled_codec_unless_asked_not_to():
    if os.environ.get("LOYALTY_NO_EXTENSIONS"):
        assert not convert.WIRE_COMPILED
        assert convert.decode_calculate_request is convert.decode_calculate_request_py
    else:
        wire = _compiled()
        assert convert.WIRE_COMPILED
        assert convert.decode_calculate_request is wire.decode_calculate_request
        assert convert.encode_calculate_response is wire.encode_calculate_response


def test_receipt_proto_fields_are_the_ones_the_codec_knows():
    """A field added to receipt.proto must be added to _wire.pyx: this pins the schema the codec was written for."""
    def fields(message):
        return sorted((f.number, f.name) for f in message.DESCRIPTOR.fields)
    t = receipt_pb2.Line.DESCRIPTOR.fields_by_name
    assert [n for n, *_ in fields(receipt_pb2.Line)] == list(range(1, 11))
    assert [n for n, *_ in fields(receipt_pb2.Receipt)] == list(range(1, 9))
    assert [n for n, *_ in fields(receipt_pb2.ReceiptAnswer)] == list(range(1, 8))
    assert [n for n, *_ in fields(receipt_pb2.MemberState)] == list(range(1, 11))
    assert [n for n, *_ in fields(receipt_pb2.LineResult)] == list(range(1, 8))
    assert [n for n, *_ in fields(receipt_pb2.Totals)] == list(range(1, 9))
    assert [n for n, *_ in fields(receipt_pb2.Hint)] == list(range(1, 5))
    assert [n for n, *_ in fields(receipt_pb2.MemberRef)] == [1, 2]
    assert [n for n, *_ in fields(processing_pb2.CalculateReceiptRequest)] == [1, 2]
    assert t["amount"].has_presence and not t["quantity"].has_presence


# ---- the service behind the codec: calculate_answer, waiting or not -----------------------------------------------

AT = "2026-03-02T12:30:00+03:00"


def spec_example_a(card: str = "") -> bytes:
    """SPEC example A as request bytes: milk 2 x 89.90 + cheese 450.00 + coffee 899.00 = 1528.80."""
    return processing_pb2.CalculateReceiptRequest(
        member={"card": card} if card else None,
        receipt=receipt_pb2.Receipt(store="msk-01", terminal="pos-3", number="000123", channel="pos", at=AT,
                                    lines=[receipt_pb2.Line(sku="milk-1l", categories=["dairy"], quantity=2000,
                                                            price=8990),
                                           receipt_pb2.Line(sku="cheese-200", categories=["dairy"], quantity=1000,
                                                            price=45000),
                                           receipt_pb2.Line(sku="coffee-beans-1kg", categories=["coffee"],
                                                            quantity=1000, price=89900)])).SerializeToString()


@pytest.fixture
def calc_service(tmp_path):
    """A service on SQLite with the demo program and one member, 7000001."""
    from loyalty.server import db
    from loyalty.server.processing import ProcessingService
    from loyalty.server.demo import DEMO_PROGRAM_PATH
    from loyalty.v1 import admin_pb2

    url = f"sqlite:///{tmp_path / 'loyalty.db'}"
    db.upgrade(url)
    service = ProcessingService.open(url)
    service.publish_program(admin_pb2.PublishProgramRequest(yaml=DEMO_PROGRAM_PATH.read_text(encoding="utf-8")))
    service.enroll_member(processing_pb2.EnrollMemberRequest(card="7000001", source="pos"))
    try:
        yield service
    finally:
        service.close()


def _no_storage(service, monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("a calculate that must not wait touched storage")
    monkeypatch.setattr(service.db, "read", refuse)
    monkeypatch.setattr(service.programs, "current", refuse)
    monkeypatch.setattr(service.reads, "budgets", refuse)


def test_calculate_answer_is_calculate_receipt_on_plain_values(calc_service):
    data = spec_example_a("7000001")
    answer = calc_service.calculate_answer(*convert.decode_calculate_request(data))
    assert answer["totals"]["amount"] == 152880       # 2 x 8990 + 45000 + 89900
    via_messages = calc_service.calculate_receipt(processing_pb2.CalculateReceiptRequest.FromString(data))
    assert convert.encode_calculate_response(answer, answer["program_version"]) == via_messages.SerializeToString()


def test_calculate_without_waiting_answers_from_memory_or_not_at_all(calc_service, monkeypatch):
    member_call = convert.decode_calculate_request(spec_example_a("7000001"))
    anonymous_call = convert.decode_calculate_request(spec_example_a())
    assert calc_service.calculate_answer(*member_call, wait=False) is None       # nothing in memory yet
    waited = calc_service.calculate_answer(*member_call)
    waited_anonymous = calc_service.calculate_answer(*anonymous_call)
    _no_storage(calc_service, monkeypatch)
    assert calc_service.calculate_answer(*member_call, wait=False) == waited
    assert calc_service.calculate_answer(*anonymous_call, wait=False) == waited_anonymous
    unknown = convert.decode_calculate_request(spec_example_a("7999999"))
    assert calc_service.calculate_answer(*unknown, wait=False) is None        # its context would need a read
    from loyalty.server.errors import InvalidArgument
    bad = dict(member_call[2], at="yesterday")
    with pytest.raises(InvalidArgument) as err:
        calc_service.calculate_answer("7000001", "", bad, wait=False)
    assert err.value.path == "receipt.at"


def test_an_expired_lease_sends_one_call_to_renew_it_and_a_dead_one_sends_all(calc_service, monkeypatch):
    call = convert.decode_calculate_request(spec_example_a("7000001"))
    monkeypatch.setattr(calc_service.calculation, "CALCULATE_LEASE", -1.0)      # the lease this waiting call sets is due at once
    waited = calc_service.calculate_answer(*call)
    _no_storage(calc_service, monkeypatch)
    monkeypatch.setattr(calc_service.calculation, "CALCULATE_LEASE", 60.0)
    assert calc_service.calculate_answer(*call, wait=False) is None     # this one goes to renew it...
    assert calc_service.calculate_answer(*call, wait=False) == waited   # ...the others go on with it meanwhile
    monkeypatch.setattr(calc_service.calculation, "CALCULATE_STALE_MAX", -1.0)    # but not once it is too old: storage is away
    assert calc_service.calculate_answer(*call, wait=False) is None


# ---- ConfirmPurchaseResponse --------------------------------------------------------------------------------------

@pytest.fixture(scope="session", params=["compiled", "reference"])
def confirm_encoder(request):
    return _compiled().encode_confirm_response if request.param == "compiled" else convert.encode_confirm_response_py


def test_confirm_responses_encode_to_protobufs_bytes(confirm_encoder):
    """The ConfirmPurchase edge writes ``purchase_id`` / ``answer`` (its own program version) / ``replayed``
    straight to bytes: the same bytes protobuf serializes, for engine answers and the hand-made corners."""
    rng = random.Random(31)
    answers = list(engine_answers(300, seed=32)) + [HAND_ANSWERS[k] for k in sorted(HAND_ANSWERS)]
    for n, answer in enumerate(answers):
        answer = dict(answer, program_version=rng.choice((0, 1, 300, 2**40)))
        purchase_id = rng.choice(("1", str(2**62), "", "покупка-7"))
        replayed = bool(n % 2)
        got = confirm_encoder(purchase_id, answer, replayed)
        want = processing_pb2.ConfirmPurchaseResponse(purchase_id=purchase_id, answer=convert.answer_to_proto(answer),
                                                      replayed=replayed).SerializeToString()
        assert got == want
        parsed = processing_pb2.ConfirmPurchaseResponse.FromString(got)
        assert (parsed.purchase_id, parsed.replayed, parsed.answer.program_version) == (
            purchase_id, replayed, answer["program_version"])


def test_confirm_request_decodes_with_the_calculate_codec(wire):
    """``ConfirmPurchaseRequest`` and ``CalculateReceiptRequest`` share their layout (member = 1, receipt = 2),
    so one decoder serves both; this holds the protos to it."""
    calc = processing_pb2.CalculateReceiptRequest.DESCRIPTOR
    confirm = processing_pb2.ConfirmPurchaseRequest.DESCRIPTOR
    assert [(f.name, f.number, f.message_type.full_name) for f in calc.fields] == \
           [(f.name, f.number, f.message_type.full_name) for f in confirm.fields]
    req = processing_pb2.ConfirmPurchaseRequest(
        member=receipt_pb2.MemberRef(card="7000001", phone="+79001234567"),
        receipt=receipt_pb2.Receipt(store="s", terminal="t", number="n", at="2026-03-02T12:30:00+03:00",
                                    lines=[receipt_pb2.Line(sku="milk", quantity=2000, price=8990)]))
    assert wire.decode_calculate_request(req.SerializeToString()) == (
        "7000001", "+79001234567", convert.receipt_to_dict(req.receipt))


# ---- fits: the storage check the service may skip -----------------------------------------------------------------

# Around each limit (store / terminal / number / sku 64, at 40: characters for the service, UTF-8 bytes for the
# decoder), two-byte Cyrillic on both sides of it, and NUL characters.
FIT_STRINGS = ("", "a", "x" * 40, "x" * 41, "x" * 64, "x" * 65, "я" * 20, "я" * 21, "я" * 32, "я" * 33, "я" * 64,
               "я" * 65, "a\x00b", "\x00")


@pytest.fixture(params=["compiled", "reference"])
def receipt_decoder(request):
    if request.param == "compiled":
        return _compiled().decode_receipt_request
    return convert.decode_receipt_request_py


def fit_receipts(n: int, seed: int):
    """Receipts whose strings are mostly ordinary and now and then one of ``FIT_STRINGS``."""
    rng = random.Random(seed)

    def text(ordinary: str) -> str:
        return rng.choice(FIT_STRINGS) if rng.random() < 0.08 else ordinary

    for i in range(n):
        lines = [dict(sku=text(f"sku-{j}"), categories=[text("dairy") for _ in range(rng.randrange(3))],
                      quantity=1000, price=100) for j in range(rng.randrange(4))]
        yield dict(store=text("msk-01"), terminal=text("pos-1"), number=text(str(i)), channel=text("pos"),
                   at=text("2026-03-02T12:30:00+03:00"), coupons=[text("WELCOME") for _ in range(rng.randrange(2))],
                   lines=lines)


def test_fits_is_true_only_when_the_services_string_check_passes(receipt_decoder):
    """``fits`` lets the service skip ``_check_receipt``: it must never be True when the check would refuse the
    receipt; with ASCII strings (bytes = characters) it is exactly the check's verdict."""
    from loyalty.server.errors import InvalidArgument
    from loyalty.server.processing import _check_receipt

    seen: dict = {}
    for receipt in fit_receipts(3000, seed=21):
        data = processing_pb2.CalculateReceiptRequest(member={"card": "7000001"}, receipt=receipt).SerializeToString()
        card, phone, got, fits = receipt_decoder(data)
        assert (card, phone, got) == convert.decode_calculate_request_py(data)
        try:
            _check_receipt(got)
            passes = True
        except InvalidArgument:
            passes = False
        if fits:
            assert passes, got
        strings = [got["store"], got["terminal"], got["number"], got.get("at", ""), got.get("channel", ""),
                   *got["coupons"], *(ln["sku"] for ln in got["lines"]),
                   *(c for ln in got["lines"] for c in ln.get("categories", ()))]
        if all(s.isascii() for s in strings):
            assert fits == passes, got
        seen[fits, passes] = seen.get((fits, passes), 0) + 1
    # all three verdicts occur: fits; refused; and a Cyrillic string over the byte limit that the check passes
    assert seen.get((True, True)) and seen.get((False, False)) and seen.get((False, True)), seen
    assert not seen.get((True, False))


def test_fits_of_the_compiled_decoder_never_vouches_for_what_the_reference_refuses(wire):
    """On field soup: the compiled ``fits`` implies the reference's (it may be False where the reference says
    True: a string field sent twice is checked at each occurrence, though only the last one stays)."""
    rng = random.Random(22)
    verdicts = {}
    for _ in range(2000):
        data = request_soup(rng)
        ours, reference = wire.decode_receipt_request(data), convert.decode_receipt_request_py(data)
        assert ours[:3] == reference[:3] == wire.decode_calculate_request(data)
        assert reference[3] or not ours[3]
        verdicts[ours[3], reference[3]] = verdicts.get((ours[3], reference[3]), 0) + 1
    assert verdicts.get((True, True)) and verdicts.get((False, False)), verdicts
