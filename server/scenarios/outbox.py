"""Delivering the outbox: messages (email, SMS, push) and webhook calls written by run steps.

A row is written once (its unique ``key`` is the run, step and visit) in the transaction of the step that
wants it. Delivery happens outside any transaction, so it is claimed with a lease (``next_attempt_at`` of a
row in flight is the end of its lease): the worker sends, then marks the row ``sent`` (and records ``sent``
in ``message_events``, which segment and scenario conditions read).

A live worker never loses a claim. It claims ONE due row at a time (``FOR UPDATE SKIP LOCKED`` on
PostgreSQL), in the same short transaction that records the outcome of its previous send, so it never holds
rows it is not sending yet; and while a send runs, a keeper thread pushes that row's lease a full lease ahead
every third of the lease, so a receiver slower than the lease is still called once. (Claiming a batch at
once under one lease let the end of the batch expire behind a slow webhook, and another worker sent it
again.) The lease only says how soon a KILLED worker's row is taken over: the keeper dies with its process.
Delivery to the outside world is therefore at least once (a crash between sending and recording repeats a
send), and every adapter passes the row's key along (``Idempotency-Key`` header, SMTP ``Message-ID``) for
the receiver to drop a repeat.

Failures are retried with exponential backoff; a permanent failure (HTTP 4xx other than 408 / 429, an SMTP
address refusal) or ``MAX_ATTEMPTS`` failures make the row ``dead``: the dead-letter list.

Channel adapters: ``log`` (default; logs, and appends JSON lines to a file with ``log:/path``), an HTTP
gateway (``http://...`` / ``https://...``: POST of a JSON document) and SMTP
(``smtp://host:port?from=addr&starttls=1&user=u&password=p``). Webhook rows go to their own URL.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import smtplib
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from email.message import EmailMessage

from sqlalchemy import insert, select, update

from loyalty.server.errors import ServiceError
from loyalty.server.segments.models import message_events

from .common import backoff, claim
from .models import scenario_outbox

__all__ = ["Channels", "DeliveryError", "deliver_due", "MAX_ATTEMPTS", "LEASE_S"]

log = logging.getLogger(__name__)
message_log = logging.getLogger("loyalty.messages")

MAX_ATTEMPTS = 6
BACKOFF_S = 10.0
BACKOFF_CAP_S = 3600.0
LEASE_S = 60.0
SEND_TIMEOUT_S = 10.0


class DeliveryError(Exception):
    def __init__(self, message: str, *, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


class LogChannel:
    def __init__(self, path: str | None = None):
        self.path = path
        self._lock = threading.Lock()

    def send(self, row) -> None:
        doc = {"key": row.key, "channel": row.channel, "to": row.recipient, "subject": row.subject, "body": row.body,
               "member_id": row.member_id, "payload": row.payload}
        message_log.info("%s to %s: %s", row.channel, row.recipient, row.subject or row.body[:80])
        if self.path:
            with self._lock, open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")


def _http(url: str, method: str, body: dict | None, headers: dict, timeout: float) -> None:
    data = None if body is None or method == "GET" else json.dumps(body, ensure_ascii=False).encode("utf-8")
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read()
    except urllib.error.HTTPError as exc:
        permanent = 400 <= exc.code < 500 and exc.code not in (408, 429)
        raise DeliveryError(f"HTTP {exc.code} from {url}", permanent=permanent) from None
    except (urllib.error.URLError, OSError) as exc:
        raise DeliveryError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from None


class HttpChannel:
    """An HTTP gateway (SMS / push providers, or a message bus bridge): one JSON POST per message."""

    def __init__(self, url: str, timeout: float = SEND_TIMEOUT_S):
        self.url = url
        self.timeout = timeout

    def send(self, row) -> None:
        _http(self.url, "POST", {"key": row.key, "channel": row.channel, "to": row.recipient, "subject": row.subject,
                                 "body": row.body, "member_id": row.member_id,
                                 "transactional": row.transactional},
              {"Idempotency-Key": row.key}, self.timeout)


class SmtpChannel:
    def __init__(self, url: str, timeout: float = SEND_TIMEOUT_S):
        u = urllib.parse.urlsplit(url)
        q = dict(urllib.parse.parse_qsl(u.query))
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 25
        self.sender = q.get("from", "loyalty@localhost")
        self.starttls = q.get("starttls") in ("1", "true", "yes")
        self.user, self.password = q.get("user"), q.get("password")
        self.timeout = timeout

    def send(self, row) -> None:
        msg = EmailMessage()
        msg["From"] = self.sender
        msg["To"] = row.recipient
        msg["Subject"] = row.subject
        msg["Message-ID"] = f"<{row.key.replace(':', '.')}@loyalty>"
        msg.set_content(row.body)
        try:
            with smtplib.SMTP(self.host, self.port, timeout=self.timeout) as smtp:
                if self.starttls:
                    smtp.starttls()
                if self.user:
                    smtp.login(self.user, self.password or "")
                smtp.send_message(msg)
        except smtplib.SMTPRecipientsRefused as exc:
            raise DeliveryError(f"SMTP refused {row.recipient}: {exc.recipients}", permanent=True) from None
        except (smtplib.SMTPException, OSError) as exc:
            raise DeliveryError(f"SMTP {self.host}:{self.port}: {exc}") from None


class WebhookChannel:
    def __init__(self, timeout: float = SEND_TIMEOUT_S):
        self.timeout = timeout

    def send(self, row) -> None:
        p = row.payload or {}
        _http(row.recipient, p.get("method", "POST"), p.get("json"),
              {**(p.get("headers") or {}), "Idempotency-Key": row.key}, self.timeout)


def _adapter(spec: str):
    if spec == "log":
        return LogChannel()
    if spec.startswith("log:"):
        return LogChannel(spec[4:])
    if spec.startswith(("http://", "https://")):
        return HttpChannel(spec)
    if spec.startswith("smtp://"):
        return SmtpChannel(spec)
    raise ValueError(f"unknown channel adapter {spec!r}: expected log, log:/path, http(s)://..., smtp://...")


class Channels:
    """Which adapter delivers each channel: ``Channels(email="smtp://127.0.0.1:2525", sms="log")``; any
    channel not named uses ``log``. Webhook rows always go to their own URL."""

    def __init__(self, **specs: str):
        self.specs = {"email": "log", "sms": "log", "push": "log", **{k: v for k, v in specs.items() if v}}
        self.adapters = {name: _adapter(spec) for name, spec in self.specs.items()}
        self.adapters["webhook"] = WebhookChannel()

    def send(self, row) -> None:
        adapter = self.adapters.get(row.channel)
        if adapter is None:
            raise DeliveryError(f"no adapter for channel {row.channel!r}", permanent=True)
        adapter.send(row)


def deliver_due(database, channels: Channels, now: dt.datetime, *, limit: int = 20, lease_s: float = LEASE_S,
                clock=None) -> int:
    """Deliver up to ``limit`` due rows, one at a time (see the module docstring); returns rows handled.
    ``now`` is the time of the first claim; later claims and the outcomes take ``clock()`` when given."""
    if lease_s <= 0:
        raise ValueError(f"lease_s must be positive, got {lease_s}")
    clock = clock or (lambda: now)
    lease = dt.timedelta(seconds=lease_s)
    keeper = _LeaseKeeper(database, lease, clock)
    handled, outcome = 0, None
    try:
        while True:
            at = (now if handled == 0 else clock()) if handled < limit else None
            row, until = _record_then_claim(database, outcome, at, lease, lease_s)
            keeper.release()            # the previous send's outcome is recorded: its lease is no longer needed
            if row is None:
                return handled
            keeper.hold(row.id, until)
            error = _send(channels, row)
            outcome = (row, error, clock())
            handled += 1
    finally:
        keeper.close()


def _record_then_claim(database, outcome, at, lease: dt.timedelta, lease_s: float):
    """``_record_and_claim`` in a transaction; when storage fails after a send, the outcome is kept and recorded
    again (the keeper still renews the row's lease meanwhile) for up to half a lease: a delivery is repeated only
    when its worker dies, or storage stays away longer than that, between sending and recording."""
    give_up = time.monotonic() + lease_s / 2
    while True:
        try:
            return database.run_write(_record_and_claim, outcome, at, lease)
        except ServiceError as exc:
            if outcome is None or exc.code != "UNAVAILABLE" or time.monotonic() >= give_up:
                raise
            log.warning("recording delivery %s failed (%s); trying again", outcome[0].id, exc.message)
            time.sleep(min(0.5, max(0.0, give_up - time.monotonic())))


def _send(channels: Channels, row) -> DeliveryError | None:
    try:
        channels.send(row)
    except DeliveryError as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - an adapter bug must not stop the worker
        return DeliveryError(f"{type(exc).__name__}: {exc}")
    return None


def _record_and_claim(conn, outcome, at: dt.datetime | None, lease: dt.timedelta):
    """Record the previous send's outcome (if any) and claim the next due row (unless ``at`` is None), in one
    transaction; returns ``(row, end of its lease)`` or ``(None, None)``."""
    if outcome is not None:
        _record(conn, *outcome)
    if at is None:
        return None, None
    ob = scenario_outbox.c
    row = conn.execute(claim(conn, select(scenario_outbox).where(ob.state == "pending", ob.next_attempt_at <= at)
                             .order_by(ob.next_attempt_at, ob.id).limit(1))).first()
    if row is None:
        return None, None
    until = at + lease
    conn.execute(update(scenario_outbox).where(ob.id == row.id).values(next_attempt_at=until))
    return row, until


def _renew(conn, row_id: int, until: dt.datetime, new_until: dt.datetime) -> int:
    """Push the lease of a row still pending and still ours (its lease is the one we set) to ``new_until``."""
    ob = scenario_outbox.c
    return conn.execute(update(scenario_outbox).where(ob.id == row_id, ob.state == "pending",
                                                      ob.next_attempt_at == until)
                        .values(next_attempt_at=new_until)).rowcount


class _LeaseKeeper:
    """The heartbeat of the row in flight: a thread (started at the first ``hold``) that every third of the
    lease renews the held row's lease to a full lease from now. It dies with its process, so only a dead
    worker's rows are ever taken over. A renewal that fails (database unreachable) is logged and tried again
    at the next beat; one that finds the row no longer ours (the lease ran out while the database was out of
    reach, and another worker took it) is logged as a lost lease."""

    def __init__(self, database, lease: dt.timedelta, clock):
        self.database = database
        self.lease = lease
        self.clock = clock
        self._cond = threading.Condition()
        self._held: list | None = None          # [row id, end of its lease]
        self._closed = False
        self._thread: threading.Thread | None = None

    def hold(self, row_id: int, until: dt.datetime) -> None:
        with self._cond:
            self._held = [row_id, until]
            if self._thread is None:
                self._thread = threading.Thread(target=self._beat, name="outbox-lease", daemon=True)
                self._thread.start()

    def release(self) -> None:
        with self._cond:
            self._held = None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    def _beat(self) -> None:
        interval = self.lease.total_seconds() / 3
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed, timeout=interval)
                if self._closed:
                    return
                if self._held is None:
                    continue
                row_id, until = self._held
            new_until = self.clock() + self.lease
            try:
                renewed = self.database.run_write(_renew, row_id, until, new_until)
            except Exception as exc:  # noqa: BLE001 - keep beating: the database may come back within the lease
                log.warning("outbox row %s: lease not renewed: %s: %s", row_id, type(exc).__name__,
                            getattr(exc, "message", exc))
                continue
            with self._cond:
                if self._held is None or self._held[0] != row_id:
                    continue                    # sent meanwhile: its outcome decides, not the lease
                if renewed:
                    self._held[1] = new_until
                else:
                    log.warning("outbox row %s: its lease ran out and another worker took it over", row_id)
                    self._held = None


def _record(conn, row, error: DeliveryError | None, now: dt.datetime) -> None:
    ob = scenario_outbox.c
    attempts = row.attempts + 1
    if error is None:
        done = conn.execute(update(scenario_outbox).where(ob.id == row.id, ob.state == "pending").values(
            state="sent", attempts=attempts, sent_at=now, last_error="")).rowcount
        if done and row.channel in ("email", "sms", "push") and row.member_id is not None:
            conn.execute(insert(message_events).values(member_id=row.member_id, channel=row.channel, kind="sent",
                                                       at=now))
        return
    dead = error.permanent or attempts >= MAX_ATTEMPTS
    log.warning("outbox %s (%s) attempt %s failed%s: %s", row.key, row.channel, attempts,
                " for good" if dead else "", error)
    conn.execute(update(scenario_outbox).where(ob.id == row.id, ob.state == "pending").values(
        state="dead" if dead else "pending", attempts=attempts, last_error=str(error)[:2000],
        next_attempt_at=now + backoff(attempts, BACKOFF_S, BACKOFF_CAP_S)))
