"""How times are taken: the clock around one call, the GEMM ceiling, the rounds, and the
fresh process that each measurement runs in."""

from __future__ import annotations

import gc
import json
import statistics
import subprocess
import sys
import time


def measure(fn, sync, repeat, warmup):
    """Median and min wall time of ``fn`` in ms over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync()
    times, was_enabled = [], gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeat):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
    finally:
        if was_enabled:
            gc.enable()
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times)}


def gemm_ceiling(be, rng, n, timed):
    """GFLOP/s of a square ``n^3`` GEMM from its fastest run: the machine's best, not its
    typical, so that no implementation's share of it is flattered by a noisy median."""
    A, B = be.asarray(rng.standard_normal((n, n))), be.asarray(rng.standard_normal((n, n)))
    t = timed(lambda: A @ B)
    return {"n": n, **t, "gflops": 2 * n**3 / (t["min_ms"] * 1e6)}


def combine_rounds(rounds):
    """One result per implementation from several rounds: the median of the rounds'
    medians and the smallest minimum; each round's median is kept in the JSON."""
    out = {}
    for key, first in rounds[0].items():
        out[key] = dict(first)
        for ph in ("fwd", "fwd_bwd"):
            meds = [r[key][ph]["median_ms"] for r in rounds if key in r]
            out[key][ph] = {"median_ms": statistics.median(meds),
                            "min_ms": min(r[key][ph]["min_ms"] for r in rounds if key in r),
                            "round_medians_ms": meds}  # fmt: skip
    return out


def run_worker(script, args, worker, size, versions_seen):
    """Run one measurement in a fresh interpreter of ``script --worker`` and return its
    result dict; the versions that the worker imported are added to ``versions_seen``."""
    cmd = [sys.executable, str(script), "--worker", worker,
           "--backend", args.backend, "--dtype", args.dtype, "--repeat", str(args.repeat),
           "--warmup", str(args.warmup), "--threads", str(args.threads)]  # fmt: skip
    if args.quick:
        cmd.append("--quick")
    if getattr(args, "baseline", None):
        cmd += ["--baseline", str(args.baseline)]
    if size is not None:
        cmd += ["--sizes", ",".join(map(str, size))]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {worker} {size} failed:\n{done.stderr[-4000:]}")
    line = json.loads(done.stdout.strip().splitlines()[-1])
    versions_seen.update(line["versions"])
    return line["result"]
