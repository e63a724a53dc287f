"""Receipt engine benchmark: the compiled core against the pure-Python reference, in the same run.

    python benchmarks/engine.py            # table: 5, 20, 200 lines x 10, 100, 1,000 promotions (~1.5 min)
    python benchmarks/engine.py --quick    # shorter timing, three sizes (~15 s)
    python benchmarks/engine.py --json     # one JSON object, nothing else on stdout
    python benchmarks/engine.py --sizes 20x100,200x1000

As msgspec's benchmarks do, every (contender, size) runs in a fresh subprocess on data from the seeded
workload generator (``loyalty.core.workload``, the same programs and receipts for both contenders) and
prints one JSON line; this driver renders the table. What is timed is ``engine.calculate(receipt, member,
budgets_used)`` from the request dicts to the answer dict, answer included; compiling the program is not.
Absolute figures move from machine to machine and run to run, so read the ratios: core vs reference,
and what ten times more promotions cost.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import subprocess
import sys
import time

LINES = (5, 20, 200)
PROMOTIONS = (10, 100, 1000)
CONTENDERS = ("core", "reference")


# ---- child: one contender, one size ---------------------------------------------------------------------

def workload_for(n_lines: int, n_promotions: int):
    """The program and the requests of a size: seeded, identical for every contender and every run."""
    from loyalty.core import workload

    program = workload.random_program(random.Random(1000 + n_promotions), n_promotions, stacking="priority")
    rng = random.Random(2000 + 7 * n_lines + n_promotions)
    n_requests = max(8, min(64, 1280 // n_lines))
    requests = [workload.random_request(rng, program, n_lines) for _ in range(n_requests)]
    return program, requests


def run_child(contender: str, size: str, budget: float) -> dict:
    from loyalty.core import ReferenceEngine, program_from_dict

    if contender == "core":
        from loyalty.core._engine import Engine  # the compiled class itself, never the fallback
    else:
        Engine = ReferenceEngine
    n_lines, n_promotions = (int(x) for x in size.split("x"))
    program, requests = workload_for(n_lines, n_promotions)
    engine = Engine(program_from_dict(program))
    calculate = engine.calculate

    applied = 0
    for receipt, member, budgets in requests:  # warm-up, and what the receipts meet
        applied += len(calculate(receipt, member, budgets)["promotions"])

    passes = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        started = time.perf_counter()
        while len(passes) < 3 or time.perf_counter() - started < budget:
            t0 = time.perf_counter()
            for receipt, member, budgets in requests:
                calculate(receipt, member, budgets)
            passes.append(time.perf_counter() - t0)
            if time.perf_counter() - started > 4 * budget and len(passes) >= 1:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    best = min(passes)
    receipts_per_s = len(requests) / best
    return {
        "contender": contender, "size": size, "receipts_per_s": receipts_per_s,
        "lines_per_s": receipts_per_s * n_lines, "us_per_receipt": 1e6 / receipts_per_s,
        "requests": len(requests), "passes": len(passes),
        "promotions_applied_per_receipt": applied / len(requests),
    }


# ---- driver ---------------------------------------------------------------------------------------------

def machine_info() -> dict:
    info = {"platform": platform.platform(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "processor": platform.processor() or None}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for row in f:
                if row.startswith("model name"):
                    info["processor"] = row.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def versions() -> dict:
    from importlib import metadata

    import loyalty.core

    out = {"python": platform.python_version(), "implementation": platform.python_implementation(),
           "compiled_core": loyalty.core.COMPILED}
    for dist in ("loyalty-server", "Cython", "PyYAML"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def run_in_subprocess(contender: str, size: str, budget: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", contender, size, "--budget", str(budget)]
    env = {k: v for k, v in os.environ.items() if k != "LOYALTY_NO_EXTENSIONS"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"contender": contender, "size": size, "error": last}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(results: dict) -> dict:
    """Per size key ("20x100"): the figures of both contenders and their ratio."""
    out = {}
    for size, by in results.items():
        core, ref = by.get("core", {}), by.get("reference", {})
        row = {
            "core_receipts_per_s": core.get("receipts_per_s"),
            "reference_receipts_per_s": ref.get("receipts_per_s"),
            "core_lines_per_s": core.get("lines_per_s"),
            "reference_lines_per_s": ref.get("lines_per_s"),
            "speedup": (core["receipts_per_s"] / ref["receipts_per_s"]
                        if "receipts_per_s" in core and "receipts_per_s" in ref else None),
            "promotions_applied_per_receipt": core.get("promotions_applied_per_receipt",
                                                       ref.get("promotions_applied_per_receipt")),
        }
        errors = {c: r["error"] for c, r in by.items() if "error" in r}
        if errors:
            row["errors"] = errors
        out[size] = row
    return out


def fmt(x, spec=",.0f") -> str:
    return "n/a" if x is None else format(x, spec)


def render(summary: dict, machine: dict, vers: dict, quick: bool) -> str:
    rows = [("size (lines x promos)", "core receipts/s", "ref receipts/s", "core/ref", "core lines/s",
             "core us/receipt", "promos applied")]
    for size, r in summary.items():
        rps = r["core_receipts_per_s"]
        rows.append((size, fmt(rps), fmt(r["reference_receipts_per_s"]), fmt(r["speedup"], ".1f") + "x"
                     if r["speedup"] else "n/a", fmt(r["core_lines_per_s"]),
                     fmt(1e6 / rps if rps else None, ",.1f"), fmt(r["promotions_applied_per_receipt"], ".1f")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = [f"receipt engine: core vs reference{' (quick)' if quick else ''}",
           f"{machine.get('processor')} ({machine.get('cpu_count')} cpus), {machine.get('platform')}",
           "python {python}, Cython {Cython}, loyalty-server {loyalty-server}, compiled core: {compiled_core}"
           .format(**vers), ""]
    for k, row in enumerate(rows):
        out.append("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))))
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    # What ten times more promotions cost, at each receipt length.
    costs = []
    for n in LINES:
        small, big = summary.get(f"{n}x100"), summary.get(f"{n}x1000")
        if not (small and big):
            continue
        parts = []
        for who, key in (("core", "core_receipts_per_s"), ("reference", "reference_receipts_per_s")):
            if small[key] and big[key]:
                parts.append(f"{who} {small[key] / big[key]:.2f}x")
        if parts:
            costs.append(f"  {n} lines: " + ", ".join(parts))
    if costs:
        out += ["", "cost of 1,000 vs 100 promotions (time per receipt, 1,000 / 100):"] + costs
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    ap.add_argument("--quick", action="store_true", help="short timing on 5x10, 20x100 and 200x1000")
    ap.add_argument("--sizes", help="comma-separated LINESxPROMOTIONS, e.g. 20x100,200x1000")
    ap.add_argument("--budget", type=float, help="seconds of timing per contender and size")
    ap.add_argument("--child", nargs=2, metavar=("CONTENDER", "SIZE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        print(json.dumps(run_child(args.child[0], args.child[1], args.budget or 1.0)))
        return 0

    if args.sizes:
        sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    elif args.quick:
        sizes = ["5x10", "20x100", "200x1000"]
    else:
        sizes = [f"{n}x{p}" for n in LINES for p in PROMOTIONS]
    budget = args.budget or (0.3 if args.quick else 1.5)

    results: dict = {}
    for size in sizes:
        results[size] = {}
        for contender in CONTENDERS:
            if not args.json:
                print(f"  {contender} {size} ...", end="\r", file=sys.stderr, flush=True)
            results[size][contender] = run_in_subprocess(contender, size, budget)
    if not args.json:
        print(" " * 40, end="\r", file=sys.stderr)
    summary = summarise(results)
    machine, vers = machine_info(), versions()
    if args.json:
        print(json.dumps({**summary, "machine": machine, "versions": vers, "quick": args.quick,
                          "budget_s": budget}))
    else:
        print(render(summary, machine, vers, args.quick))
        for size, r in summary.items():
            for who, err in r.get("errors", {}).items():
                print(f"  {size} {who}: {err}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
