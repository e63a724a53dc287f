"""Operation limits against fraud (issue 13; Loymax's soft and hard limits), set in the program file's
``operation_limits`` (``core.model.OperationLimits``):

- ``card_daily_writeoff_points``: points a card writes off on one receipt day;
- ``card_daily_confirms``: confirms of a card on one receipt day;
- ``terminal_confirms_per_minute``: confirms of one till (store + terminal) in the last 60 seconds.

Decided here:

- **What counts.** The day is the receipt's local date (``purchases.receipt_date``), as every window of SPEC 6;
  a card's figures are its member's confirmed purchases of that date (a later refund or cancel does not give a
  confirm back: confirm-and-cancel cycles are what the limit is for); a terminal's are the purchases the server
  wrote in the last minute by its clock (a rate is about now, not about the receipt's time). Anonymous and
  suspended / blocked cards' confirms count for their terminal only. The counts are read from ``purchases``
  themselves, so a replayed confirm (the same receipt key) never counts twice: it replays before any check.
- **Hard and soft.** A confirm that would take a figure past a hard limit is refused with ``FailedPrecondition``
  (``reason`` ``OPERATION_LIMIT``, ``limit`` naming it; the edge adds a ``PreconditionFailure`` whose subject
  is the limit) and writes nothing. One that takes a figure past a soft limit goes through, and a
  ``limit_breaches`` row, written in its transaction, records it for review (``loyalty limits list``).
- **Concurrency.** The figures are read after the member's row lock the confirm path already takes (SQLite:
  the write lock), so two confirms racing on one card see each other. A group-commit batch reads them once for
  all its members (``Tally.prefetch``) and adds what its own confirms do as it goes. A terminal's figure is
  counted under a lock of its own (SQLite: the write lock; PostgreSQL: a transaction-scoped advisory lock per
  terminal, taken after the member locks in terminal order), so racing confirms of different cards at one
  till cannot both pass its last slot either.
"""
from __future__ import annotations

import dataclasses
import datetime as dt

from sqlalchemy import func, insert, select, text, tuple_

from loyalty.core.model import OperationLimit, OperationLimits

from ..errors import FailedPrecondition
from ..models import purchases
from .models import limit_breaches

__all__ = ["LimitExceeded", "Tally", "check", "record", "listing"]

RATE_WINDOW = dt.timedelta(minutes=1)


class LimitExceeded(FailedPrecondition):
    """A hard operation limit refused a confirm; ``details["limit"]`` names it."""

    def __init__(self, name: str, hard: int, value: int, what: str):
        super().__init__(f"operation limit {name}: this confirm would bring {what} to {value}, past the hard "
                         f"limit of {hard}", reason="OPERATION_LIMIT", limit=name, hard=hard, value=value)


@dataclasses.dataclass(frozen=True)
class _Figure:
    """One limit's figure for one confirm: the limit's name, its setting, the count before and after."""
    name: str
    limit: OperationLimit
    value: int
    what: str


class Tally:
    """The limits' figures of one write transaction (a confirm alone, or a group-commit batch), read on ``conn``
    when first needed and kept up to date with what the transaction's own confirms add (``add``)."""

    def __init__(self, conn, limits: OperationLimits, now: dt.datetime):
        self.conn, self.limits, self.now = conn, limits, now
        self._cards: dict[tuple[int, dt.date], list[int]] = {}    # (member, day) -> [confirms, written off]
        self._terminals: dict[tuple[str, str], int] = {}          # (store, terminal) -> confirms this minute
        self.breaches: list[dict] = []                            # soft limits passed by the confirms added

    def check(self, receipt: dict, fx, card: str | None) -> list[dict]:
        """``LimitExceeded`` when the confirm (``receipt`` with its decided effects ``fx``) passes a hard limit;
        else the ``limit_breaches`` rows of the soft limits it passes (their ``purchase_id`` left to
        ``record``)."""
        rows = []
        for figure in self._figures(receipt, fx):
            hard, soft = figure.limit.hard, figure.limit.soft
            if hard is not None and figure.value > hard:
                raise LimitExceeded(figure.name, hard, figure.value, figure.what)
            if soft is not None and figure.value > soft:
                rows.append({"at": self.now, "limit": figure.name, "threshold": soft, "value": figure.value,
                             "member_id": fx.member_id, "card": card if fx.counted else None,
                             "store": receipt["store"], "terminal": receipt["terminal"],
                             "number": receipt["number"], "receipt_date": fx.receipt_date})
        return rows

    def add(self, receipt: dict, fx, breaches: list[dict], purchase_id: int) -> None:
        """Count a confirm this transaction writes (``check``'s ``breaches`` of it, as purchase ``purchase_id``),
        for the next one it checks; ``record`` writes the breaches of every confirm added."""
        if not self.limits.any:
            return
        self.breaches += [{**row, "purchase_id": purchase_id} for row in breaches]
        self._terminals[receipt["store"], receipt["terminal"]] = self._terminal(receipt) + 1
        if fx.counted:
            day = self._card(fx.member_id, fx.receipt_date)
            day[0] += 1
            day[1] += fx.redeemed

    def record(self) -> None:
        record(self.conn, self.breaches)

    def prefetch(self, member_ids, days, terminals) -> None:
        """Read the figures of many members (each of ``days``) and terminals in two statements (a batch)."""
        limits = self.limits
        if member_ids and days and (limits.card_daily_confirms.is_set or limits.card_daily_writeoff_points.is_set):
            for member_id, day in ((m, d) for m in member_ids for d in days):
                self._cards[member_id, day] = [0, 0]
            p = purchases.c
            for member_id, day, confirms, written_off in self.conn.execute(
                    select(p.member_id, p.receipt_date, func.count(), func.coalesce(func.sum(p.redeemed_points), 0))
                    .where(p.member_id.in_(sorted(member_ids)), p.receipt_date.in_(sorted(days)))
                    .group_by(p.member_id, p.receipt_date)):
                self._cards[member_id, day] = [confirms, int(written_off)]     # (PostgreSQL sums are numeric)
        if terminals and limits.terminal_confirms_per_minute.is_set:
            self._lock_terminals(terminals)
            for key in terminals:
                self._terminals[key] = 0
            p = purchases.c
            for store, terminal, confirms in self.conn.execute(
                    select(p.store, p.terminal, func.count())
                    .where(tuple_(p.store, p.terminal).in_(sorted(terminals)), p.created_at > self.now - RATE_WINDOW)
                    .group_by(p.store, p.terminal)):
                self._terminals[store, terminal] = confirms

    # ---- the figures ------------------------------------------------------------------------------------------

    def _figures(self, receipt: dict, fx):
        limits = self.limits
        if limits.terminal_confirms_per_minute.is_set:
            yield _Figure("terminal_confirms_per_minute", limits.terminal_confirms_per_minute,
                          self._terminal(receipt) + 1,
                          f"the confirms of terminal {receipt['store']}/{receipt['terminal']} in a minute")
        if not fx.counted:
            return
        if limits.card_daily_confirms.is_set:
            yield _Figure("card_daily_confirms", limits.card_daily_confirms,
                          self._card(fx.member_id, fx.receipt_date)[0] + 1,
                          f"the card's confirms on {fx.receipt_date.isoformat()}")
        if limits.card_daily_writeoff_points.is_set and fx.redeemed:
            yield _Figure("card_daily_writeoff_points", limits.card_daily_writeoff_points,
                          self._card(fx.member_id, fx.receipt_date)[1] + fx.redeemed,
                          f"the card's points written off on {fx.receipt_date.isoformat()}")

    def _card(self, member_id: int, day: dt.date) -> list[int]:
        figures = self._cards.get((member_id, day))
        if figures is None:
            p = purchases.c
            confirms, written_off = self.conn.execute(
                select(func.count(), func.coalesce(func.sum(p.redeemed_points), 0))
                .where(p.member_id == member_id, p.receipt_date == day)).one()
            figures = self._cards[member_id, day] = [confirms, int(written_off)]
        return figures

    def _lock_terminals(self, keys) -> None:
        """PostgreSQL: hold each terminal's advisory lock until the transaction ends, so two confirms at one till
        (of different cards: no member lock orders them) count each other; SQLite's write lock already does.
        Taken after the member locks, in key order, by every confirm path."""
        if self.conn.dialect.name == "postgresql":
            self.conn.execute(_LOCK_TERMINALS, {"keys": sorted(f"{store}/{terminal}" for store, terminal in keys)})

    def _terminal(self, receipt: dict) -> int:
        key = (receipt["store"], receipt["terminal"])
        confirms = self._terminals.get(key)
        if confirms is None:
            self._lock_terminals([key])
            p = purchases.c
            confirms = self._terminals[key] = self.conn.execute(
                select(func.count()).where(p.store == key[0], p.terminal == key[1],
                                           p.created_at > self.now - RATE_WINDOW)).scalar_one()
        return confirms


# One transaction-scoped advisory lock per terminal, taken in key order (the order of every writer).
_LOCK_TERMINALS = text("SELECT count(pg_advisory_xact_lock(hashtextextended(k, 0))) "
                       "FROM (SELECT unnest(CAST(:keys AS text[])) AS k ORDER BY 1) AS ordered")


def check(conn, limits: OperationLimits, now: dt.datetime, receipt: dict, fx, ctx) -> list[dict]:
    """``Tally.check`` of one confirm alone (``ctx``: its member's context, or None)."""
    return Tally(conn, limits, now).check(receipt, fx, ctx.card if ctx is not None else None)


def record(conn, rows: list[dict], purchase_id: int | None = None) -> None:
    """Write the soft breaches ``Tally.check`` found (of the purchase ``purchase_id``, when the rows lack it)."""
    if rows:
        conn.execute(insert(limit_breaches), [{"purchase_id": purchase_id, **row} for row in rows])


def listing(conn, *, since: dt.datetime | None = None, limit: int = 100, before: int | None = None) -> list[dict]:
    """The soft breaches recorded, newest first (at most ``limit``; ``before``: older than that id)."""
    c = limit_breaches.c
    stmt = select(limit_breaches).order_by(c.id.desc()).limit(limit)
    if since is not None:
        stmt = stmt.where(c.at >= since)
    if before is not None:
        stmt = stmt.where(c.id < before)
    return [dict(r._mapping) for r in conn.execute(stmt)]
