"""How times are taken: the clock around one call, the GEMM ceiling, the rounds, and the
fresh process that each measurement runs in."""

from __future__ import annotations

import gc
import json
import math
import statistics
import subprocess
import sys
import time

#: Seconds that one timed sample lasts at least: a shorter call is repeated within its
#: sample (the sample's time divided by the count), so that neither the clock's resolution
#: nor a single slow call decides a median.
MIN_SAMPLE_S = 0.02
#: The most calls in one sample.
MAX_CALLS = 10_000


def measure(fn, sync, repeat, warmup, min_sample=MIN_SAMPLE_S):
    """Median and min time per call of ``fn`` in ms over ``repeat`` samples, after
    ``warmup`` untimed calls and one that sets the calls per sample (enough for
    ``min_sample`` seconds)."""
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    once = time.perf_counter() - t0
    number = min(MAX_CALLS, max(1, math.ceil(min_sample / max(once, 1e-9))))
    times, was_enabled = [], gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeat):
            sync()
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            sync()
            times.append((time.perf_counter() - t0) / number)
    finally:
        if was_enabled:
            gc.enable()
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
            "calls_per_sample": number, "samples": repeat}


def gemm_ceiling(be, rng, n, timed):
    """GFLOP/s of a square ``n^3`` GEMM from its fastest sample: the machine's best, not
    its typical, so that no implementation's share of it is flattered by a noisy median."""
    A, B = be.asarray(rng.standard_normal((n, n))), be.asarray(rng.standard_normal((n, n)))
    t = timed(lambda: A @ B)
    return {"n": n, **t, "gflops": 2 * n**3 / (t["min_ms"] * 1e6), "source": f"{n}^3 GEMM"}


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
           "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--tf32", args.tf32]  # fmt: skip
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
