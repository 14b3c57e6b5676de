"""Data-parallel training on one machine: time per step for 1 and 2 ranks, and the cost
of the all-reduce.

    python benchmarks/bench_distributed.py                 # needs mpi4py and an mpiexec
    python benchmarks/bench_distributed.py --out benchmarks/results

For each size ``n_a,m,T`` an ``xlstm.LSTM`` (numpy, float32, n_x = n_a) with the loss
``mean(y**2) / 2`` trains on a global batch of ``m`` sequences of ``T`` steps with
``fit(..., comm=MPIComm())``, under ``mpiexec -n R python -m mpi4py`` for each layout of the
machine's cores: one rank with every BLAS thread, one rank with one thread, and R ranks of
one thread each (their shards are ``m / R`` sequences). Time per step is the median over
``--rounds`` rounds (the layouts take turns within a round) of a timed ``fit`` of
``--steps`` steps after an untimed one. Each run also times the all-reduce of its
gradients alone, and of buffers of 10**2 to 10**7 floats, for the cost model. Results go to
``--out`` (default ``benchmarks/out``, never the committed results unless asked), as JSON
and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def worker(args):
    """One mpiexec run: time fit and the all-reduces on this layout; rank 0 writes JSON."""
    import xlstm
    from xlstm import distributed

    comm = distributed.MPIComm()
    n_a, m, T = args.size
    model = xlstm.LSTM(n_a, n_a, dtype="float32", seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n_a, m, T)).astype(np.float32)
    mine = distributed.shard(x, comm, 1)

    def loss_fn(params, batch):
        y, _, cache = model.forward(batch, params=params)
        _, _, grads = model.backward(y / y.size * comm.size, cache)  # the global mean's
        return float(np.sum(y * y)) / (2 * y.size), grads

    def batches():
        while True:
            yield mine

    opt = xlstm.SGD(lr=1e-3)
    xlstm.fit(model.params, batches, loss_fn, opt, steps=2, comm=comm, progress=False)
    res = xlstm.fit(model.params, batches, loss_fn, opt, steps=args.steps, comm=comm,
                    progress=False)
    step_s = res.seconds / args.steps
    grads = loss_fn(model.params, mine)[1]
    n_floats = sum(int(np.prod(v.shape)) for layer in grads for v in layer.values())

    def time_reduce(tree, reps):
        comm.barrier()
        t0 = time.perf_counter()
        for _ in range(reps):
            comm.allreduce_mean(tree)
        return (time.perf_counter() - t0) / reps

    reduce_grads = time_reduce(grads, 20)
    sweep = {}
    for e in range(2, 8):
        n = 10 ** e
        sweep[n] = time_reduce({"g": np.ones(n, np.float32)}, 20 if e < 6 else 5)
    # the compute alone: a local step on this rank's shard, no communication
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss_fn(model.params, mine)
    compute_s = (time.perf_counter() - t0) / args.steps
    if comm.rank == 0:
        Path(args.result).write_text(json.dumps({
            "step_ms": 1e3 * step_s, "compute_ms": 1e3 * compute_s,
            "grad_floats": n_floats, "allreduce_grads_ms": 1e3 * reduce_grads,
            "allreduce_sweep_ms": {str(k): 1e3 * v for k, v in sweep.items()},
        }))


def layouts(cores, ranks):
    """(name, ranks, BLAS threads per rank) of each way to run."""
    out = [(f"1 rank x {cores} threads", 1, cores), ("1 rank x 1 thread", 1, 1)]
    out += [(f"{r} ranks x 1 thread", r, 1) for r in ranks if r > 1]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["64,64,50", "256,64,50"])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "out"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=lambda s: tuple(map(int, s.split(","))), help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)

    import shutil

    from _machine import cpu_machine, versions, write_cpu_report

    exe = shutil.which("mpiexec")
    if exe is None:
        sys.exit("needs an mpiexec on the PATH and mpi4py (pip install mpich '.[mpi]')")
    cores = len(os.sched_getaffinity(0))
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            for size in args.sizes:
                for name, r, threads in layouts(cores, args.ranks):
                    result = Path(tmp) / "r.json"
                    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(threads),
                           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
                    cmd = [exe, "-n", str(r), sys.executable, "-m", "mpi4py", __file__,
                           "--worker", "--size", size, "--steps", str(args.steps),
                           "--result", str(result)]
                    subprocess.run(cmd, env=env, check=True, timeout=1800)
                    got = json.loads(result.read_text())
                    runs.setdefault((size, name), []).append(got)
                    print(f"round {rnd}: {size:>12} {name:22s} {got['step_ms']:8.2f} ms/step "
                          f"(all-reduce of the gradients {got['allreduce_grads_ms']:.3f} ms)",
                          flush=True)
    rows = []
    for (size, name), got in runs.items():
        med = {k: statistics.median(g[k] for g in got)
               for k in ("step_ms", "compute_ms", "allreduce_grads_ms")}
        sweep = {n: statistics.median(g["allreduce_sweep_ms"][n] for g in got)
                 for n in got[0]["allreduce_sweep_ms"]}
        rows.append({"size": size, "layout": name, **med, "grad_floats": got[0]["grad_floats"],
                     "allreduce_sweep_ms": sweep})
    report = {
        "what": "xlstm.fit data-parallel on MPI: time per step by layout of the cores",
        "config": {k: v for k, v in vars(args).items()
                   if k not in ("out", "worker", "size", "result")},
        "machine": cpu_machine(cores=cores),
        "versions": versions(),
        "rows": rows,
    }
    lines = ["| n_a,m,T | layout | ms/step | compute ms/step | all-reduce of grads ms |",
             "|---|---|---:|---:|---:|"]
    lines += [f"| {r['size']} | {r['layout']} | {r['step_ms']:.2f} | {r['compute_ms']:.2f} | "
              f"{r['allreduce_grads_ms']:.3f} |" for r in rows]
    lines += ["", "All-reduce (mean) of n float32, ms:", "",
              "| layout | " + " | ".join(f"{int(n):.0e}" for n in rows[0]["allreduce_sweep_ms"])
              + " |", "|---|" + "---:|" * len(rows[0]["allreduce_sweep_ms"])]
    seen = set()
    for r in rows:
        if r["layout"] in seen:
            continue
        seen.add(r["layout"])
        lines.append(f"| {r['layout']} | " + " | ".join(
            f"{v:.3f}" for v in r["allreduce_sweep_ms"].values()) + " |")
    write_cpu_report(args.out, "bench_distributed", report,
                     "# Data-parallel training on one machine (xlstm.LSTM, float32, MPI)", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
