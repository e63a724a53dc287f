"""Receipt and member validation (docs/ENGINE.md "Inputs"): each bad field is named by its path, defaults are
filled in, and a line's default amount is rounded half up in integers."""
import copy
import datetime as dt

import pytest

from loyalty.core import InputError, program_from_dict
from loyalty.core.inputs import parse_at, parse_budgets_used, parse_request, round_half_up
from loyalty.core.model import Line, Member

PROGRAM = program_from_dict({
    "program": "t",
    "tiers": {"levels": [{"name": "Basic", "from": 0, "accrual_percent": 3},
                         {"name": "Gold", "from": 5000000, "accrual_percent": 7}]},
})

RECEIPT = {
    "at": "2026-03-02T12:30:00+03:00",
    "lines": [
        {"sku": "milk-1l", "categories": ["dairy"], "quantity": 2000, "price": 8990},
        {"sku": "cheese-200", "quantity": 1000, "price": 45000, "amount": 44999, "external_discount": 44999,
         "min_price": 100, "no_discount": True, "no_accrual": True, "no_redeem": True},
    ],
}
MEMBER = {"card": "7000001", "status": "active", "tier": "Gold", "active_points": 1000, "pending_points": 5,
          "audiences": ["women-q1"], "usage": {"p1": 2}, "purchases_sum": 150000}


def parse(receipt=None, member=None):
    return parse_request(receipt if receipt is not None else RECEIPT, member, PROGRAM)


def error_of(receipt=None, member=None) -> InputError:
    with pytest.raises(InputError) as info:
        parse(receipt, member)
    return info.value


# ---- rounding --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num, den, expected", [
    (12338766, 1000, 12339),   # 12338.766 -> up
    (12338500, 1000, 12339),   # exactly half -> up
    (12338499, 1000, 12338),
    (0, 1000, 0),
    (5, 10, 1),                # 0.5 -> 1
    (4, 10, 0),
    (10**30 + 1, 2, 5 * 10**29 + 1),   # big integers stay exact
])
def test_round_half_up(num, den, expected):
    assert round_half_up(num, den) == expected


def test_weight_line_amount_rounds_half_up():
    # 1.234 kg at 99.99 a kg: 1234 x 9999 / 1000 = 12338766 / 1000 = 12338.766 -> 12339
    r, _ = parse({"at": "2026-01-01T10:00", "lines": [{"sku": "ham", "quantity": 1234, "price": 9999}]})
    assert r.lines[0].amount == 12339


def test_weight_line_exact_half_rounds_up():
    # 0.5 kg at 0.01: 500 x 1 / 1000 = 0.5 -> 1;  1.5 kg at 0.03: 1500 x 3 / 1000 = 4.5 -> 5
    r, _ = parse({"at": "2026-01-01T10:00", "lines": [{"sku": "a", "quantity": 500, "price": 1},
                                                     {"sku": "b", "quantity": 1500, "price": 3}]})
    assert [ln.amount for ln in r.lines] == [1, 5]


# ---- good inputs and defaults ----------------------------------------------------------------------------

def test_receipt_values_and_defaults():
    r, m = parse()
    assert m is None                                        # no member: anonymous
    assert r.at == dt.datetime(2026, 3, 2, 12, 30)          # the wall clock as written; offset dropped
    assert (r.store, r.terminal, r.number, r.channel, r.coupons, r.redeem_points) == ("", "", "", "pos", (), 0)
    assert r.lines[0] == Line(sku="milk-1l", quantity=2000, price=8990, amount=17980, categories=("dairy",))
    assert r.lines[1] == Line(sku="cheese-200", quantity=1000, price=45000, amount=44999, categories=(),
                              external_discount=44999, min_price=100, no_discount=True, no_accrual=True,
                              no_redeem=True)


def test_receipt_explicit_fields():
    receipt = dict(RECEIPT, store="msk-01", terminal="pos-3", number="000123", channel="online",
                   coupons=["WELCOME500"], redeem_points=500)
    r, _ = parse(receipt)
    assert (r.store, r.terminal, r.number, r.channel, r.coupons, r.redeem_points) == (
        "msk-01", "pos-3", "000123", "online", ("WELCOME500",), 500)


def test_member_values():
    _, m = parse(member=MEMBER)
    assert m == Member(card="7000001", status="active", tier="Gold", active_points=1000, pending_points=5,
                       audiences=frozenset({"women-q1"}), usage={"p1": 2}, purchases_sum=150000)


def test_member_defaults_to_lowest_tier_and_zero_balances():
    _, m = parse(member={})
    assert (m.card, m.status, m.tier, m.active_points, m.pending_points) == (None, "active", "Basic", 0, 0)
    assert m.audiences == frozenset() and m.usage == {} and m.purchases_sum is None


@pytest.mark.parametrize("status", ["suspended", "blocked", "restricted"])
def test_member_with_any_status_is_returned(status):
    _, m = parse(member={"card": "1", "status": status})
    assert m.status == status


def test_null_optional_fields_count_as_absent():
    r, m = parse(dict(RECEIPT, coupons=None, store=None), {"tier": None, "usage": None})
    assert r.coupons == () and r.store == "" and m.tier == "Basic" and m.usage == {}


@pytest.mark.parametrize("text, expected", [
    ("2026-03-02T12:30", dt.datetime(2026, 3, 2, 12, 30)),
    ("2026-03-02T12:30:59", dt.datetime(2026, 3, 2, 12, 30, 59)),
    ("2026-03-02T12:30:59.999999", dt.datetime(2026, 3, 2, 12, 30, 59)),   # fraction dropped, not rounded
    ("2026-03-02T23:59:59.5-05:00", dt.datetime(2026, 3, 2, 23, 59, 59)),  # offset dropped, no conversion
    ("2026-03-02T00:00:00Z", dt.datetime(2026, 3, 2, 0, 0)),
])
def test_at_is_the_wall_clock_as_written(text, expected):
    assert parse_at(text) == expected


def test_unknown_keys_are_ignored():
    r, _ = parse(dict(RECEIPT, cashier="Ann"))
    assert len(r.lines) == 2


# ---- bad inputs: one path each ---------------------------------------------------------------------------

def line(**kw):
    base = {"sku": "x", "quantity": 1000, "price": 100}
    base.update(kw)
    return base


def receipt_with(**kw):
    r = copy.deepcopy(RECEIPT)
    r.update(kw)
    return r


BAD_RECEIPTS = [
    (receipt_with(at=None), "receipt.at", "required"),
    ({"lines": RECEIPT["lines"]}, "receipt.at", "required"),
    (receipt_with(at="2026-03-02 12:30"), "receipt.at", "ISO 8601"),
    (receipt_with(at="2026-02-30T12:30"), "receipt.at", "not a valid date"),
    (receipt_with(at="2026-03-02T25:00"), "receipt.at", "not a valid date"),
    (receipt_with(at=1772443800), "receipt.at", "ISO 8601"),
    (receipt_with(lines=[]), "receipt.lines", "at least one line"),
    (receipt_with(lines={"sku": "x"}), "receipt.lines", "expected a list"),
    (receipt_with(lines=[line()] * 1001), "receipt.lines", "at most 1000"),
    ({"at": "2026-03-02T12:30"}, "receipt.lines", "required"),
    (receipt_with(store=5), "receipt.store", "expected a string"),
    (receipt_with(channel=["pos"]), "receipt.channel", "expected a string"),
    (receipt_with(coupons="WELCOME"), "receipt.coupons", "list of strings"),
    (receipt_with(coupons=["A", 5]), "receipt.coupons[1]", "expected a string"),
    (receipt_with(redeem_points=-1), "receipt.redeem_points", "at least 0"),
    (receipt_with(redeem_points=10.0), "receipt.redeem_points", "integer"),
    (receipt_with(redeem_points=True), "receipt.redeem_points", "integer"),
    (receipt_with(redeem_points=10**12 + 1), "receipt.redeem_points", "at most"),
    (receipt_with(lines=[line(), "milk"]), "receipt.lines[1]", "expected an object"),
    (receipt_with(lines=[line(), line(), line(sku="")]), "receipt.lines[2].sku", "must not be empty"),
    (receipt_with(lines=[line(sku=None)]), "receipt.lines[0].sku", "required"),
    (receipt_with(lines=[line(sku=4601234567890)]), "receipt.lines[0].sku", "expected a string"),
    (receipt_with(lines=[line(), line(), line(quantity=0)]), "receipt.lines[2].quantity", "at least 1"),
    (receipt_with(lines=[line(), line(), line(quantity=1.5)]), "receipt.lines[2].quantity", "thousandths"),
    (receipt_with(lines=[line(quantity=True)]), "receipt.lines[0].quantity", "integer"),
    (receipt_with(lines=[line(quantity=10**9 + 1)]), "receipt.lines[0].quantity", "at most"),
    (receipt_with(lines=[{"sku": "x", "price": 1}]), "receipt.lines[0].quantity", "required"),
    (receipt_with(lines=[{"sku": "x", "quantity": 1000}]), "receipt.lines[0].price", "required"),
    (receipt_with(lines=[line(price=-1)]), "receipt.lines[0].price", "at least 0"),
    (receipt_with(lines=[line(price="89.90")]), "receipt.lines[0].price", "minor units"),
    (receipt_with(lines=[line(price=10**12 + 1)]), "receipt.lines[0].price", "at most"),
    (receipt_with(lines=[line(amount=-5)]), "receipt.lines[0].amount", "at least 0"),
    (receipt_with(lines=[line(quantity=10**9, price=10**12)]), "receipt.lines[0].amount", "over the limit"),
    (receipt_with(lines=[line(external_discount=101)]), "receipt.lines[0].external_discount",
     "more than the line amount 100"),
    (receipt_with(lines=[line(amount=50, external_discount=51)]), "receipt.lines[0].external_discount",
     "more than the line amount 50"),
    (receipt_with(lines=[line(external_discount=-1)]), "receipt.lines[0].external_discount", "at least 0"),
    (receipt_with(lines=[line(min_price=-1)]), "receipt.lines[0].min_price", "at least 0"),
    (receipt_with(lines=[line(no_discount=1)]), "receipt.lines[0].no_discount", "true or false"),
    (receipt_with(lines=[line(no_accrual="false")]), "receipt.lines[0].no_accrual", "true or false"),
    (receipt_with(lines=[line(no_redeem=0)]), "receipt.lines[0].no_redeem", "true or false"),
    (receipt_with(lines=[line(categories="dairy")]), "receipt.lines[0].categories", "list of strings"),
    (receipt_with(lines=[line(categories=["dairy", None])]), "receipt.lines[0].categories[1]", "expected a string"),
    ("receipt", "receipt", "expected an object"),
    ([], "receipt", "expected an object"),
]


@pytest.mark.parametrize("receipt, path, words", BAD_RECEIPTS, ids=[c[1] + ":" + c[2] for c in BAD_RECEIPTS])
def test_bad_receipt_names_its_path(receipt, path, words):
    err = error_of(receipt)
    assert err.path == path
    assert words in err.reason


def test_null_receipt_is_required():
    with pytest.raises(InputError) as info:
        parse_request(None, None, PROGRAM)
    assert (info.value.path, info.value.reason) == ("receipt", "required")


BAD_MEMBERS = [
    ("7000001", "member", "expected an object"),
    ({"status": "frozen"}, "member.status", "active, restricted, suspended, blocked"),
    ({"status": "Active"}, "member.status", "expected one of"),
    ({"tier": "Platinum"}, "member.tier", "unknown tier 'Platinum' (program tiers: Basic, Gold)"),
    ({"tier": 1}, "member.tier", "expected a string"),
    ({"card": 7000001}, "member.card", "expected a string"),
    ({"active_points": -1}, "member.active_points", "at least 0"),
    ({"active_points": 1.0}, "member.active_points", "integer"),
    ({"pending_points": False}, "member.pending_points", "integer"),
    ({"audiences": "women-q1"}, "member.audiences", "list of strings"),
    ({"audiences": ["a", 1]}, "member.audiences[1]", "expected a string"),
    ({"usage": ["p1"]}, "member.usage", "expected an object"),
    ({"usage": {"p1": -1}}, "member.usage.p1", "at least 0"),
    ({"usage": {"p1": "2"}}, "member.usage.p1", "integer"),
    ({"purchases_sum": -1}, "member.purchases_sum", "at least 0"),
]


@pytest.mark.parametrize("member, path, words", BAD_MEMBERS, ids=[c[1] + ":" + c[2] for c in BAD_MEMBERS])
def test_bad_member_names_its_path(member, path, words):
    err = error_of(member=member)
    assert err.path == path
    assert words in err.reason


def test_budgets_used():
    assert parse_budgets_used(None) == {}
    assert parse_budgets_used({"p1": 500}) == {"p1": 500}
    with pytest.raises(InputError) as info:
        parse_budgets_used({"p1": -1})
    assert info.value.path == "budgets_used.p1"
    with pytest.raises(InputError) as info:
        parse_budgets_used([1])
    assert info.value.path == "budgets_used"
