"""Per-token inference: ``model.step`` against torch's ``nn.LSTMCell`` and ``nn.GRUCell``.

    python benchmarks/bench_step.py                     # n_a = 256, m = 1 and 32
    python benchmarks/bench_step.py --out benchmarks/results

Each (cell, m, implementation) runs in its own fresh interpreter, ``--rounds`` times with
the implementations alternating, so that their ratio comes from one run on one machine.
A sample times many consecutive steps, each step's state feeding the next, as a streaming
user runs them: xlstm's ``LSTM``/``GRU`` (numpy, float32) ``step(x_t, state)`` against the
torch cell under ``torch.no_grad()``, both on ``--threads`` threads. The time per step is the
median of the rounds' medians. Results go to ``--out`` (default ``benchmarks/out``, never
the committed results unless asked), as JSON and a Markdown table. For figures, run it with
``OPENBLAS_CORETYPE`` and ``OPENBLAS_L2_SIZE`` unset; the JSON records the BLAS kernel.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _machine import (  # noqa: E402
    blas_kernel,
    cpu_machine,
    set_threads,
    thread_info,
    versions,
    write_cpu_report,
)

CELLS = {"lstm": ("LSTM", "LSTMCell"), "gru": ("GRU", "GRUCell")}


def worker(impl, cell, n, m, repeat, threads):
    """Time one implementation in this process; returns µs per step (median and min)."""
    set_threads(threads)
    import numpy as np

    sys.path.insert(0, str(HERE.parent))
    from _timing import measure

    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, n)).astype(np.float32)
    if impl == "xlstm":
        import xlstm

        model = getattr(xlstm, CELLS[cell][0])(n, n, layout="batch_first", seed=0)
        box = [model.initial_state(m)]

        def once():
            box[0] = model.step(x, box[0])[1]

        sync = lambda: None  # noqa: E731
    else:
        import torch

        torch.set_num_threads(threads)
        module = getattr(torch.nn, CELLS[cell][1])(n, n)
        xt = torch.from_numpy(x)
        zeros = torch.zeros(m, n)
        box = [(zeros, zeros) if cell == "lstm" else zeros]

        def once():
            with torch.no_grad():
                box[0] = module(xt, box[0])

        sync = lambda: None  # noqa: E731
    t = measure(once, sync, repeat, warmup=50)
    torch = sys.modules.get("torch")
    return {"median_us": 1e3 * t["median_ms"], "min_us": 1e3 * t["min_ms"],
            "calls_per_sample": t["calls_per_sample"],
            "blas": blas_kernel(thread_info(threads, torch)), "versions": versions()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=256, help="n_x = n_a")
    ap.add_argument("--m", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "out"))
    ap.add_argument("--worker", nargs=3, metavar=("IMPL", "CELL", "M"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        impl, cell, m = args.worker
        print(json.dumps(worker(impl, cell, args.n, int(m), args.repeat, args.threads)))
        return
    results, table = [], ["| cell | m | xlstm step (µs) | torch cell (µs) | xlstm / torch |",
                          "|---|---|---|---|---|"]
    for cell in args.cells:
        for m in args.m:
            times = {"xlstm": [], "torch": []}
            for _ in range(args.rounds):
                for impl in times:
                    cmd = [sys.executable, __file__, "--worker", impl, cell, str(m), "--n",
                           str(args.n), "--repeat", str(args.repeat), "--threads",
                           str(args.threads)]
                    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
                    times[impl].append(json.loads(out.stdout.strip().splitlines()[-1]))
            med = {k: statistics.median(r["median_us"] for r in v) for k, v in times.items()}
            ratio = med["xlstm"] / med["torch"]
            results.append({"cell": cell, "n": args.n, "m": m, "rounds": times,
                            "median_us": med, "xlstm_over_torch": ratio})
            table.append(f"| {cell} | {m} | {med['xlstm']:.1f} | {med['torch']:.1f} | "
                         f"{ratio:.2f}x |")
            print(table[-1], flush=True)
    first = results[0]["rounds"]
    machine = cpu_machine(cores=args.threads)
    machine["blas"] = first["xlstm"][0]["blas"]  # the kernel numpy ran, seen in its worker
    report = {"benchmark": "bench_step", "n": args.n, "threads": args.threads,
              "machine": machine,
              "versions": {**first["torch"][0]["versions"], **first["xlstm"][0]["versions"]},
              "results": results}
    write_cpu_report(args.out, "bench_step", report,
                     f"# Per-token inference, n_x = n_a = {args.n}, float32, "
                     f"{args.threads} threads (lower is better; ratio of times)", table)


if __name__ == "__main__":
    main()
