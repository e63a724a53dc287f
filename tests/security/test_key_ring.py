"""The key ring every server process holds (``security.keys.KeyRing``): a check from memory in microseconds,
a revocation seen within a second by polling and at once through Redis, a key made after the ring was
loaded found by a refresh; and two real servers on one PostgreSQL database both refusing a revoked key
within a second."""
from __future__ import annotations

import time

import pytest

from helpers.security import expect_status
from helpers.storage import require_redis
from loyalty.server.db import Database
from loyalty.server.errors import Unauthenticated
from loyalty.server.security.keys import KeyRing, create_key, redis_announcer, revoke_key
from serverutil import fresh_postgres_database, start_server


@pytest.fixture()
def db(database_url):
    database = Database(database_url, pool_size=2)
    yield database
    database.engine.dispose()


def wait_refused(ring: KeyRing, key: str, limit: float) -> float:
    """Seconds until ``ring`` stops accepting ``key`` (fails after ``limit``)."""
    started = time.monotonic()
    while ring.verify(key) is not None:
        assert time.monotonic() - started < limit, f"still accepted after {limit}s"
        time.sleep(0.01)
    return time.monotonic() - started


def test_a_held_key_is_checked_from_memory_in_microseconds(db):
    _row, key = create_key(db, name="fast", scopes=["pos"], stores=["msk-01"])
    ring = KeyRing(db)
    try:
        principal = ring.verify(key)
        assert (principal.name, principal.kind, principal.scopes, principal.stores) == (
            "fast", "key", frozenset({"pos"}), frozenset({"msk-01"}))
        n = 20_000
        started = time.perf_counter()
        for _ in range(n):
            ring.verify(key)
        per_check = (time.perf_counter() - started) / n
        assert per_check < 50e-6, f"{per_check * 1e6:.1f} us per check"
        with pytest.raises(Unauthenticated, match="unknown API key"):
            ring.verify(key[:-2] + "zz")
    finally:
        ring.close()


def test_a_new_key_is_found_by_a_refresh_and_admin_implies_read(db):
    ring = KeyRing(db, poll_interval=60)
    try:
        _row, key = create_key(db, name="late", scopes=["admin"])
        assert ring.verify(key) is None                     # not held yet: the edge refreshes off the loop
        ring.refresh()
        assert ring.verify(key).scopes == frozenset({"admin", "read", "integration"})
    finally:
        ring.close()


def test_a_revocation_is_seen_by_another_ring_within_a_second_by_polling(db, database_url):
    row, key = create_key(db, name="poll", scopes=["pos"])
    ring = KeyRing(db)
    try:
        assert ring.verify(key) is not None
        other_process = Database(database_url, pool_size=1)
        revoke_key(other_process, row["id"])
        other_process.engine.dispose()
        wait_refused(ring, key, 1.0)
    finally:
        ring.close()


@pytest.mark.redis
def test_a_revocation_announced_on_redis_is_seen_at_once_without_polling(db):
    redis_url = require_redis()
    row, key = create_key(db, name="fanout", scopes=["pos"])
    ring = KeyRing(db, redis_url=redis_url, poll_interval=60)          # polling alone would take a minute
    try:
        time.sleep(0.3)                                               # subscribed
        assert ring.verify(key) is not None
        revoke_key(db, row["id"], announce=redis_announcer(redis_url))
        assert wait_refused(ring, key, 1.0) < 1.0
    finally:
        ring.close()


@pytest.mark.postgres
def test_two_servers_on_one_database_both_refuse_a_revoked_key_within_a_second(tmp_path):
    with fresh_postgres_database() as url:
        servers = [start_server(tmp_path, database_url=url, args=("--auth", "required")) for _ in range(2)]
        try:
            db = Database(url, pool_size=1)
            row, key = create_key(db, name="shared", scopes=["read"])
            clients = [s.client(retries=0, api_key=key) for s in servers]
            for client in clients:
                assert client.get_member({"member": {"card": "7000001"}}).card == "7000001"
            revoke_key(db, row["id"])
            db.engine.dispose()
            time.sleep(1.0)
            for client in clients:
                with expect_status("UNAUTHENTICATED", "unknown API key"):
                    client.get_member({"member": {"card": "7000001"}})
                client.close()
        finally:
            for server in servers:
                server.stop()


def test_a_key_made_just_after_a_poll_is_found_on_its_first_use(db):
    ring = KeyRing(db, poll_interval=0.001)                 # refreshing all the time, as under load
    try:
        for i in range(20):
            _row, key = create_key(db, name=f"fresh-{i}", scopes=["pos"])
            if ring.verify(key) is None:
                ring.refresh_for_miss()
            assert ring.verify(key).name == f"fresh-{i}"
    finally:
        ring.close()


@pytest.mark.parametrize("fields, field", [
    ({"name": "till\nforged"}, "name"),
    ({"name": "till\x01"}, "name"),
    ({"name": "not a subject", "kind": "certificate", "scopes": ["pos"]}, "name"),
    ({"name": "CN=till\x00", "kind": "certificate", "scopes": ["pos"]}, "name"),
    ({"name": "till", "scopes": ["pos"], "stores": [f"s{i}" for i in range(1001)]}, "store"),
    ({"name": "till", "scopes": ["pos"], "stores": ["msk\n01"]}, "store"),
])
def test_a_bad_key_field_is_refused_naming_it_and_makes_no_key(db, fields, field):
    from loyalty.server.errors import InvalidArgument
    from loyalty.server.security.keys import list_keys
    with pytest.raises(InvalidArgument) as err:
        create_key(db, **{"scopes": ["read"], **fields})
    assert err.value.path == field
    assert list_keys(db, include_revoked=True) == []


def test_a_key_rotates_once_within_sane_grace_and_ids_are_checked(db):
    from loyalty.server.errors import InvalidArgument
    from loyalty.server.security.keys import list_keys, rotate_key
    made, _ = create_key(db, name="till-rot", scopes=["pos"], stores=["msk-01"])
    for grace in (float("nan"), float("inf"), 1e300, -1.0):
        with pytest.raises(InvalidArgument) as err:
            rotate_key(db, made["id"], grace_s=grace)
        assert err.value.path == "grace"
    successor, _ = rotate_key(db, made["id"], grace_s=0)
    with pytest.raises(InvalidArgument) as err:               # its grace is over: still not a second successor
        rotate_key(db, made["id"], grace_s=1e6)
    assert err.value.path == "id" and successor["id"] in err.value.message
    assert [k["id"] for k in list_keys(db)] == [made["id"], successor["id"]]
    for bad in ("", "x" * 65):
        for change in (rotate_key, revoke_key):
            with pytest.raises(InvalidArgument) as err:
                change(db, bad)
            assert err.value.path == "id"
