"""API keys and registered client certificates: how they are made, stored, rotated, revoked, and checked.

A key looks like ``lk_<id>_<secret>``: ``id`` (16 hex digits) finds its row, ``secret`` is 32 random bytes
(``secrets.token_urlsafe``). Only ``sha256(secret)`` is stored. A plain SHA-256 is enough because the secret
has 256 bits of entropy: nobody can guess it, so nothing is gained from a slow password hash (bcrypt, scrypt)
or a server-side pepper (a keyed hash), both of which would also have to be computed on every cache miss
and the pepper kept secret besides. The secret is shown once, by ``create`` / ``rotate``, and never logged.

A terminal with a client certificate (mutual TLS) is registered the same way without a secret
(``kind='certificate'``, ``name`` = the certificate's subject, e.g. ``CN=till-7,O=Shop``): the row gives its
scopes and stores, and revoking it shuts the certificate out as fast as a key, whatever the CA says.

Checking (:class:`KeyRing`, one per server process): every unrevoked row is held in memory, so a first check
is a dict lookup, one SHA-256 of 43 bytes and ``hmac.compare_digest``, and later ones of the same key one dict
lookup (until the keys change), microseconds, no storage. The ring learns of
changes by the revision in ``api_key_state``: a daemon thread reads that one row every ``POLL_INTERVAL`` (0.5 s)
and reloads the rows changed since, so a revocation reaches every process within a second; with Redis a change
is also announced on ``loyalty:keys`` and picked up at once (the poll goes on: a change made on the database
without Redis, ``loyalty keys revoke --database-url``, is still seen within a second).
A key not in memory (created a moment ago, or made up) makes the caller refresh the ring once, off the event
loop, then it is known or refused.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import logging
import math
import secrets
import threading
import time
import typing

from sqlalchemy import select, update

from loyalty.server.errors import InvalidArgument, NotFound, Unauthenticated
from loyalty.server.logs import CONTROL_CHARACTERS as _CONTROL
from loyalty.server.security import SCOPES, Principal

from . import audit
from .models import api_key_state, api_keys

__all__ = ["PREFIX", "KeyRing", "create_key", "list_keys", "revoke_key", "rotate_key", "split_key",
           "principal_scopes", "redis_announcer", "CHANNEL", "ROTATION_GRACE_S"]

log = logging.getLogger("loyalty.server.security.keys")

PREFIX = "lk_"
CHANNEL = "loyalty:keys"
POLL_INTERVAL = 0.5
VERIFIED_LIMIT = 100_000
ROTATION_GRACE_S = 86_400.0      # a day: long enough for a fleet of terminals to take the new key
ID_LENGTH = 16
NAME_LIMIT = 200
MAX_STORES = 1000                # stores one pos key may serve
MAX_GRACE_S = 30 * 86_400.0      # the longest a rotated key stays valid

# A scope includes others: an administrator may also read and do what an integration does (it could make
# itself such a key anyway). ``pos`` stays apart: it is the only scope bound to stores.
IMPLIED = {"admin": frozenset({"read", "integration"})}


def principal_scopes(scopes) -> frozenset[str]:
    """The scopes a credential holding ``scopes`` acts with (``IMPLIED`` added)."""
    out = set(scopes)
    for scope in scopes:
        out |= IMPLIED.get(scope, frozenset())
    return frozenset(out)


def split_key(value: str) -> tuple[str, str] | None:
    """``(id, secret)`` of a well-formed key, else None."""
    if not value.startswith(PREFIX) or len(value) < len(PREFIX) + ID_LENGTH + 2:
        return None
    key_id, sep, secret = value[len(PREFIX):].partition("_")
    if not sep or len(key_id) != ID_LENGTH or not secret:
        return None
    return key_id, secret


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# ---- managing keys (the CLI on the database, or an admin's process) -------------------------------------------

def _validate(name: str, scopes, stores, kind: str) -> tuple[list[str], list[str]]:
    if not name or not name.strip():
        raise InvalidArgument("name", "required")
    if len(name) > NAME_LIMIT:
        raise InvalidArgument("name", f"at most {NAME_LIMIT} characters")
    if _CONTROL.search(name):
        raise InvalidArgument("name", "must not contain control characters (it names the actor in the audit log)")
    if kind == "certificate":
        from cryptography import x509
        try:
            x509.Name.from_rfc4514_string(name)
        except ValueError:
            raise InvalidArgument("name", f"not a certificate subject (RFC 4514, e.g. CN=till-7,O=Shop): "
                                          f"{name[:64]!r}") from None
    scopes = sorted(set(scopes))
    if not scopes:
        raise InvalidArgument("scope", f"at least one of {', '.join(SCOPES)}")
    for scope in scopes:
        if scope not in SCOPES:
            raise InvalidArgument("scope", f"unknown scope {scope!r} (expected one of {', '.join(SCOPES)})")
    stores = sorted(set(stores))
    if len(stores) > MAX_STORES:
        raise InvalidArgument("store", f"at most {MAX_STORES} stores a key, got {len(stores)}")
    if stores and "pos" not in scopes:
        raise InvalidArgument("store", "only a pos credential is bound to stores")
    if any(not s or len(s) > 64 or _CONTROL.search(s) for s in stores):
        raise InvalidArgument("store", "a store id is 1 to 64 characters, none a control character")
    if kind not in ("key", "certificate"):
        raise InvalidArgument("kind", "expected key or certificate")
    return scopes, stores


def _next_revision(conn) -> int:
    """Bump ``api_key_state.revision`` (the row lock orders concurrent changes) and return it."""
    conn.execute(update(api_key_state).where(api_key_state.c.id == 1)
                 .values(revision=api_key_state.c.revision + 1))
    return conn.execute(select(api_key_state.c.revision).where(api_key_state.c.id == 1)).scalar_one()


def _public(row) -> dict:
    """What ``keys list`` shows of a row: never the hash."""
    def iso(t):
        return t.isoformat() if t is not None else None
    return {"id": row.id, "kind": row.kind, "name": row.name, "scopes": list(row.scopes),
            "stores": list(row.stores), "created_at": iso(row.created_at), "expires_at": iso(row.expires_at),
            "revoked_at": iso(row.revoked_at), "replaced_by": row.replaced_by}


def _insert(conn, *, name, scopes, stores, kind, revision) -> tuple[dict, str | None]:
    key_id = secrets.token_hex(ID_LENGTH // 2)
    secret = secrets.token_urlsafe(32) if kind == "key" else None
    conn.execute(api_keys.insert().values(
        id=key_id, kind=kind, name=name, scopes=scopes, stores=stores,
        secret_hash=_hash(secret) if secret else None, created_at=_now(), revision=revision))
    row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).one()
    return _public(row), (f"{PREFIX}{key_id}_{secret}" if secret else None)


def create_key(db, *, name: str, scopes, stores=(), kind: str = "key", announce=None) -> tuple[dict, str | None]:
    """A new key (or certificate registration): its row as ``keys list`` shows it, and the key itself (None
    for a certificate), which is shown to the caller once and kept nowhere."""
    scopes, stores = _validate(name, scopes, stores, kind)
    with db.write() as conn:
        if kind == "certificate" and conn.execute(
                select(api_keys.c.id).where(api_keys.c.kind == "certificate", api_keys.c.name == name,
                                            api_keys.c.revoked_at.is_(None))).first():
            raise InvalidArgument("name", f"the certificate subject {name!r} is already registered")
        result = _insert(conn, name=name, scopes=scopes, stores=stores, kind=kind, revision=_next_revision(conn))
        audit.record(conn, "CreateKey", f"key:{result[0]['id']}")
    _announce(announce)
    return result


def list_keys(db, *, include_revoked: bool = False) -> list[dict]:
    with db.read() as conn:
        query = select(api_keys).order_by(api_keys.c.created_at, api_keys.c.id)
        if not include_revoked:
            query = query.where(api_keys.c.revoked_at.is_(None))
        return [_public(row) for row in conn.execute(query)]


def check_key_id(key_id: str) -> str:
    """A key id a request names: required, and no longer than an id can be."""
    if not key_id:
        raise InvalidArgument("id", "required: the key's id, as `keys list` shows it")
    if len(key_id) > 64:
        raise InvalidArgument("id", f"at most 64 characters, got {len(key_id)}")
    return key_id


def _live_row(conn, key_id: str):
    row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).first()
    if row is None:
        raise NotFound(f"id: no key {key_id!r}")
    if row.revoked_at is not None:
        raise InvalidArgument("id", f"key {key_id} is already revoked")
    return row


def revoke_key(db, key_id: str, *, announce=None) -> dict:
    """Revoke at once (every process refuses it within a second)."""
    check_key_id(key_id)
    with db.write() as conn:
        revision = _next_revision(conn)         # first: its row lock orders changes of keys, so this sees theirs
        _live_row(conn, key_id)
        conn.execute(update(api_keys).where(api_keys.c.id == key_id)
                     .values(revoked_at=_now(), revision=revision))
        row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).one()
        audit.record(conn, "RevokeKey", f"key:{key_id}")
    _announce(announce)
    return _public(row)


def rotate_key(db, key_id: str, *, grace_s: float = ROTATION_GRACE_S, announce=None) -> tuple[dict, str]:
    """A new key with the same name, scopes and stores; the old one stays valid ``grace_s`` seconds more (or
    less, if it already expires sooner), so terminals can switch without an outage."""
    check_key_id(key_id)
    if not (isinstance(grace_s, (int, float)) and math.isfinite(grace_s) and 0 <= grace_s <= MAX_GRACE_S):
        raise InvalidArgument("grace", f"seconds from 0 to {MAX_GRACE_S:.0f} (30 days), got {grace_s!r}")
    with db.write() as conn:
        revision = _next_revision(conn)         # first: a concurrent rotation of this key commits before we read
        old = _live_row(conn, key_id)
        if old.kind != "key":
            raise InvalidArgument("id", "a certificate registration has no secret to rotate")
        if old.replaced_by is not None:
            raise InvalidArgument("id", f"key {key_id} was already rotated (to {old.replaced_by}): rotate that one")
        new, secret = _insert(conn, name=old.name, scopes=list(old.scopes), stores=list(old.stores), kind="key",
                              revision=revision)
        ends = _now() + dt.timedelta(seconds=grace_s)
        if old.expires_at is not None:
            ends = min(ends, old.expires_at)
        conn.execute(update(api_keys).where(api_keys.c.id == key_id)
                     .values(expires_at=ends, replaced_by=new["id"], revision=revision))
        audit.record(conn, "RotateKey", f"key:{key_id}")
    _announce(announce)
    return new, secret


def _announce(announce) -> None:
    if announce is not None:
        announce()


# ---- checking keys (every server process) ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class _Entry:
    secret_hash: str | None
    principal: Principal
    expires_at: float | None       # epoch seconds (end of a rotation's grace), None: no end


class _Held(typing.NamedTuple):
    keys: dict          # key id -> _Entry
    certificates: dict  # certificate subject -> _Entry
    verified: dict      # whole key -> _Entry, checked against ``keys``


class KeyRing:
    """Every unrevoked key and certificate registration of the database, in memory, kept current by polling
    the revision (and Redis, when given)."""

    def __init__(self, db, *, redis_url: str | None = None, poll_interval: float = POLL_INTERVAL):
        self.db = db
        self._held = _Held({}, {}, {})
        self._revision = -1
        self._lock = threading.Lock()
        self._interval = poll_interval
        self._stop = threading.Event()
        self._listener = None
        self._refresh_started = float("-inf")
        self._miss_lock = threading.Lock()
        try:
            self.refresh()
        except Exception as exc:  # noqa: BLE001 - storage away at start: the poller loads the keys when it is back
            log.warning("keys not loaded yet: %s", getattr(exc, "message", exc))
        if redis_url:
            from loyalty.server.fanout import RedisListener
            self._listener = RedisListener(redis_url, CHANNEL, name="key-listener",
                                           on_message=lambda _text: self.refresh(), on_connect=self.refresh)
        self._thread = threading.Thread(target=self._poll, name="key-poller", daemon=True)
        self._thread.start()

    # -- the check (on the event loop: memory only)

    def verify(self, value: str) -> Principal | None:
        """The principal of API key ``value``; None when its id is not held (refresh, then ask again);
        ``Unauthenticated`` when it is malformed, wrong, or past its grace period."""
        held = self._held          # read once: keys and verified keys of the same moment
        entry = held.verified.get(value)
        if entry is None:
            entry = self._check(held, value)
            if entry is None:
                return None
        if entry.expires_at is not None and time.time() >= entry.expires_at:
            raise Unauthenticated("authorization: the API key was rotated and its grace period is over")
        return entry.principal

    @staticmethod
    def _check(held: _Held, value: str) -> _Entry | None:
        """The entry of a key not checked before (its hash compared in constant time), remembered."""
        parts = split_key(value)
        if parts is None:
            raise Unauthenticated("authorization: not a well-formed API key")
        entry = held.keys.get(parts[0])
        if entry is None:
            return None
        if not hmac.compare_digest(entry.secret_hash, _hash(parts[1])):
            raise Unauthenticated("authorization: unknown API key")
        verified = held.verified
        if len(verified) >= VERIFIED_LIMIT:
            verified.clear()
        verified[value] = entry
        return entry

    def certificate(self, subject: str) -> Principal | None:
        """The principal of a registered client certificate subject (None: not registered)."""
        entry = self._held.certificates.get(subject)
        return None if entry is None else entry.principal

    # -- keeping current

    def refresh_for_miss(self) -> None:
        """A key id not held: make sure a refresh that started after now has run. Misses arriving together
        share one (a flood of made-up ids costs one small read at a time, not one each)."""
        asked = time.monotonic()
        with self._miss_lock:
            if self._refresh_started <= asked:
                self.refresh()
                return
        with self._lock:        # one started after we asked (the poller's, another miss's): wait till it is done
            pass

    def refresh(self) -> None:
        """Load the rows changed since the revision held (one small read when nothing changed)."""
        with self._lock:
            self._refresh_started = time.monotonic()
            with self.db.read() as conn:
                revision = conn.execute(select(api_key_state.c.revision)
                                        .where(api_key_state.c.id == 1)).scalar_one()
                if revision == self._revision:
                    return
                rows = conn.execute(select(api_keys).where(api_keys.c.revision > self._revision)
                                    .order_by(api_keys.c.revision)).all()
            keys, certificates = dict(self._held.keys), dict(self._held.certificates)
            for row in rows:
                self._apply(row, keys, certificates)
            # swapped whole: a reader on the loop sees the old or the new keys, never half-changed ones; the
            # keys verified so far are checked again against the new ones (a revoked one is then unknown)
            self._held, self._revision = _Held(keys, certificates, {}), revision

    @staticmethod
    def _apply(row, keys: dict, certificates: dict) -> None:
        target, key = (keys, row.id) if row.kind == "key" else (certificates, row.name)
        if row.revoked_at is not None:
            target.pop(key, None)
            return
        principal = Principal(row.name, row.kind, principal_scopes(row.scopes), frozenset(row.stores))
        expires = row.expires_at.timestamp() if row.expires_at is not None else None
        target[key] = _Entry(row.secret_hash, principal, expires)

    def _poll(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.refresh()
            except Exception as exc:  # noqa: BLE001 - storage away: keep the keys held, try again
                log.warning("key refresh failed: %s", getattr(exc, "message", exc))

    def close(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.close()
        self._thread.join(timeout=2)


def redis_announcer(redis_url: str | None):
    """A callable that tells every server process through Redis that keys changed (None without Redis)."""
    if not redis_url:
        return None

    def announce() -> None:
        import redis
        try:
            client = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=2)
            try:
                client.publish(CHANNEL, "changed")
            finally:
                client.close()
        except Exception as exc:  # noqa: BLE001 - the pollers still find the change within a second
            log.warning("could not announce the key change on Redis: %s", exc)
    return announce
