"""Scenario module benchmark on local PostgreSQL, in a fresh database that is dropped afterwards.

1. ``batch``: a batch award to every member (``--members``, default 1,000,000, seeded with the segment
   module's ``seed_population``, no purchases): freezing the audience plus every chunk (one set-based
   transaction of ``--chunk`` members each). Budget: 60 s for a million.
2. ``scenario``: steps per second with 2 ``loyalty worker`` processes on one queue: ``--runs`` events
   (``purchase_confirmed``) enter a 4-step scenario (condition, award points, email through the outbox,
   tag); the clock runs from the workers' start until every run is done and every message delivered.

    python benchmarks/scenarios.py --json                 # full size
    python benchmarks/scenarios.py --members 20000 --runs 1000
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
import uuid

PG = os.environ.get("LOYALTY_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _admin():
    import psycopg
    return psycopg.connect(PG.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)


def bench_batch(url: str, members: int, chunk: int, say) -> dict:
    from loyalty.server.scenarios import ScenarioService
    from loyalty.server.segments.demo_seed import seed_population
    t0 = time.perf_counter()
    seed_population(url, members_n=members, purchases_n=0)
    seeded = time.perf_counter() - t0
    say(f"seeded {members} members in {seeded:.1f} s")
    sc = ScenarioService.open(url)
    t0 = time.perf_counter()
    created = sc.start_batch("bench", "award", 10, reason="benchmark", expiry_days=90, all_members=True)
    frozen = time.perf_counter() - t0
    done = sc.run_batch("bench", chunk=chunk)
    total = time.perf_counter() - t0
    sc.close()
    assert done["written"] == members == created["total"], done
    say(f"batch award to {members} members in {total:.1f} s (audience frozen in {frozen:.1f} s)")
    return {"members": members, "chunk": chunk, "seed_seconds": round(seeded, 2), "freeze_seconds": round(frozen, 2),
            "seconds": round(total, 2), "members_per_second": round(members / total),
            "within_60s_per_million": total * 1_000_000 / members <= 60}


def bench_scenario(url: str, runs: int, say) -> dict:
    from sqlalchemy import func, select, text

    from loyalty.server.scenarios import ScenarioService
    from loyalty.server.scenarios.models import scenario_outbox, scenario_runs, scenario_step_log
    sc = ScenarioService.open(url)
    sc.define({"id": "bench", "reentry": "always", "triggers": ["purchase_confirmed"], "steps": [
        {"id": "check", "condition": {"member": {"field": "active_points", "gte": 0}}, "yes": "award", "no": "end"},
        {"id": "award", "award_points": {"points": 10, "expiry_days": 30}},
        {"id": "mail", "send_email": {"subject": "Thanks", "body": "{first_name}, 10 points", "transactional": True}},
        {"id": "tag", "add_tag": "bench"}]})
    now = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=1)
    with sc.db.write() as conn:
        conn.execute(text("""INSERT INTO events (kind, key, member_id, payload, created_at)
            SELECT 'purchase_confirmed', 'bench:' || id, id, '{"payable": 1000}', :now
            FROM members ORDER BY id LIMIT :n"""), {"now": now, "n": runs})
    time.sleep(1.0)
    env = {**os.environ}
    cmd = [sys.executable, "-c", "from loyalty.cli.main import main; main()", "worker", "--database-url", url,
           "--no-upgrade", "--poll", "0.05"]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env) for _ in range(2)]
    try:
        while True:
            with sc.db.read() as conn:
                done = conn.execute(select(func.count()).where(scenario_runs.c.state == "done")).scalar_one()
                pending = conn.execute(select(func.count()).where(scenario_outbox.c.state == "pending")).scalar_one()
            if done >= runs and not pending:
                break
            if time.perf_counter() - t0 > 600:
                raise RuntimeError(f"only {done} of {runs} runs done after 600 s")
            time.sleep(0.1)
        elapsed = time.perf_counter() - t0
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=20)
    with sc.db.read() as conn:
        steps = conn.execute(select(func.count()).where(scenario_step_log.c.outcome.in_(
            ("completed", "yes", "no")))).scalar_one()
    sc.close()
    say(f"{runs} runs, {steps} steps in {elapsed:.1f} s with 2 workers (process start included)")
    return {"runs": runs, "steps": steps, "workers": 2, "seconds": round(elapsed, 2),
            "steps_per_second": round(steps / elapsed, 1), "runs_per_second": round(runs / elapsed, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--members", type=int, default=1_000_000)
    ap.add_argument("--chunk", type=int, default=50_000)
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--json", action="store_true", help="Print one JSON line only.")
    ap.add_argument("--keep", action="store_true", help="Keep the database.")
    args = ap.parse_args()
    say = (lambda *_: None) if args.json else (lambda m: print(m, file=sys.stderr))
    from loyalty.server import db
    name = f"loyalty_bench_{uuid.uuid4().hex[:10]}"
    admin = _admin()
    admin.execute(f'CREATE DATABASE "{name}"')
    url = PG.rsplit("/", 1)[0] + "/" + name
    try:
        db.upgrade(url)
        out = {"benchmark": "scenarios", "python": platform.python_version(), "machine": platform.machine(),
               "cpus": os.cpu_count(), "postgres": admin.execute("SHOW server_version").fetchone()[0],
               "batch": bench_batch(url, args.members, args.chunk, say),
               "scenario": bench_scenario(url, min(args.runs, args.members), say)}
    finally:
        if not args.keep:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
