"""The mLSTM's three forms side by side: time and peak memory of forward + backward.

    python benchmarks/bench_mlstm.py                       # T = 256, 1024, 4096
    python benchmarks/bench_mlstm.py --T 256 --repeat 3 --out benchmarks/results

For each sequence length, ``xlstm.MLSTM`` (numpy, float64 by default) runs forward and
backward (with a cache, a gradient on every output) in each form: recurrent, parallel and
chunkwise (``--chunk`` steps per chunk). Time is the median of ``--repeat`` calls, after
one untimed call; memory is the peak that numpy allocated during one call, beyond the
inputs (tracemalloc sees numpy's buffers). The forms are interleaved within each length,
so their ratios come from one run on one machine. Results go to ``--out`` (default
``benchmarks/out``, never the committed results unless asked), as JSON and a Markdown
table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_machine, versions, write_cpu_report  # noqa: E402
from xlstm.mlstm import FORMS  # noqa: E402

import xlstm  # noqa: E402


def run_once(model, x, dy, form):
    y, _, cache = model.forward(x, form=form)
    model.backward(dy, cache)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--n-h", type=int, default=64)
    ap.add_argument("--n-x", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dtype", default="float64", choices=("float32", "float64"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    model = xlstm.MLSTM(args.n_x, args.n_h, num_heads=args.heads, chunk=args.chunk,
                        dtype=args.dtype, seed=0)
    rows = []
    for T in args.T:
        x = rng.standard_normal((args.n_x, args.batch, T)).astype(args.dtype)
        dy = rng.standard_normal((args.n_h, args.batch, T)).astype(args.dtype)
        for form in FORMS:
            run_once(model, x, dy, form)  # untimed
            tracemalloc.start()
            run_once(model, x, dy, form)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                run_once(model, x, dy, form)
                times.append(time.perf_counter() - t0)
            row = {"T": T, "form": form, "fwd_bwd_ms": 1e3 * statistics.median(times),
                   "peak_mib": peak / 2**20}
            rows.append(row)
            print(f"T={T:5d} {form:10s} {row['fwd_bwd_ms']:10.1f} ms  {row['peak_mib']:9.1f} MiB",
                  flush=True)
    report = {
        "what": "xlstm.MLSTM forward + backward per form",
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": cpu_machine(),
        "versions": versions(),
        "rows": rows,
    }
    title = (f"# mLSTM forms, forward + backward ({args.dtype}, batch {args.batch}, "
             f"{args.heads} heads, n_h {args.n_h}, n_x {args.n_x}, chunk {args.chunk})")
    table = ["| T | form | fwd+bwd ms | peak MiB |", "|---:|---|---:|---:|"]
    table += [f"| {r['T']} | {r['form']} | {r['fwd_bwd_ms']:.1f} | {r['peak_mib']:.1f} |"
              for r in rows]
    write_cpu_report(args.out, f"bench_mlstm_{args.dtype}", report, title, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
