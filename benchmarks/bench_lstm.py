"""Time xlstm's LSTM against a per-step seed-style baseline, torch.nn.LSTM and raw GEMMs.

Usage and options: ``python benchmarks/bench_lstm.py --help`` and ``benchmarks/README.md``.

Methodology. Per size ``(n_x, n_a, m, T_x)``, with ``n_y = 10`` classes, each implementation
runs the sequence forward pass alone, and forward then backward (gradients of the input, the
initial state and all gate weights and biases). Inputs, ``a0`` and the upstream gradient ``da``
are random normal numbers times 0.1 (never zeros); the parameters of
``xlstm.init_params(seed=0)`` are copied into every implementation, and each one's hidden
states are checked against xlstm's.

* xlstm: ``lstm_forward(..., return_caches=False)`` forward; ``lstm_forward`` then
  ``lstm_backward(da, caches)`` forward+backward, on ``--backend``.
* seed-style: :class:`SeedLSTM`, the notebook's step-by-step code (per step a fresh ``zeros``
  concatenation, four gate GEMMs, a softmax and a cache tuple; backward four ``dW`` and eight
  ``da``/``dx`` GEMMs per step, accumulated step by step). Like the notebook it works in
  float64 whatever ``--dtype`` says. numpy, or CuPy with ``--backend cupy``.
* xlstm.LSTM: the model class (one layer, the LSTM core without the prediction), with the
  same parameters and ``a0``; ``xlstm-lengths`` the same over a padded batch (lengths uniform
  in ``[T_x // 2, T_x]``, the first one ``T_x``), for the cost of ``lengths``.
* torch.nn.LSTM: time-major input ``(T_x, m, n_x)``; input and ``h0`` require gradients, so
  ``out.backward(da)`` computes the same gradients. Forward alone runs in eval mode under
  ``torch.no_grad()``, as a model is deployed. CPU on CPU backends, cuDNN on a GPU. LSTM core only: xlstm and
  the seed also compute the softmax prediction.
* GEMMs only: the workload's matrix products alone, at their real shapes, on ``--backend``:
  ``(T m, n_x) @ (n_x, 4 n_a)``, ``(T m, n_a) @ (n_a, n_y)`` and ``T`` times
  ``(m, n_a) @ (n_a, 4 n_a)`` forward; ``T`` times ``(m, 4 n_a) @ (4 n_a, n_a)``,
  ``(4 n_a, T m) @ (T m, n_a + n_x)`` and ``(T m, 4 n_a) @ (4 n_a, n_x)`` backward.

* model rows: xlstm's GRU, a 2-layer bidirectional LSTM and the sLSTM (``--impls
  xlstm-gru torch-gru ...``) against torch's module of the same kind with the same weights;
  the sLSTM has no torch (cuDNN) twin, so its row gives its time per step instead of a
  ratio. Every model row records ``us_per_step`` in the JSON.

Sizes: ``--sizes``, or a named set, ``--preset`` (``gpu``: the race against cuDNN at
(256,256,8,100), (256,256,64,100), (1024,1024,64,100) and FlashRNN's (768,768,16,1024)).
Precision: ``--tf32 off`` (default) turns TF32 off on both sides, ``on`` on both: torch's
legacy ``allow_tf32`` switches and its ``fp32_precision`` ones (2.9+), and ``CUPY_TF32``;
the JSON's ``tf32`` entry records every switch as read, ``versions.cudnn`` cuDNN's version,
``device`` and ``torch_device`` the GPU.

Each time is the median of ``--repeat`` samples after ``--warmup`` untimed calls, with the
garbage collector paused; a sample repeats a short call until it lasts 20 ms (the time per
call is the sample's over the count), so that a single cold call cannot decide a median;
on a GPU the device is synchronised before the clock starts and stops. Each
implementation and size, and the ceiling, run in a fresh process (``--in-process`` turns this
off): torch's OpenMP threads keep spinning after a call and would slow numpy's BLAS down.
``--rounds N`` runs the whole round of implementations N times in turn and reports the median
of the rounds, so that a change in the machine's load during the run biases no ratio.
Flops: forward ``2 T m 4 n_a (n_a + n_x) + 2 T m n_y n_a``, backward twice the gate part
(torch and xlstm.LSTM are credited with the gate flops only). The ceiling is the GFLOP/s of a
square ``2048^3`` GEMM (its fastest sample) in ``--dtype`` on ``--backend``, measured in the same run,
or the rate of a faster row where one is (the JSON's ``gemm_ceiling.source`` says which): no
row is above 100% of it.

Threads: numpy's BLAS and torch use ``--threads`` (default: the cores this process may use);
``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS`` and ``MKL_NUM_THREADS`` are set before numpy is
imported. Other BLAS settings (``OPENBLAS_CORETYPE``, ``OPENBLAS_L2_SIZE``) are left alone and
recorded as found in the JSON's ``env`` entry.

Layout: this script parses the options and runs the rounds; ``_lstm_impls.py`` holds the
implementations being timed (with ``_lstm_seed.py``, the notebook's per-step code),
``_timing.py`` the clock, the ceiling, the rounds and the worker processes, ``_machine.py``
the backend, device, versions and threads, and ``_report.py`` the derived figures and the
markdown, JSON and PNG output.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

from _lstm_impls import BASELINE, IMPLS, N_Y, bench_size, flop_counts
from _machine import (
    Backend,
    blas_kernel,
    cpu_name,
    environment,
    gpu_info,
    load_average,
    set_tf32,
    set_threads,
    tf32_state,
    thread_info,
    versions,
)
from _report import add_rates, markdown_table, set_fractions, write
from _timing import combine_rounds, gemm_ceiling, measure, run_worker

DEFAULT_SIZES = ("256,256,64,50", "512,512,64,25", "64,64,16,50")
QUICK_SIZES = ("8,16,4,5", "16,32,8,6")
#: Named sets of sizes (``--preset``). ``gpu``: the race against cuDNN, (n_x, n_a, m, T):
#: small and large batches at n_a = 256, a large layer, and FlashRNN's shape (768, 768, 16,
#: 1024), where FlashRNN, haste and cuDNN have published times per step on an H100.
PRESETS = {"default": DEFAULT_SIZES, "quick": QUICK_SIZES,
           "gpu": ("256,256,8,100", "256,256,64,100", "1024,1024,64,100", "768,768,16,1024")}


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=("numpy", "cupy", "torch"), default="numpy")
    ap.add_argument("--sizes", nargs="+", default=None, metavar="N_X,N_A,M,T",
                    help="the sizes to time (default: those of --preset)")
    ap.add_argument("--preset", choices=PRESETS, default="default",
                    help="a named set of sizes: " + "; ".join(
                        f"{k}: {' '.join(v)}" for k, v in PRESETS.items()))
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--repeat", type=int, default=7, help="timed runs per measurement")
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs before them")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the round of all implementations this often; report the "
                         "median of the rounds (guards the ratios against drifting load)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0))
                    if hasattr(os, "sched_getaffinity") else os.cpu_count())  # fmt: skip
    ap.add_argument("--out", default="benchmarks/out",
                    help="folder for JSON, md, PNG (default benchmarks/out, not tracked; "
                         "--out benchmarks/results replaces the committed results)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, repeat 2: a smoke test")
    ap.add_argument("--in-process", action="store_true",
                    help="time everything in this process (default: a fresh process per "
                         "implementation and size, so that idle BLAS/OpenMP threads of one "
                         "library cannot steal cores from another)")
    ap.add_argument("--baseline", metavar="PATH",
                    help="also time xlstm imported from the source tree PATH (for example a "
                         "git worktree of an older revision), side by side in the same run")
    ap.add_argument("--tf32", choices=("off", "on"), default="off",
                    help="TF32 on both sides (torch's cuDNN and matmul switches, legacy and "
                         "fp32_precision, and CUPY_TF32), for like-for-like GPU rows; "
                         "default off: plain FP32 everywhere")
    ap.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS), metavar="IMPL",
                    help=f"the implementations to time (default all: {' '.join(IMPLS)})")
    ap.add_argument("--worker", choices=(*IMPLS, *BASELINE, "ceiling"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.sizes is None:
        args.sizes = list(PRESETS[args.preset])
    elif args.preset != "default":
        ap.error("give --sizes or --preset, not both")
    try:
        args.sizes = [tuple(int(v) for v in s.split(",")) for s in args.sizes]
    except ValueError:
        args.sizes = None
    if not args.sizes or any(len(s) != 4 or min(s) < 1 for s in args.sizes):
        ap.error("each size must be four positive integers n_x,n_a,m,T_x")
    if args.quick and not args.worker:  # a worker gets its size and counts passed explicitly
        args.repeat, args.warmup = 2, 1
        args.sizes = [tuple(int(v) for v in s.split(",")) for s in QUICK_SIZES]
    if args.baseline is not None:
        if not (Path(args.baseline) / "xlstm" / "__init__.py").is_file():
            ap.error(f"--baseline {args.baseline}: no xlstm package in that folder")
        if args.in_process:
            ap.error("--baseline needs a process per implementation; drop --in-process")
    if args.repeat < 1 or args.warmup < 0 or args.threads < 1 or args.rounds < 1:
        ap.error("--repeat, --rounds and --threads must be at least 1, --warmup at least 0")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    env = environment()  # as found
    set_threads(args.threads)  # before the first numpy import, or the BLAS will not see them
    os.environ["CUPY_TF32"] = "1" if args.tf32 == "on" else "0"  # before cupy is imported
    import numpy as np

    if args.worker in BASELINE:  # this process times the other tree's xlstm
        sys.path.insert(0, str(Path(args.baseline).resolve()))
    import xlstm  # noqa: F401  (imported for its version)

    torch = None
    if args.worker is None or args.worker.startswith("torch") or args.backend == "torch":
        try:
            import torch

            torch.set_num_threads(args.threads)
            set_tf32(torch, args.tf32 == "on")  # every switch torch has; its default is on
        except ImportError:
            torch = None
    try:
        be = Backend(args.backend, args.dtype)
    except ImportError as err:
        sys.exit(f"--backend {args.backend} is not available: {err}")
    if be.gpu and torch is not None and torch.cuda.is_available():
        torch.backends.cudnn.enabled = True
    threads = thread_info(args.threads, torch)
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if var in env:
            print(f"note: {var}={env[var]} is set in the environment (left as is): it forces "
                  "an older OpenBLAS kernel; unset it in the command for figures")
    load = load_average()
    if load and load[0] >= 1:
        print(f"note: load average {load[0]:.2f} before the run: other work skews the timings")

    timed = lambda fn: measure(fn, be.sync, args.repeat, args.warmup)
    rng = np.random.default_rng(1234)
    if args.worker:  # one measurement for the parent process, as a JSON line
        if args.worker == "ceiling":
            out = gemm_ceiling(be, rng, 256 if args.quick else 2048, timed)
        else:
            out = bench_size(be, torch, args.sizes[0], rng, timed, only=(args.worker,))
        print(json.dumps({"result": out, "versions": versions()}, default=str))
        return
    isolate = not args.in_process

    def run(worker, size=None):
        if not isolate:
            if worker == "ceiling":
                return gemm_ceiling(be, rng, 256 if args.quick else 2048, timed)
            return bench_size(be, torch, size, rng, timed, only=tuple(args.impls))
        return run_worker(Path(__file__).resolve(), args, worker, size, report["versions"])

    report = {"versions": versions()}
    ceiling = run("ceiling")
    print(f"{be.device_name} | {args.backend} {args.dtype} | {args.threads} threads "
          f"(torch {threads['torch']}) | BLAS {blas_kernel(threads)} | GEMM ceiling "
          f"{ceiling['gflops']:.1f} GFLOP/s ({ceiling['n']}^3)\n")  # fmt: skip
    report = {
        "isolated": isolate, "backend": args.backend, "dtype": args.dtype, "device": be.device_name,
        "gpu": be.gpu, "cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads,
        "blas": blas_kernel(threads), "tf32": tf32_state(torch),
        "n_y": N_Y, "repeat": args.repeat, "warmup": args.warmup, "rounds": args.rounds,
        "sizes": [list(s) for s in args.sizes], "versions": report["versions"], "env": env,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_before": load, "gemm_ceiling": ceiling, "results": [],
    }  # fmt: skip
    if be.gpu:  # the device as torch names it, and the cuDNN that torch's rows run on
        info = gpu_info(torch)
        report["torch_device"] = info.get("torch_device")
        report["versions"]["cudnn"] = info.get("cudnn")
    tables = []
    for size in args.sizes:
        rounds = []
        for _ in range(args.rounds):  # round-robin, so that drift in the machine's load
            if isolate:  # touches every implementation alike
                res = {}
                for impl in (*args.impls, *(BASELINE if args.baseline else ())):
                    res.update(run(impl, size))
            else:
                res = run(None, size)
            rounds.append(res)
        res = combine_rounds(rounds)
        flops = flop_counts(*size)
        add_rates(res, flops, ceiling)
        report["results"].append({"size": list(size), "flops": flops, "results": res})
        tables.append(markdown_table(report["results"][-1]))
        print(tables[-1])

    if ceiling["source"] != f"{ceiling['n']}^3 GEMM":  # raised by a faster row
        print(f"note: the ceiling is {ceiling['gflops']:.1f} GFLOP/s, reached by "
              f"{ceiling['source']}; the tables written use it")
        for entry in report["results"]:
            set_fractions(entry["results"], ceiling)
        tables = [markdown_table(entry) for entry in report["results"]]
    report["loadavg_after"] = os.getloadavg() if load else None
    written = write(report, tables, args.out, chart=not args.no_plot)
    print("wrote " + ", ".join(written))


if __name__ == "__main__":
    main()
