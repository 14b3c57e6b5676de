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
* torch.nn.LSTM: time-major input ``(T_x, m, n_x)``; input and ``h0`` require gradients, so
  ``out.backward(da)`` computes the same gradients. Forward alone runs under
  ``torch.inference_mode``. CPU on CPU backends, cuDNN on a GPU. LSTM core only: xlstm and
  the seed also compute the softmax prediction.
* GEMMs only: the workload's matrix products alone, at their real shapes, on ``--backend``:
  ``(T m, n_x) @ (n_x, 4 n_a)``, ``(T m, n_a) @ (n_a, n_y)`` and ``T`` times
  ``(m, n_a) @ (n_a, 4 n_a)`` forward; ``T`` times ``(m, 4 n_a) @ (4 n_a, n_a)``,
  ``(4 n_a, T m) @ (T m, n_a + n_x)`` and ``(T m, 4 n_a) @ (4 n_a, n_x)`` backward.

Each time is the median of ``--repeat`` runs after ``--warmup`` untimed ones, with the garbage
collector paused; on a GPU the device is synchronised before the clock starts and stops. Each
implementation and size, and the ceiling, run in a fresh process (``--in-process`` turns this
off): torch's OpenMP threads keep spinning after a call and would slow numpy's BLAS down.
``--rounds N`` runs the whole round of implementations N times in turn and reports the median
of the rounds, so that a change in the machine's load during the run biases no ratio.
Flops: forward ``2 T m 4 n_a (n_a + n_x) + 2 T m n_y n_a``, backward twice the gate part
(torch is credited with the gate flops only). The ceiling is the GFLOP/s of a square
``2048^3`` GEMM (its fastest run) in ``--dtype`` on ``--backend``, measured in the same run.

Threads: numpy's BLAS and torch use ``--threads`` (default: the cores this process may use);
``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS`` and ``MKL_NUM_THREADS`` are set before numpy is
imported. Other BLAS settings (``OPENBLAS_CORETYPE``, ``OPENBLAS_L2_SIZE``) are left alone and
recorded as found in the JSON's ``env`` entry.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

N_Y = 10
DEFAULT_SIZES = ("256,256,64,50", "512,512,64,25", "64,64,16,50")
QUICK_SIZES = ("8,16,4,5", "16,32,8,6")
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
ENV_VARS = (*THREAD_VARS, "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "XLSTM_ACCEL",
            "CUDA_VISIBLE_DEVICES")  # fmt: skip


# ------------------------------------------------------------------ seed-style baseline
class SeedLSTM:
    """The notebook's LSTM, one step at a time: the "before" baseline.

    ``xp`` is the numpy or cupy module. Everything is float64, as in the notebook: the
    parameters are converted and every buffer comes from ``xp.zeros``.
    """

    def __init__(self, params, xp):
        self.xp = xp
        self.p = {k: xp.asarray(v, dtype=xp.float64) for k, v in params.items()}

    def _sigmoid(self, z):
        return 1 / (1 + self.xp.exp(-z))

    def _softmax(self, z):
        e = self.xp.exp(z - self.xp.max(z))
        return e / e.sum(axis=0)

    def cell_forward(self, xt, a_prev, c_prev):
        np, p = self.xp, self.p
        n_a, (n_x, m) = a_prev.shape[0], xt.shape
        concat = np.zeros((n_a + n_x, m))
        concat[:n_a, :] = a_prev
        concat[n_a:, :] = xt
        ft = self._sigmoid(np.dot(p["Wf"], concat) + p["bf"])
        it = self._sigmoid(np.dot(p["Wi"], concat) + p["bi"])
        cct = np.tanh(np.dot(p["Wc"], concat) + p["bc"])
        c_next = ft * c_prev + it * cct
        ot = self._sigmoid(np.dot(p["Wo"], concat) + p["bo"])
        a_next = ot * np.tanh(c_next)
        yt_pred = self._softmax(np.dot(p["Wy"], a_next) + p["by"])
        cache = (a_next, c_next, a_prev, c_prev, ft, it, cct, ot, xt, p)
        return a_next, c_next, yt_pred, cache

    def forward(self, x, a0):
        np = self.xp
        _, m, T_x = x.shape
        n_y, n_a = self.p["Wy"].shape
        a, c, y = np.zeros((n_a, m, T_x)), np.zeros((n_a, m, T_x)), np.zeros((n_y, m, T_x))
        a_next, c_next = a0, np.zeros((n_a, m))
        caches = []
        for t in range(T_x):
            a_next, c_next, yt, cache = self.cell_forward(x[:, :, t], a_next, c_next)
            a[:, :, t], c[:, :, t], y[:, :, t] = a_next, c_next, yt
            caches.append(cache)
        return a, y, c, (caches, x)

    def cell_backward(self, da_next, dc_next, cache):
        np = self.xp
        a_next, c_next, a_prev, c_prev, ft, it, cct, ot, xt, p = cache
        n_a = a_next.shape[0]
        tc = np.tanh(c_next)
        dtc = ot * (1 - tc**2) * da_next  # into c through a = o tanh(c)
        dot = da_next * tc * ot * (1 - ot)
        dcct = (dc_next * it + dtc * it) * (1 - cct**2)
        dit = (dc_next * cct + dtc * cct) * it * (1 - it)
        dft = (dc_next * c_prev + dtc * c_prev) * ft * (1 - ft)
        concat = np.concatenate((a_prev, xt), axis=0)
        g = {}
        for gate, d in (("f", dft), ("i", dit), ("c", dcct), ("o", dot)):
            g["dW" + gate] = np.dot(d, concat.T)
            g["db" + gate] = np.sum(d, axis=1, keepdims=True)
        parts = [(p["Wf"], dft), (p["Wi"], dit), (p["Wc"], dcct), (p["Wo"], dot)]
        g["da_prev"] = sum(np.dot(W[:, :n_a].T, d) for W, d in parts)
        g["dxt"] = sum(np.dot(W[:, n_a:].T, d) for W, d in parts)
        g["dc_prev"] = dc_next * ft + dtc * ft
        return g

    def backward(self, da, caches):
        np = self.xp
        steps, _ = caches
        (n_x, m), (n_a, _, T_x) = steps[0][8].shape, da.shape
        dx = np.zeros((n_x, m, T_x))
        da_prevt, dc_prevt = np.zeros((n_a, m)), np.zeros((n_a, m))
        grads = {f"d{w}{g}": np.zeros((n_a, n_a + n_x) if w == "W" else (n_a, 1))
                 for w in "Wb" for g in "fico"}  # fmt: skip
        for t in reversed(range(T_x)):
            g = self.cell_backward(da[:, :, t] + da_prevt, dc_prevt, steps[t])
            da_prevt, dc_prevt = g["da_prev"], g["dc_prev"]
            dx[:, :, t] = g["dxt"]
            for k in grads:
                grads[k] += g[k]
        return {"dx": dx, "da0": da_prevt, **grads, "dc0": dc_prevt}


# ------------------------------------------------------------------------ environment
class Backend:
    """The array library of ``--backend``: namespace, device, host transfers and sync."""

    def __init__(self, name, dtype):
        import array_api_compat

        self.name, self.dtype_name, self.gpu, self.device = name, dtype, False, None
        self.sync, self.device_name = lambda: None, cpu_name()
        if name == "cupy":
            import cupy as mod

            self.gpu, self.sync = True, lambda: mod.cuda.Device().synchronize()
            self.device_name = mod.cuda.runtime.getDeviceProperties(0)["name"].decode()
        elif name == "torch":
            import torch as mod

            if mod.cuda.is_available():
                self.gpu, self.device, self.sync = True, "cuda", mod.cuda.synchronize
                self.device_name = mod.cuda.get_device_name(0)
        else:
            import numpy as mod
        self.mod = mod
        self.xp = array_api_compat.array_namespace(mod.empty(0))
        self.dtype = getattr(self.xp, dtype)

    def asarray(self, host):
        return self.xp.asarray(host.astype(self.dtype_name), device=self.device)

    @staticmethod
    def to_host(arr):
        import numpy as np

        if hasattr(arr, "detach"):
            return arr.detach().cpu().numpy()
        return arr.get() if hasattr(arr, "get") else np.asarray(arr)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def versions():
    """Versions of Python and of the libraries this run imported."""
    out = {"python": platform.python_version()}
    for mod in ("numpy", "xlstm", "array_api_compat", "numba", "torch", "cupy", "matplotlib"):
        if mod in sys.modules:
            out[mod] = getattr(sys.modules[mod], "__version__", "unknown")
    return out


# --------------------------------------------------------------------------- timing
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


def flop_counts(n_x, n_a, m, T):
    gates, out = 2 * T * m * 4 * n_a * (n_a + n_x), 2 * T * m * N_Y * n_a
    return {"fwd": gates + out, "fwd_bwd": 3 * gates + out,
            "core_fwd": gates, "core_fwd_bwd": 3 * gates}  # fmt: skip


def gemm_ceiling(be, rng, n, timed):
    """GFLOP/s of a square ``n^3`` GEMM from its fastest run: the machine's best, not its
    typical, so that no implementation's share of it is flattered by a noisy median."""
    A, B = be.asarray(rng.standard_normal((n, n))), be.asarray(rng.standard_normal((n, n)))
    t = timed(lambda: A @ B)
    return {"n": n, **t, "gflops": 2 * n**3 / (t["min_ms"] * 1e6)}


IMPLS = ("xlstm", "xlstm-plain", "seed", "torch", "gemm")


def accelerator(be):
    """The label of xlstm's accelerator on this backend and dtype, or None without one."""
    from xlstm import _engine

    return getattr(_engine.accelerated_loops(be.xp, be.dtype), "label", None)


def bench_size(be, torch, size, rng, timed, only=IMPLS):
    """Time the implementations in ``only`` at one size; returns ``{key: result dict}``."""
    import numpy as np

    import xlstm

    n_x, n_a, m, T = size
    x_h, a0_h, da_h = (0.1 * rng.standard_normal(s) for s in ((n_x, m, T), (n_a, m), (n_a, m, T)))
    params = xlstm.init_params(n_x, n_a, N_Y, xp=be.xp, dtype=be.dtype, device=be.device, seed=0)
    p_h = {k: be.to_host(v) for k, v in params.items()}
    x, a0, da = be.asarray(x_h), be.asarray(a0_h), be.asarray(da_h)
    a_ref = be.to_host(xlstm.lstm_forward(x, a0, params, return_caches=False)[0])
    diff = lambda a: float(np.max(np.abs(be.to_host(a) - a_ref)))
    res = {}

    def xl_fwd_bwd():
        return xlstm.lstm_backward(da, xlstm.lstm_forward(x, a0, params)[3])

    def xl_result(label):
        return {"label": f"xlstm ({be.name}{', GPU' if be.gpu else ''}{label})",
                "fwd": timed(lambda: xlstm.lstm_forward(x, a0, params, return_caches=False)),
                "fwd_bwd": timed(xl_fwd_bwd)}  # fmt: skip

    accel = accelerator(be)
    if "xlstm" in only:
        res["xlstm"] = xl_result(f", {accel}" if accel else "")
    if "xlstm-plain" in only and accel:  # the same calls on the array path, for the gain
        with xlstm.accelerators(False):
            res["xlstm-plain"] = xl_result(", array path")

    seed_mod = be.mod if be.name == "cupy" else None if be.gpu else np
    if seed_mod is not None and "seed" in only:
        seed = SeedLSTM(p_h, seed_mod)
        sx, sa0, sda = (seed_mod.asarray(v) for v in (x_h, a0_h, da_h))
        res["seed"] = {"label": f"seed-style ({seed_mod.__name__}, float64, per step)",
                       "fwd": timed(lambda: seed.forward(sx, sa0)),
                       "fwd_bwd": timed(lambda: seed.backward(sda, seed.forward(sx, sa0)[3])),
                       "check_max_abs_diff_a": diff(seed.forward(sx, sa0)[0])}  # fmt: skip

    if "torch" in only and torch is not None and (not be.gpu or torch.cuda.is_available()):
        res["torch"] = bench_torch(torch, be.gpu, be.dtype_name, p_h, x_h, a0_h, da_h, timed)
        res["torch"]["check_max_abs_diff_a"] = diff(res["torch"].pop("a"))

    if "gemm" not in only:
        return res
    r = lambda *shape: be.asarray(rng.standard_normal(shape))
    X, WxT, A, WaT, AS, WyT = (r(T * m, n_x), r(n_x, 4 * n_a), r(m, n_a), r(n_a, 4 * n_a),
                               r(T * m, n_a), r(n_a, N_Y))  # fmt: skip
    dG1, Wa, dGT, H, dG, Wx = (r(m, 4 * n_a), r(4 * n_a, n_a), r(4 * n_a, T * m),
                               r(T * m, n_a + n_x), r(T * m, 4 * n_a), r(4 * n_a, n_x))  # fmt: skip

    def gemm_fwd():
        return [X @ WxT, AS @ WyT] + [A @ WaT for _ in range(T)]

    def gemm_fwd_bwd():
        return gemm_fwd() + [dGT @ H, dG @ Wx] + [dG1 @ Wa for _ in range(T)]

    res["gemm"] = {"label": f"GEMMs only ({be.name}, same shapes)",
                   "fwd": timed(gemm_fwd), "fwd_bwd": timed(gemm_fwd_bwd)}  # fmt: skip
    return res


def bench_torch(torch, gpu, dtype, p, x_h, a0_h, da_h, timed):
    """torch.nn.LSTM with the same parameters, inputs and upstream gradient."""
    import numpy as np

    n_x, n_a = x_h.shape[0], a0_h.shape[0]
    dev, tdt = ("cuda" if gpu else "cpu"), getattr(torch, dtype)
    tt = lambda arr: torch.tensor(arr, dtype=tdt, device=dev)
    lstm = torch.nn.LSTM(n_x, n_a).to(device=dev, dtype=tdt)
    W = np.concatenate([p["Wi"], p["Wf"], p["Wc"], p["Wo"]])  # torch's gate order: i, f, g, o
    b = np.concatenate([p["bi"], p["bf"], p["bc"], p["bo"]])[:, 0]
    with torch.no_grad():
        lstm.weight_hh_l0.copy_(tt(W[:, :n_a]))
        lstm.weight_ih_l0.copy_(tt(W[:, n_a:]))
        lstm.bias_ih_l0.copy_(tt(b))
        lstm.bias_hh_l0.zero_()
    x = tt(x_h.transpose(2, 1, 0)).requires_grad_()
    h0 = tt(a0_h.T[None]).requires_grad_()
    c0 = torch.zeros_like(h0)
    grad = tt(da_h.transpose(2, 1, 0))

    def fwd():
        with torch.inference_mode():
            return lstm(x, (h0, c0))[0]

    def fwd_bwd():
        lstm.zero_grad(set_to_none=True)
        x.grad = h0.grad = None
        lstm(x, (h0, c0))[0].backward(grad)

    where = "cuDNN" if gpu else f"CPU, {torch.get_num_threads()} threads"
    return {"label": f"torch.nn.LSTM ({where}, LSTM core only)", "fwd": timed(fwd),
            "fwd_bwd": timed(fwd_bwd), "a": fwd().permute(2, 1, 0)}  # fmt: skip


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


def add_rates(res, flops, ceiling):
    """GFLOP/s, fraction of the GEMM ceiling and speed ratios vs torch and vs the seed."""
    for key, r in res.items():
        f = {ph: flops[("core_" if key == "torch" else "") + ph] for ph in ("fwd", "fwd_bwd")}
        for ph in ("fwd", "fwd_bwd"):
            r[f"gflops_{ph}"] = f[ph] / (r[ph]["median_ms"] * 1e6)
            r[f"ceiling_fraction_{ph}"] = r[f"gflops_{ph}"] / ceiling
            for ref in ("torch", "seed"):  # reference time / this time: > 1 is faster
                if ref in res:
                    ratio = res[ref][ph]["median_ms"] / r[ph]["median_ms"]
                    r.setdefault(f"speedup_vs_{ref}", {})[ph] = ratio


# --------------------------------------------------------------------------- reports
def markdown_table(entry):
    n_x, n_a, m, T = entry["size"]
    fl = entry["flops"]
    lines = [(f"### n_x={n_x}, n_a={n_a}, m={m}, T_x={T}, n_y={N_Y}: "
              f"{fl['fwd'] / 1e9:.3g} GFLOP forward, {fl['fwd_bwd'] / 1e9:.3g} GFLOP fwd+bwd"), "",
             ("| implementation | fwd ms | fwd+bwd ms | vs torch fwd | vs torch f+b | vs seed fwd "
              "| vs seed f+b | GFLOP/s fwd | GFLOP/s f+b | % ceiling f+b |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in entry["results"].values():
        cells = [r["label"], f"{r['fwd']['median_ms']:.3f}", f"{r['fwd_bwd']['median_ms']:.3f}"]
        for ref in ("torch", "seed"):
            sp = r.get(f"speedup_vs_{ref}")
            cells += [f"{sp[ph]:.2f}x" if sp else "n/a" for ph in ("fwd", "fwd_bwd")]
        cells += [f"{r['gflops_fwd']:.1f}", f"{r['gflops_fwd_bwd']:.1f}",
                  f"{100 * r['ceiling_fraction_fwd_bwd']:.1f}%"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    checks = [f"{k} {r['check_max_abs_diff_a']:.1e}" for k, r in entry["results"].items()
              if "check_max_abs_diff_a" in r]  # fmt: skip
    if checks:
        lines += ["", "max |a - a_xlstm| (same parameters and inputs): " + ", ".join(checks)]
    return "\n".join(lines) + "\n"


def plot(report, path):
    """Grouped bar chart of fwd+bwd time per size; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart")
        return False
    entries = report["results"]
    labels = {k: r["label"] for e in entries for k, r in e["results"].items()}
    fig, ax = plt.subplots(figsize=(max(5, 2 * len(entries)), 4.5))
    width = 0.8 / len(labels)
    for j, (key, label) in enumerate(labels.items()):
        xs = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(entries))]
        ys = [e["results"][key]["fwd_bwd"]["median_ms"] if key in e["results"] else 0
              for e in entries]  # fmt: skip
        ax.bar(xs, ys, width, label=label)
    ax.set_yscale("log")
    ax.set_xticks(range(len(entries)), [",".join(map(str, e["size"])) for e in entries])
    ax.set_xlabel("size n_x,n_a,m,T_x")
    ax.set_ylabel("forward+backward ms (median, log scale)")
    ax.set_title(f"LSTM forward+backward, {report['dtype']}, {report['device']}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def run_worker(args, worker, size, versions_seen):
    """Run one measurement in a fresh interpreter and return its result dict."""
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", worker,
           "--backend", args.backend, "--dtype", args.dtype, "--repeat", str(args.repeat),
           "--warmup", str(args.warmup), "--threads", str(args.threads)]  # fmt: skip
    if args.quick:
        cmd.append("--quick")
    if size is not None:
        cmd += ["--sizes", ",".join(map(str, size))]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {worker} {size} failed:\n{done.stderr[-4000:]}")
    line = json.loads(done.stdout.strip().splitlines()[-1])
    versions_seen.update(line["versions"])
    return line["result"]


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=("numpy", "cupy", "torch"), default="numpy")
    ap.add_argument("--sizes", nargs="+", default=list(DEFAULT_SIZES), metavar="N_X,N_A,M,T")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--repeat", type=int, default=7, help="timed runs per measurement")
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs before them")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the round of all implementations this often; report the "
                         "median of the rounds (guards the ratios against drifting load)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0))
                    if hasattr(os, "sched_getaffinity") else os.cpu_count())  # fmt: skip
    ap.add_argument("--out", default="benchmarks/results", help="folder for JSON, md, PNG")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, repeat 2: a smoke test")
    ap.add_argument("--in-process", action="store_true",
                    help="time everything in this process (default: a fresh process per "
                         "implementation and size, so that idle BLAS/OpenMP threads of one "
                         "library cannot steal cores from another)")
    ap.add_argument("--worker", choices=(*IMPLS, "ceiling"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        args.sizes = [tuple(int(v) for v in s.split(",")) for s in args.sizes]
    except ValueError:
        args.sizes = None
    if not args.sizes or any(len(s) != 4 or min(s) < 1 for s in args.sizes):
        ap.error("each size must be four positive integers n_x,n_a,m,T_x")
    if args.quick and not args.worker:  # a worker gets its size and counts passed explicitly
        args.repeat, args.warmup = 2, 1
        args.sizes = [tuple(int(v) for v in s.split(",")) for s in QUICK_SIZES]
    if args.repeat < 1 or args.warmup < 0 or args.threads < 1 or args.rounds < 1:
        ap.error("--repeat, --rounds and --threads must be at least 1, --warmup at least 0")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    env = {k: os.environ[k] for k in ENV_VARS if k in os.environ}  # as found
    for var in THREAD_VARS:  # before the first numpy import, or the BLAS will not see them
        os.environ[var] = str(args.threads)
    import numpy as np

    import xlstm  # noqa: F401  (imported for its version)

    torch = None
    if args.worker in (None, "torch") or args.backend == "torch":
        try:
            import torch

            torch.set_num_threads(args.threads)
        except ImportError:
            torch = None
    try:
        be = Backend(args.backend, args.dtype)
    except ImportError as err:
        sys.exit(f"--backend {args.backend} is not available: {err}")
    if be.gpu and torch is not None and torch.cuda.is_available():
        torch.backends.cudnn.enabled = True
    threads = {"requested": args.threads, "blas_env": args.threads,
               "torch": torch.get_num_threads() if torch is not None else None}  # fmt: skip
    try:
        from threadpoolctl import threadpool_info

        threads["threadpoolctl"] = [  # without file paths, which name this machine
            {k: v for k, v in lib.items() if k != "filepath"} for lib in threadpool_info()
        ]
    except ImportError:
        pass
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if var in env:
            print(f"note: {var}={env[var]} is set in the environment (left as is)")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
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
            return bench_size(be, torch, size, rng, timed)
        return run_worker(args, worker, size, report["versions"])

    report = {"versions": versions()}
    ceiling = run("ceiling")
    print(f"{be.device_name} | {args.backend} {args.dtype} | {args.threads} threads "
          f"(torch {threads['torch']}) | GEMM ceiling {ceiling['gflops']:.1f} GFLOP/s "
          f"({ceiling['n']}^3)\n")  # fmt: skip
    report = {
        "isolated": isolate, "backend": args.backend, "dtype": args.dtype, "device": be.device_name,
        "gpu": be.gpu, "cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads,
        "n_y": N_Y, "repeat": args.repeat, "warmup": args.warmup, "rounds": args.rounds,
        "sizes": [list(s) for s in args.sizes], "versions": report["versions"], "env": env,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_before": load, "gemm_ceiling": ceiling, "results": [],
    }  # fmt: skip
    if be.gpu and torch is not None and torch.cuda.is_available():
        report["versions"]["cudnn"] = torch.backends.cudnn.version()
    tables = []
    for size in args.sizes:
        rounds = []
        for _ in range(args.rounds):  # round-robin, so that drift in the machine's load
            if isolate:  # touches every implementation alike
                res = {}
                for impl in IMPLS:
                    res.update(run(impl, size))
            else:
                res = run(None, size)
            rounds.append(res)
        res = combine_rounds(rounds)
        flops = flop_counts(*size)
        add_rates(res, flops, ceiling["gflops"])
        report["results"].append({"size": list(size), "flops": flops, "results": res})
        tables.append(markdown_table(report["results"][-1]))
        print(tables[-1])

    report["loadavg_after"] = os.getloadavg() if load else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"bench_{args.backend}_{args.dtype}_{slug(be.device_name)}"
    written = [f"{base}.json", f"{base}.md"]
    if not args.no_plot and plot(report, f"{base}.png"):
        written.append(f"{base}.png")
        report["versions"].update(versions())  # now with matplotlib
    head = (f"# LSTM benchmark: {args.backend}, {args.dtype}, {be.device_name}\n\n"
            f"{report['timestamp']}; {args.threads} threads (torch {threads['torch']}); "
            f"GEMM ceiling {ceiling['gflops']:.1f} GFLOP/s ({ceiling['n']}^3); median of "
            f"{args.repeat} runs after {args.warmup} warm-ups (median of {args.rounds} "
            f"round-robin rounds); versions {report['versions']}; "
            f"env {env}.\n\nn_y = {N_Y}: xlstm and the seed also compute the softmax "
            "prediction, torch.nn.LSTM the LSTM core only. 'vs X' = X's time / this time "
            "(> 1: faster than X). The seed works in float64 whatever the dtype, as the "
            "notebook does. % ceiling: fwd+bwd GFLOP/s over the square-GEMM GFLOP/s.\n\n")
    Path(f"{base}.md").write_text(head + "\n".join(tables))
    Path(f"{base}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    print("wrote " + ", ".join(written))


if __name__ == "__main__":
    main()
