"""Segment benchmark: seed a population with ``loyalty demo seed``'s generator, recalculate an updatable
segment with a purchase-aggregate condition, and time ``AudienceIndex.audiences_of`` at 1k and at the full
member count (it must not grow with the population: a bitmap lookup per audience).

    python benchmarks/segments.py --json                         # 1,000,000 members, 10,000,000 purchases
    python benchmarks/segments.py --members 100000 --purchases 1000000

Runs on a fresh PostgreSQL database (``--pg-url`` server, default the test server) that it drops at the end
(``--keep`` keeps it); the 1k population is seeded into the same kind of database. Prints one JSON line with
``--json``. Target: the recalculation in at most 30 s at full size on local PostgreSQL.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import random
import time
import uuid

from loyalty.server import db
from loyalty.server.segments.demo_seed import seed_population
from loyalty.server.segments.membership import AudienceIndex
from loyalty.server.segments.service import SegmentService

NOW = dt.datetime(2026, 3, 2, 12, 0, tzinfo=dt.timezone.utc)
SEGMENT = {"id": "frequent-big-checks", "type": "updatable", "schedule": "0 3 * * *", "conditions": {"all": [
    {"purchases": {"window_days": 90, "count": {"gte": 3}, "average": {"gte": 100000}}},
    {"not": {"card_status": "blocked"}}]}}
OTHERS = [
    {"id": "women-q1", "type": "updatable", "conditions": {"all": [
        {"gender": "female"}, {"purchases": {"last_date": {"between": ["2026-01-01", "2026-04-01"]}}},
        {"subscribed": "email"}, {"points": {"accrued_total": {"gt": 1000}}}]}},
    {"id": "moscow", "type": "updatable", "conditions": {"city": "Moscow"}},
]


def _create_db(pg_url: str) -> tuple[str, object]:
    import psycopg
    admin = psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)
    name = f"loyalty_bench_{uuid.uuid4().hex[:8]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    return f"{pg_url.rsplit('/', 1)[0]}/{name}", (admin, name)


def _drop_db(handle) -> None:
    admin, name = handle
    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


def _check_timing(url: str, n_members: int, calls: int = 200_000) -> dict:
    index = AudienceIndex(url, poll_interval=3600)
    index.refresh()
    rng = random.Random(7)
    ids = [rng.randint(1, n_members) for _ in range(calls)]
    t0 = time.perf_counter()
    hits = 0
    for mid in ids:
        hits += len(index.audiences_of(mid))
    elapsed = time.perf_counter() - t0
    return {"members": n_members, "audiences": len(index._state.bitmaps) + len(index._state.audiences),
            "ns_per_call": round(elapsed / calls * 1e9), "mean_audiences_per_member": round(hits / calls, 3)}


def _population(url: str, members: int, purchases: int) -> dict:
    db.upgrade(url)
    seeded = seed_population(url, members_n=members, purchases_n=purchases, seed=1, now=NOW)
    svc = SegmentService.open(url, clock=lambda: NOW)
    runs = []
    for spec in [SEGMENT] + OTHERS:
        svc.define_segment(spec)
    for _ in range(2):      # first run: everybody is added; second: nothing changes
        runs.append(svc.recalculate(SEGMENT["id"], source="cli"))
    for spec in OTHERS:
        svc.recalculate(spec["id"], source="cli")
    svc.define_audience({"id": "campaign", "include": ["moscow"], "exclude": [SEGMENT["id"]]})
    svc.close()
    return {"seed": seeded, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=1_000_000)
    ap.add_argument("--purchases", type=int, default=10_000_000)
    ap.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    out = {"machine": f"{platform.machine()} {platform.python_version()}", "members": args.members,
           "purchases": args.purchases}
    url, handle = _create_db(args.pg_url)
    small_url, small_handle = _create_db(args.pg_url)
    try:
        big = _population(url, args.members, args.purchases)
        out["seed_seconds"] = big["seed"]["total_seconds"]
        out["seed_detail"] = big["seed"]["seconds"]
        first, second = big["runs"]
        out["recalc_first"] = {k: first[k] for k in ("duration_ms", "member_count", "added", "removed")}
        out["recalc_again"] = {k: second[k] for k in ("duration_ms", "member_count", "added", "removed")}
        out["recalc_within_30s"] = max(first["duration_ms"], second["duration_ms"]) <= 30_000
        _population(small_url, 1000, 10_000)
        small = _check_timing(small_url, 1000)
        large = _check_timing(url, args.members)
        out["check_1k"] = small
        out["check_full"] = large
        out["check_ratio_full_vs_1k"] = round(large["ns_per_call"] / small["ns_per_call"], 2)
    finally:
        if not args.keep:
            _drop_db(handle)
        _drop_db(small_handle)
    if args.json:
        print(json.dumps(out))
    else:
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
