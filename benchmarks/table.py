"""Every figure README's benchmark table shows, measured in one run, printed as one table.

    .venv/bin/python benchmarks/table.py            # about 15 minutes on a 2-core machine
    .venv/bin/python benchmarks/table.py --quick    # smaller runs, for a first look (minutes)

Each row runs in a fresh child process (``benchmarks/refresh_tokens.py``'s ``measure_*`` and
``benchmarks/leases_bench.py``'s ``measure_*`` functions), one after another, so no row shares a
process, a warm cache or a CPU with another. Services: the benchmarks' own PostgreSQL databases and
Redis databases (see benchmarks/README.md); nothing of the test suite's is touched.

Exit status: 0 printed; 1 some row broke a correctness check (over the rate limit, a double invite,
a team over capacity); 3 a row could not be measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BASE = Path(__file__).resolve().parent.parent
MARK = "@@BENCH-JSON@@"
NO_LIMIT = 10_000  # a "limit" this high stands for none (the CPU-ceiling and memory rows)


@dataclass
class Row:
    group: str
    label: str
    module: str
    function: str
    kwargs: dict = field(default_factory=dict)
    result: dict | None = None
    error: str = ""


def refresh_rows(quick: bool) -> list[Row]:
    # Enough tokens for about 10 s of run at each limit (1/4 of it with --quick).
    scale = 0.25 if quick else 1.0
    rows = [
        Row("refresh", f"{rate} req/s, 50 ms, 2 workers", "refresh_tokens", "measure_refresh",
            {"tokens": int(rate * 10 * scale), "rate": rate, "latency": 0.05, "workers": 2})
        for rate in (20, 100, 400)
    ]  # fmt: skip
    rows.append(
        Row("refresh", "CPU ceiling: no limit, 10 ms, 2 workers", "refresh_tokens", "measure_refresh",
            {"tokens": int(20_000 * scale), "rate": 100_000, "latency": 0.01, "workers": 2})
    )  # fmt: skip
    for tokens in (10_000, 100_000):
        rows.append(
            Row("refresh", f"memory: {tokens:,} tokens, no limit, 10 ms, 2 workers", "refresh_tokens",
                "measure_refresh", {"tokens": int(tokens * scale), "rate": 100_000, "latency": 0.01, "workers": 2})
        )  # fmt: skip
    rows.append(
        Row("refresh", "ours on the old tool's 100 tokens (1 req/s limit off: 1,000 req/s), 50 ms, 2 workers",
            "refresh_tokens", "measure_refresh", {"tokens": 100, "rate": 1000, "latency": 0.05, "workers": 2})
    )  # fmt: skip
    rows.append(
        Row("refresh", "the old tool: sequential, 100 tokens, 50 ms", "refresh_tokens", "measure_old_tool",
            {"tokens": 100, "latency": 0.05})
    )  # fmt: skip
    return rows


def lease_rows(quick: bool) -> list[Row]:
    rows = [
        Row("leases", "join sync 10 teams x 1,000 leases, 20 ms", "leases_bench", "measure_join_sync",
            {"teams": 10, "leases": 300 if quick else 1000, "latency": 0.02})
    ]  # fmt: skip
    for other in (0, 40_000):
        for workers in (1, 2, 4):
            rows.append(
                Row("leases", f"transfers, {workers} worker(s) x 4 threads, 20 ms, {other:,} other leases",
                    "leases_bench", "measure_transfers",
                    {"workers": workers, "threads": 4, "transfers": 300 if quick else 1000,
                     "other_leases": other // (4 if quick else 1), "latency": 0.02})
            )  # fmt: skip
    return rows


def run_row(row: Row, timeout: float) -> None:
    code = (
        "import json, sys\n"
        f"sys.path[:0] = [{str(BASE / 'benchmarks')!r}, {str(BASE)!r}]\n"
        f"from {row.module} import {row.function} as measure\n"
        f"result = measure(**json.loads({json.dumps(row.kwargs)!r}))\n"
        f"print({MARK!r} + json.dumps(result, default=str))\n"
    )
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=BASE, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        row.error = f"did not finish within {timeout:.0f} s"
        return
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            row.result = json.loads(line[len(MARK) :])
            row.result.setdefault("wall_seconds", round(time.monotonic() - started, 1))
            return
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    row.error = f"exit {proc.returncode}: " + " | ".join(tail)


def _fmt(value: object, digits: int = 2) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return f"{os.cpu_count()} cores ({cpu}){mem}, Python {platform.python_version()}, {platform.system()}"


def print_refresh(rows: list[Row]) -> None:
    print(
        "| refresh run | tokens | seconds | ideal s | ratio | max req in any 1 s / limit | checks/s "
        "| CPU s per 1,000 | peak RSS MB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        r = row.result or {}
        if row.error:
            print(f"| {row.label} | — | failed: {row.error} | | | | | | |")
            continue
        limit = r.get("rate")
        most = r.get("max_in_any_second")
        unlimited = limit is not None and limit >= NO_LIMIT
        over = "—" if most is None else f"{_fmt(most)} / {'none' if unlimited else _fmt(limit, 0)}"
        if unlimited:  # no limit: the ideal time means nothing
            r = {**r, "ideal_seconds": None, "ratio": None}
        print(
            f"| {row.label} | {_fmt(r.get('tokens'))} | {_fmt(r.get('seconds'))} | {_fmt(r.get('ideal_seconds'))} "
            f"| {_fmt(r.get('ratio'), 3)} | {over} | {_fmt(r.get('checks_per_s'), 0)} "
            f"| {_fmt(r.get('cpu_s_per_1000'))} | {_fmt(r.get('peak_rss_mb'), 0)} |"
        )
    ours = next((r.result for r in rows if r.function == "measure_refresh" and r.kwargs.get("tokens") == 100), None)
    old = next((r.result for r in rows if r.function == "measure_old_tool"), None)
    if ours and old and ours.get("seconds"):
        print(f"\nSpeed-up on the same 100 tokens and fake upstream: {old['seconds'] / ours['seconds']:.1f} x")


def print_leases(rows: list[Row]) -> None:
    print("| lease engine | calls | queries | seconds | per second | checks |")
    print("|---|---:|---:|---:|---:|---|")
    for row in rows:
        r = row.result or {}
        if row.error:
            print(f"| {row.label} | | | failed: {row.error} | | |")
            continue
        checks = r.get("checks", "ok" if r.get("ok", True) else "FAILED")
        print(
            f"| {row.label} | {_fmt(r.get('calls'))} | {_fmt(r.get('queries'))} | {_fmt(r.get('seconds'))} "
            f"| {_fmt(r.get('per_s'), 1)} | {checks} |"
        )


def broken(row: Row) -> bool:
    r = row.result or {}
    if r.get("ok") is False:
        return True
    limit = r.get("rate")
    return bool(limit and r.get("max_in_any_second") and r["max_in_any_second"] > limit)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (a first look, not the published figures)")
    parser.add_argument("--only", choices=["refresh", "leases"], help="measure one group")
    parser.add_argument("--row-timeout", type=float, default=900.0, help="seconds one row may take (default 900)")
    args = parser.parse_args(argv)

    rows = []
    if args.only in (None, "refresh"):
        rows += refresh_rows(args.quick)
    if args.only in (None, "leases"):
        rows += lease_rows(args.quick)
    started = time.monotonic()
    for row in rows:
        print(f"measuring: {row.label} ...", file=sys.stderr, flush=True)
        run_row(row, args.row_timeout)
        print(f"  {row.error or json.dumps(row.result, default=str)}", file=sys.stderr, flush=True)

    print(f"Measured {time.strftime('%Y-%m-%d')} on {machine()}, in one run of {time.monotonic() - started:.0f} s"
          f"{' (--quick)' if args.quick else ''}.\n")  # fmt: skip
    refresh = [r for r in rows if r.group == "refresh"]
    leases = [r for r in rows if r.group == "leases"]
    if refresh:
        print_refresh(refresh)
        print()
    if leases:
        print_leases(leases)
    if any(row.error for row in rows):
        return 3
    return 1 if any(broken(row) for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
