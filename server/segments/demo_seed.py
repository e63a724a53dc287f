"""``loyalty demo seed``: a believable population, generated inside the database with set-based SQL.

Each table is filled by ONE ``INSERT ... SELECT`` over a generated series (PostgreSQL ``generate_series``,
SQLite a recursive CTE): no rows travel through Python. Randomness is a deterministic integer hash of the
row number and a salt (the same ``seed`` gives the same population on both databases):

- members: 56% women, birth dates 1950-2007 (10% unknown), cities weighted towards Moscow and Saint
  Petersburg, sources mostly POS, registration over the last three years, a custom ``pet`` field for some;
- one card each (93% active, then restricted, suspended, blocked), email / sms / push subscriptions;
- purchases over the last year with a December peak, daytime hours, checks around 1,000-2,000 RUB with a
  long tail, occasional discounts, 2% refunded and 1% cancelled, buyers skewed (a few buy very often);
  one or two lines each from a catalogue that includes the demo program's dairy skus;
- balances, tiers, an accrual (and, for a third, a redemption) ledger entry per member and the matching lots,
  so that ``loyalty ledger check`` still agrees; message events (sent / opened / clicked emails).

1,000,000 members and 10,000,000 purchases take a few minutes on PostgreSQL (FK triggers are switched off
for the seeding session when the role may do so).
"""
from __future__ import annotations

import datetime as dt
import functools
import time

from sqlalchemy import func, insert, select, text

from loyalty.server.db import Database
from loyalty.server.models import cards, members, program_versions, purchases
from loyalty.server.timeutil import utcnow

__all__ = ["seed_population", "SKUS"]

SKUS = ("milk-1l", "kefir-1l", "cheese-200", "bread-white", "buns-4", "coffee-beans-1kg", "tea-green-100",
        "apples-1kg", "bananas-1kg", "tomatoes-1kg", "chicken-1kg", "pasta-500", "rice-1kg", "juice-1l",
        "water-1.5l", "chocolate-100", "cookies-300", "eggs-10", "butter-180", "yogurt-125")
FEMALE = ("Anna", "Maria", "Elena", "Olga", "Natalia", "Irina", "Svetlana", "Tatiana", "Daria", "Vera")
MALE = ("Alexei", "Dmitry", "Sergei", "Andrei", "Ivan", "Mikhail", "Nikolai", "Pavel", "Boris", "Gleb")
LAST = ("Ivanov", "Petrov", "Sidorov", "Smirnov", "Kuznetsov", "Popov", "Sokolov", "Orlov", "Volkov", "Egorov")
CITIES = (("Moscow", 30), ("Saint Petersburg", 15), ("Kazan", 8), ("Novosibirsk", 8), ("Yekaterinburg", 8),
          ("Nizhny Novgorod", 7), ("Samara", 6), ("Rostov-on-Don", 6), ("Krasnodar", 6), ("Omsk", 6))
SOURCES = (("pos", 60), ("form", 20), ("api", 10), ("import", 7), ("manual", 3))
STATUSES = (("active", 93), ("restricted", 3), ("suspended", 2), ("blocked", 2))


def _h(expr: str, salt: int) -> str:
    """A deterministic 32-bit hash of an integer expression (Knuth's multiplicative hash)."""
    return f"((({expr}) + {salt * 7919}) * 2654435761 % 4294967296)"


def _pick(expr: str, values) -> str:
    return "CASE " + expr + " " + " ".join(f"WHEN {i} THEN '{v}'" for i, v in enumerate(values)) + " END"


def _weighted(expr: str, pairs) -> str:
    out, acc = [], 0
    for value, weight in pairs:
        acc += weight
        out.append(f"WHEN ({expr}) % 100 < {acc} THEN '{value}'")
    return "CASE " + " ".join(out) + f" ELSE '{pairs[0][0]}' END"


def _ensure_program(conn, now) -> int:
    version = conn.execute(select(func.max(program_versions.c.version))).scalar()
    if version is not None:
        return version
    from loyalty.server.demo import DEMO_PROGRAM_PATH
    import hashlib
    yaml_text = DEMO_PROGRAM_PATH.read_text(encoding="utf-8")
    conn.execute(insert(program_versions).values(version=1, name="demo", yaml=yaml_text,
                                                 checksum=hashlib.sha256(yaml_text.encode()).hexdigest(),
                                                 published_at=now, comment="demo seed"))
    return 1


def seed_population(database: Database | str, *, members_n: int, purchases_n: int, seed: int = 1,
                    now: dt.datetime | None = None, progress=None) -> dict:
    """Add ``members_n`` members and ``purchases_n`` purchases (with everything around them); returns the
    timings in seconds per table and the id range of the new members."""
    db = Database(database) if isinstance(database, str) else database
    now = now or utcnow()
    ops, today = db.dialect_ops, now.astimezone(dt.timezone.utc).date()
    # a moment ``days`` before today (UTC midnight) and ``secs`` after: as a timestamp, its date, ISO text
    ts, day, iso = (functools.partial(f, today) for f in (ops.timestamp, ops.date_of, ops.iso_utc))
    report = progress or (lambda step, done, total: None)
    timings: dict[str, float] = {}
    steps = ["members", "cards", "subscriptions", "purchases", "purchase_lines", "points", "message_events"]

    def run(step: str, statements):
        t0 = time.perf_counter()
        with db.engine.connect() as conn:
            with conn.begin():
                ops.start_bulk_load(conn)
                for sql in statements:
                    conn.execute(text(sql))
        timings[step] = round(time.perf_counter() - t0, 3)
        report(step, steps.index(step) + 1, len(steps))

    with db.engine.begin() as conn:
        version = _ensure_program(conn, now)
        base = conn.execute(select(func.coalesce(func.max(members.c.id), 0))).scalar()
        card_base = conn.execute(select(func.coalesce(func.max(cards.c.id), 0))).scalar()
        pbase = conn.execute(select(func.coalesce(func.max(purchases.c.id), 0))).scalar()
        from loyalty.server.models import ledger, point_lots
        lbase = conn.execute(select(func.coalesce(func.max(ledger.c.id), 0))).scalar()
        lotbase = conn.execute(select(func.coalesce(func.max(point_lots.c.id), 0))).scalar()
    n, m, s = members_n, purchases_n, seed * 1000
    h = lambda k: _h("i", s + k)  # noqa: E731

    gender = f"CASE WHEN {h(1)} % 100 < 56 THEN 'female' WHEN {h(1)} % 100 < 98 THEN 'male' ELSE '' END"
    first = f"CASE WHEN {h(1)} % 100 < 56 THEN {_pick(f'{h(2)} % 10', FEMALE)} ELSE {_pick(f'{h(2)} % 10', MALE)} END"
    last = f"{_pick(f'{h(3)} % 10', LAST)} || CASE WHEN {h(1)} % 100 < 56 THEN 'a' ELSE '' END"
    custom = ops.as_json(f"CASE {h(8)} % 5 WHEN 0 THEN '" + '{"pet": "cat"}' + "' WHEN 1 THEN '" + '{"pet": "dog"}'
                    + "' ELSE '{}' END")
    run("members", [ops.series(n, f"""
        INSERT INTO members (id, phone, first_name, last_name, gender, birth_date, email, city, custom, source,
                             enroll_request_id, registered_at)
        SELECT {base} + i, '+79' || {ops.zero_pad(f'{base} + i', 9)}, {first}, {last}, {gender},
               CASE WHEN {h(4)} % 10 = 0 THEN NULL ELSE {ops.date_plus('1950-01-01', f'{h(5)} % 21000')} END,
               CASE WHEN {h(6)} % 10 < 7 THEN 'member' || {ops.as_text(f'{base} + i')} || '@example.com' ELSE '' END,
               {_weighted(h(7), CITIES)},
               {custom},
               {_weighted(h(9), SOURCES)}, NULL, {ts(f'{h(10)} % 1095 + 1', f'{h(11)} % 86400')}
        FROM {{S}}""")])
    run("cards", [f"""
        INSERT INTO cards (id, number, member_id, status, status_changed_at)
        SELECT {card_base} + (id - {base}), '77' || {ops.zero_pad('id', 11)}, id,
               {_weighted(_h('id', s + 12), STATUSES)}, registered_at FROM members WHERE id > {base}"""])
    run("subscriptions", [f"""
        INSERT INTO subscriptions (member_id, channel, "on", saved_on, updated_at)
        SELECT id, '{ch}', {_h('id', s + 13 + k)} % 100 < {pct}, NULL, registered_at FROM members WHERE id > {base}
        """ for k, (ch, pct) in enumerate((("email", 60), ("sms", 50), ("push", 35)))])

    # purchases: skewed buyers (density ~ 1/sqrt), December peak, daytime, realistic checks
    today = now.astimezone(dt.timezone.utc).date()
    dec_end = (today - dt.date(today.year - 1, 12, 31)).days
    dec_day = f"({dec_end} + {h(22)} % 31)"
    ph = lambda k: _h("i", s + k)  # noqa: E731
    inner = f"""
        SELECT i, {base} + 1 + ({ph(21)} % 65536) * ({ph(21)} % 65536) * {n} / 4294967296 AS member_id,
               CASE WHEN {ph(23)} % 100 < 12 AND {dec_end} BETWEEN 0 AND 334 THEN {dec_day} ELSE {ph(24)} % 365 END
                   AS days,
               (9 + {ph(25)} % 13) * 3600 + {ph(26)} % 3600 AS secs,
               5000 + {ph(27)} % 120000 + {ph(28)} % 80000
                   + CASE WHEN {ph(29)} % 10 = 0 THEN {ph(30)} % 500000 ELSE 0 END AS amount,
               {ph(31)} % 100 AS st, {ph(32)} % 4 AS disc_kind, {ph(33)} % 15 AS disc_pct,
               {ph(34)} % 20 AS store
        FROM {{S}}"""
    run("purchases", [ops.series(m, f"""
        INSERT INTO purchases (id, store, terminal, number, member_id, card, program_version, request_hash, answer,
                               receipt_at, receipt_time, receipt_date, amount, discount, payable,
                               redeemed_points, redeemed_amount, accrued_points, refunded_payable,
                               refunded_amount, returned_points, taken_back_points, status, created_at)
        SELECT {pbase} + i, 'store-' || {ops.zero_pad('store + 1', 2)}, 'pos-' || {ops.as_text('i % 4 + 1')},
               'S{seed}-' || {ops.as_text(f'{pbase} + i')}, member_id, '77' || {ops.zero_pad('member_id', 11)},
               {version},
               '', {ops.as_json("'{}'")}, {iso('days', 'secs')}, {ts('days', 'secs')}, {day('days', 'secs')},
               amount, disc, amount - disc, 0, 0, (amount - disc) * 3 / 10000,
               CASE WHEN st >= 97 AND st < 99 THEN amount - disc ELSE 0 END,
               CASE WHEN st >= 97 AND st < 99 THEN amount - disc ELSE 0 END, 0, 0,
               CASE WHEN st < 97 THEN 'confirmed' WHEN st < 99 THEN 'refunded' ELSE 'cancelled' END,
               {ts('days', 'secs')}
        FROM (SELECT q.*, CASE WHEN disc_kind = 0 THEN amount * disc_pct / 100 ELSE 0 END AS disc
              FROM ({inner}) q) r""")])
    lh = lambda k: _h("p.id", s + k)  # noqa: E731
    sku1, sku2 = _pick(f"{lh(41)} % {len(SKUS)}", SKUS), _pick(f"{lh(42)} % {len(SKUS)}", SKUS)
    two = f"{lh(43)} % 10 < 4"
    refunded = "CASE WHEN p.status = 'refunded' THEN 1000 ELSE 0 END"
    run("purchase_lines", [f"""
        INSERT INTO purchase_lines (purchase_id, line, sku, quantity, amount, payable, redeemed, points,
                                    refunded_quantity, refunded_payable, refunded_redeemed, refunded_points)
        SELECT p.id, 0, {sku1}, 1000, p.amount - CASE WHEN {two} THEN p.amount / 3 ELSE 0 END,
               p.payable - CASE WHEN {two} THEN p.payable / 3 ELSE 0 END, 0, 0, {refunded}, 0, 0, 0
        FROM purchases p WHERE p.id > {pbase}""", f"""
        INSERT INTO purchase_lines (purchase_id, line, sku, quantity, amount, payable, redeemed, points,
                                    refunded_quantity, refunded_payable, refunded_redeemed, refunded_points)
        SELECT p.id, 1, {sku2}, 1000, p.amount / 3, p.payable / 3, 0, 0, {refunded}, 0, 0, 0
        FROM purchases p WHERE p.id > {pbase} AND {two}"""])

    pend_since = ts("14", "0")
    far = ts("-200", "0")
    soon = ts("-7", "0")
    nowts = ts("0", "0")
    agg = f"""(SELECT m.id AS member_id, COALESCE(a.acc, 0) AS acc, COALESCE(a.pend, 0) AS pend,
                     CASE WHEN {_h('m.id', s + 51)} % 3 = 0 THEN (COALESCE(a.acc, 0) - COALESCE(a.pend, 0)) / 2
                          ELSE 0 END AS red, COALESCE(a.total, 0) AS total
              FROM members m LEFT JOIN (
                  SELECT member_id, CAST(SUM(accrued_points) AS BIGINT) AS acc,
                         CAST(SUM(payable - refunded_payable) AS BIGINT) AS total,
                         CAST(SUM(CASE WHEN created_at >= {pend_since} THEN accrued_points ELSE 0 END) AS BIGINT)
                             AS pend
                  FROM purchases WHERE member_id > {base} AND status = 'confirmed' GROUP BY member_id) a
              ON a.member_id = m.id WHERE m.id > {base})"""
    k = f"(x.member_id - {base})"
    run("points", [
        f"CREATE TEMPORARY TABLE seed_points AS SELECT * FROM {agg} x",
        f"""INSERT INTO balances (member_id, active, pending, purchases_sum, tier, updated_at)
            SELECT member_id, acc - pend - red, pend, total,
                   CASE WHEN total >= 5000000 THEN 'Gold' WHEN total >= 2000000 THEN 'Silver' ELSE 'Basic' END,
                   {nowts} FROM seed_points""",
        f"""INSERT INTO ledger (id, key, member_id, kind, points, active_delta, pending_delta, purchase_id,
                                refund_id, operation_id, reason, created_at)
            SELECT {lbase} + 2 * {k} - 1, 'demo-seed-accrual-' || {ops.as_text('x.member_id')}, x.member_id, 'accrual',
                   acc, acc - pend, pend, NULL, NULL, NULL, 'demo seed', {nowts}
            FROM seed_points x WHERE acc > 0""",
        f"""INSERT INTO ledger (id, key, member_id, kind, points, active_delta, pending_delta, purchase_id,
                                refund_id, operation_id, reason, created_at)
            SELECT {lbase} + 2 * {k}, 'demo-seed-redemption-' || {ops.as_text('x.member_id')}, x.member_id,
                   'redemption', -red, -red, 0, NULL, NULL, NULL, 'demo seed', {nowts}
            FROM seed_points x WHERE red > 0""",
        f"""INSERT INTO point_lots (id, member_id, points, remaining, state, activates_at, expires_at, entry_id,
                                    purchase_id, expiring_notified)
            SELECT {lotbase} + 2 * {k} - 1, x.member_id, acc - pend, acc - pend - red, 'active', NULL, {far},
                   {lbase} + 2 * {k} - 1, NULL, {ops.false}
            FROM seed_points x WHERE acc - pend > 0""",
        f"""INSERT INTO point_lots (id, member_id, points, remaining, state, activates_at, expires_at, entry_id,
                                    purchase_id, expiring_notified)
            SELECT {lotbase} + 2 * {k}, x.member_id, pend, pend, 'pending', {soon}, {far},
                   {lbase} + 2 * {k} - 1, NULL, {ops.false}
            FROM seed_points x WHERE pend > 0""",
        "DROP TABLE seed_points",
    ])
    mh = lambda k: _h("id", s + k)  # noqa: E731
    run("message_events", [f"""
        INSERT INTO message_events (member_id, channel, kind, at)
        SELECT id, 'email', '{kind}', {ts(f'{mh(61)} % 60 + {lag}', f'{mh(62)} % 86400')}
        FROM members WHERE id > {base} AND email <> '' AND {mh(60)} % 10 < {pct}
        """ for kind, pct, lag in (("sent", 6, 1), ("opened", 3, 0), ("clicked", 1, 0))])
    upkeep = ops.after_bulk_load(
        db.engine, {table: "id" for table in ("members", "cards", "purchases", "ledger", "point_lots")},
        ("members", "cards", "subscriptions", "balances", "purchases", "purchase_lines", "ledger", "point_lots",
         "message_events"))
    if upkeep is not None:
        timings["vacuum_analyze"] = round(upkeep, 3)
    return {"members": n, "purchases": m, "first_member_id": base + 1, "last_member_id": base + n,
            "seconds": timings, "total_seconds": round(sum(timings.values()), 3)}
