"""Batch points actions: award or deduct points for every member of an audience, a million at a time.

``create`` freezes the audience into ``batch_members`` (one ``INSERT ... SELECT`` from the segment module's
predicate, or from a static list) together with the ``batches`` progress row; the batch id is the
idempotency key (the same request again returns the batch, another request under that id is
``AlreadyExists``), also for calls that arrive at once: the progress row is inserted first, and the losers
wait on its key and then replay it. ``process_chunk`` then does the next ``chunk`` members by member id, as
ONE transaction of set-based statements:

1. the batch row is taken ``FOR UPDATE SKIP LOCKED`` (two workers never do the same chunk; the second one
   goes on with other work), the chunk's upper member id is found, and (PostgreSQL) the chunk's balance
   rows are locked, so a concurrent confirm of one of these members waits rather than interleaves;
2. ``INSERT ... SELECT`` of the ledger entries keyed ``batch:<id>:<member>`` (unique, ``ON CONFLICT DO
   NOTHING``: a safety net; the chunk range itself is never done twice, as the progress row moves in the
   same transaction);
3. award: ``INSERT ... SELECT`` of the lots (a member in debt gets a lot holding what is left after the
   debt); deduct: one ``UPDATE ... FROM`` of the lots with a window per member (earliest expiry first);
4. one ``UPDATE ... FROM`` of the balances from the entries just written, and the progress row moved to the
   chunk's last member id.

A kill loses nothing: the chunk in flight rolls back whole and the next worker (or ``loyalty batch ...``
run again) resumes after the last committed chunk. Deduct takes what the member has, up to ``points``,
never below zero; members with nothing are counted as processed but get no entry.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json

from sqlalchemy import bindparam, func, insert, literal, select, text, update

from loyalty.server.dialects import DialectOps, dialect_of
from loyalty.server.errors import AlreadyExists, InvalidArgument, NotFound
from loyalty.server.limits import REASON_LIMIT
from loyalty.server.members import check_card
from loyalty.server.models import UTCDateTime, cards, members
from loyalty.server.security import audit

from .common import claim, insert_ignore
from .models import batch_members, batches

__all__ = ["create", "process_chunk", "progress", "run", "CHUNK"]

CHUNK = 10_000
_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def _validate(batch_id: str, kind: str, points: int, expiry_days, target: dict, reason: str) -> None:
    if not isinstance(batch_id, str) or not 1 <= len(batch_id) <= 80 or not set(batch_id) <= _ID_CHARS:
        raise InvalidArgument("batch_id", "1-80 letters, digits, _ . - are required")
    if kind not in ("award", "deduct"):
        raise InvalidArgument("kind", f"expected award or deduct, got {kind!r}")
    if isinstance(points, bool) or not isinstance(points, int) or not 1 <= points <= 10**9:
        raise InvalidArgument("points", f"must be 1 to {10**9}, got {points!r}")
    if expiry_days is not None:
        if kind == "deduct":
            raise InvalidArgument("expiry_days", "only awarded points expire")
        if not 1 <= expiry_days <= 36500:
            raise InvalidArgument("expiry_days", f"must be 1 to 36500, got {expiry_days}")
    if not isinstance(reason, str) or not reason.strip():
        raise InvalidArgument("reason", "required: why these points move (it is written on every ledger entry)")
    if len(reason) > REASON_LIMIT:
        raise InvalidArgument("reason", f"at most {REASON_LIMIT} characters, got {len(reason)}")
    keys = [k for k in ("segment", "members", "all") if target.get(k)]
    if len(keys) != 1:
        named = ", ".join({"all": "all_members"}.get(k, k) for k in keys)
        raise InvalidArgument(keys[0] if keys else "target",
                              "exactly one of segment (a segment or audience id), members (a list) or all_members"
                              + (f", not {named} together" if len(keys) > 1 else ""))


def create(database, now: dt.datetime, batch_id: str, kind: str, points: int, *, reason: str = "",
           expiry_days: int | None = None, target: dict, segments=None) -> dict:
    """Create the batch and freeze its audience (idempotent by ``batch_id``); returns its progress."""
    _validate(batch_id, kind, points, expiry_days, target, reason)
    request_hash = hashlib.sha256(json.dumps([kind, points, reason, expiry_days, target], sort_keys=True)
                                  .encode()).hexdigest()

    def tx(conn):
        # The batch row first, ON CONFLICT DO NOTHING: of identical concurrent calls one inserts it and the
        # others wait on its key until that transaction ends, then replay the committed batch (or, if it rolled
        # back, one of them becomes the creator). The audience snapshot follows in the creator's transaction,
        # so nobody ever sees a batch without its members or writes the members twice.
        values = {"id": batch_id, "kind": kind, "points": points, "reason": reason, "expiry_days": expiry_days,
                  "target": target, "request_hash": request_hash, "state": "running", "total": 0, "processed": 0,
                  "written": 0, "points_moved": 0, "position": 0, "created_at": now, "updated_at": now,
                  "finished_at": None}
        created = conn.execute(insert_ignore(conn, batches).values(**values).returning(batches.c.id)).scalar()
        if created is None:
            row = conn.execute(select(batches).where(batches.c.id == batch_id)).one()
            if row.request_hash != request_hash:
                raise AlreadyExists(f"batch {batch_id} was already started with a different request")
            return dict(row._mapping)
        if target.get("segment"):
            seg = segments
            if seg is None:
                from loyalty.server.segments.service import SegmentService
                seg = SegmentService(database, clock=lambda: now)
            where, src = seg.predicate(conn, target["segment"])
            query = select(literal(batch_id), members.c.id).select_from(src).where(where)
            conn.execute(insert(batch_members).from_select(["batch_id", "member_id"], query))
        elif target.get("all"):
            conn.execute(insert(batch_members).from_select(["batch_id", "member_id"],
                                                           select(literal(batch_id), members.c.id)))
        else:
            ids = _resolve(conn, target["members"])
            for k in range(0, len(ids), 5000):
                conn.execute(insert(batch_members), [{"batch_id": batch_id, "member_id": m} for m in ids[k:k + 5000]])
        dialect_of(conn).analyze(conn, "batch_members")     # fresh statistics: chunks join it by index
        total = conn.execute(select(func.count()).where(batch_members.c.batch_id == batch_id)).scalar_one()
        audit.record(conn, "StartBatch", f"batch:{batch_id} members:{total}", now)
        values.update(total=total, state="running" if total else "done", finished_at=None if total else now)
        conn.execute(update(batches).where(batches.c.id == batch_id).values(
            total=total, state=values["state"], finished_at=values["finished_at"]))
        return values
    return _view(database.run_write(tx, idempotent=True))     # keyed by batch_id: a lost COMMIT is looked up


def _resolve(conn, refs) -> list[int]:
    """Member ids of a static list: numbers or ``id:N`` are member ids, other text a card number."""
    if not isinstance(refs, list):
        raise InvalidArgument("target.members", "a list of member ids or card numbers")
    ids, cards_wanted = set(), {}
    for i, ref in enumerate(refs):
        if isinstance(ref, int) and not isinstance(ref, bool):
            ids.add(ref)
        elif isinstance(ref, str) and ref.startswith("id:") and ref[3:].isdigit():
            ids.add(int(ref[3:]))
        elif isinstance(ref, str) and ref.strip():
            check_card(f"target.members[{i}]", ref.strip())       # an erased card's marker names no one
            cards_wanted[ref.strip()] = i
        else:
            raise InvalidArgument(f"target.members[{i}]", f"a member id or a card number, got {ref!r}")
    found = set()
    id_list = sorted(ids)
    for k in range(0, len(id_list), 1000):
        found |= set(conn.execute(select(members.c.id).where(members.c.id.in_(id_list[k:k + 1000]))).scalars())
    missing = ids - found
    if missing:
        raise NotFound(f"no member with id {min(missing)}")
    card_list = sorted(cards_wanted)
    for k in range(0, len(card_list), 1000):
        rows = conn.execute(select(cards.c.number, cards.c.member_id)
                            .where(cards.c.number.in_(card_list[k:k + 1000]))).all()
        for number, member_id in rows:
            found.add(member_id)
            cards_wanted.pop(number, None)
    if cards_wanted:
        number, i = next(iter(cards_wanted.items()))
        raise NotFound(f"target.members[{i}]: card {number} was not found")
    return sorted(found)


def _view(row: dict) -> dict:
    keys = ("id", "kind", "points", "reason", "expiry_days", "target", "state", "total", "processed", "written",
            "points_moved", "position", "created_at", "updated_at", "finished_at")
    return {k: row[k] for k in keys}


def progress(database, batch_id: str) -> dict:
    with database.read() as conn:
        row = conn.execute(select(batches).where(batches.c.id == batch_id)).first()
    if row is None:
        raise NotFound(f"batch {batch_id} was not found")
    return _view(dict(row._mapping))


def _sql(ops: DialectOps, kind: str) -> list[str]:
    least, greatest = ops.least, ops.greatest
    key = "(:prefix || bm.member_id)"
    in_chunk = "bm.batch_id = :bid AND bm.member_id > :lo AND bm.member_id <= :hi"
    out = []
    if ops.writes_in_with and kind == "award":
        # one statement: lock the chunk's balances, write the entries (RETURNING feeds the lots and the balance
        # update without looking the keys up again), count what was written
        return [f"""WITH chunk AS (
                SELECT b.member_id, b.active FROM batch_members bm JOIN balances b ON b.member_id = bm.member_id
                WHERE {in_chunk} FOR UPDATE OF b),
            ent AS (
                INSERT INTO ledger (key, member_id, kind, points, active_delta, pending_delta, purchase_id, refund_id,
                    operation_id, reason, created_at)
                SELECT :prefix || member_id, member_id, 'adjustment', :points, :points, 0, NULL, NULL, :op, :reason,
                       :now
                FROM chunk ON CONFLICT (key) DO NOTHING RETURNING id, member_id),
            lots AS (
                INSERT INTO point_lots (member_id, points, remaining, state, activates_at, expires_at, entry_id,
                    purchase_id, expiring_notified)
                SELECT e.member_id, :points, GREATEST(0, LEAST(:points, c.active + :points)), 'active', :now,
                       :expires, e.id, NULL, false
                FROM ent e JOIN chunk c ON c.member_id = e.member_id),
            upd AS (
                UPDATE balances b SET active = b.active + :points, updated_at = :now FROM ent e
                WHERE b.member_id = e.member_id)
            SELECT count(*), count(*) * :points FROM ent"""]
    if ops.locks_rows:
        out.append(f"""SELECT count(*) FROM (SELECT b.member_id FROM balances b JOIN batch_members bm
            ON bm.member_id = b.member_id WHERE {in_chunk} ORDER BY b.member_id FOR UPDATE OF b) t""")
    if kind == "award":
        out.append(f"""INSERT INTO ledger (key, member_id, kind, points, active_delta, pending_delta, purchase_id,
                refund_id, operation_id, reason, created_at)
            SELECT {key}, bm.member_id, 'adjustment', :points, :points, 0, NULL, NULL, :op, :reason, :now
            FROM batch_members bm WHERE {in_chunk}
              AND EXISTS (SELECT 1 FROM balances b WHERE b.member_id = bm.member_id)
            ON CONFLICT (key) DO NOTHING""")
        # the new lot holds what is left after a debt (active below zero): max(0, min(points, active + points))
        out.append(f"""INSERT INTO point_lots (member_id, points, remaining, state, activates_at, expires_at, entry_id,
                purchase_id, expiring_notified)
            SELECT bm.member_id, :points, {greatest}(0, {least}(:points, b.active + :points)), 'active', :now,
                   :expires, l.id, NULL, false
            FROM batch_members bm JOIN ledger l ON l.key = {key} JOIN balances b ON b.member_id = bm.member_id
            WHERE {in_chunk}""")
    else:
        out.append(f"""INSERT INTO ledger (key, member_id, kind, points, active_delta, pending_delta, purchase_id,
                refund_id, operation_id, reason, created_at)
            SELECT {key}, bm.member_id, 'adjustment', -{least}(:points, b.active), -{least}(:points, b.active), 0,
                   NULL, NULL, :op, :reason, :now
            FROM batch_members bm JOIN balances b ON b.member_id = bm.member_id
            WHERE {in_chunk} AND b.active > 0
            ON CONFLICT (key) DO NOTHING""")
        out.append(f"""UPDATE point_lots SET remaining = point_lots.remaining - {least}(h.remaining, h.take - h.before)
            FROM (SELECT p.id, p.remaining, -l.active_delta AS take,
                         sum(p.remaining) OVER (PARTITION BY p.member_id
                                                ORDER BY p.expires_at ASC NULLS LAST, p.id) - p.remaining AS before
                  FROM batch_members bm JOIN ledger l ON l.key = {key}
                  JOIN point_lots p ON p.member_id = bm.member_id AND p.state = 'active' AND p.remaining > 0
                  WHERE {in_chunk}) AS h
            WHERE point_lots.id = h.id AND h.before < h.take""")
    out.append(f"""UPDATE balances SET active = balances.active + l.active_delta, updated_at = :now
        FROM batch_members bm JOIN ledger l ON l.key = {key}
        WHERE {in_chunk} AND balances.member_id = bm.member_id""")
    out.append(f"""SELECT count(*), coalesce(sum(l.points), 0) FROM batch_members bm JOIN ledger l ON l.key = {key}
        WHERE {in_chunk}""")
    return out


def process_chunk(database, now: dt.datetime, *, batch_id: str | None = None, chunk: int = CHUNK) -> dict | None:
    """Do the next chunk of ``batch_id`` (or of any running batch no other worker holds); returns its
    progress, or None when there was nothing to do."""
    if chunk < 1:
        raise InvalidArgument("chunk", f"must be at least 1 member per transaction, got {chunk}")

    def tx(conn):
        stmt = select(batches).where(batches.c.state == "running")
        if batch_id is not None:
            stmt = stmt.where(batches.c.id == batch_id)
        row = conn.execute(claim(conn, stmt.order_by(batches.c.created_at, batches.c.id).limit(1))).first()
        if row is None:
            return None
        bm = batch_members.c
        bounds = select(bm.member_id).where(bm.batch_id == row.id, bm.member_id > row.position) \
            .order_by(bm.member_id).limit(chunk).subquery()
        n, hi = conn.execute(select(func.count(), func.max(bounds.c.member_id))).one()
        if not n:
            values = {"state": "done", "finished_at": now, "updated_at": now}
            conn.execute(update(batches).where(batches.c.id == row.id).values(**values))
            return _view({**dict(row._mapping), **values})
        dialect_of(conn).tune(conn, work_mem="64MB")
        params = {"bid": row.id, "lo": row.position, "hi": hi, "points": row.points, "prefix": f"batch:{row.id}:",
                  "op": f"batch:{row.id}"[:100], "reason": row.reason or f"batch {row.id}", "now": now,
                  "expires": _expires(conn, row, now)}
        for sql in _sql(dialect_of(conn), row.kind):    # the last statement counts what was written
            stmt = text(sql)
            stmt = stmt.bindparams(*[bindparam(k, type_=UTCDateTime()) for k in ("now", "expires") if f":{k}" in sql])
            result = conn.execute(stmt, params)
        written, moved = result.one()
        values = {"position": hi, "processed": row.processed + n, "written": row.written + written,
                  "points_moved": row.points_moved + abs(int(moved)), "updated_at": now}
        conn.execute(update(batches).where(batches.c.id == row.id).values(**values))
        return _view({**dict(row._mapping), **values})
    return database.run_write(tx)


def _expires(conn, row, now):
    if row.kind != "award":
        return None
    days = row.expiry_days
    if days is None:
        from loyalty.server.models import program_versions
        yaml_text = conn.execute(select(program_versions.c.yaml).order_by(program_versions.c.version.desc())
                                 .limit(1)).scalar()
        if yaml_text:
            try:
                from loyalty.core import load_program_text
                days = load_program_text(yaml_text).expiry_days
            except Exception:  # noqa: BLE001 - validated when published
                days = None
    return now + dt.timedelta(days=days) if days else None


def run(database, clock, batch_id: str, *, chunk: int = CHUNK, on_progress=None) -> dict:
    """Process ``batch_id`` to the end in this process (the CLI's way); resumable after a kill."""
    last = progress(database, batch_id)
    while last["state"] == "running":
        out = process_chunk(database, clock(), batch_id=batch_id, chunk=chunk)
        if out is None:          # another worker holds it right now: wait for it and look again
            import time
            time.sleep(0.2)
            last = progress(database, batch_id)
        else:
            last = out
        if on_progress:
            on_progress(last)
    return last
