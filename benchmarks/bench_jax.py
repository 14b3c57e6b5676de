"""JAX under ``jax.jit``: compile and run times of the time loop, and the autodiff wrappers.

Usage: ``python benchmarks/bench_jax.py [--quick] [--json FILE]`` (``--help`` lists the
options). Prints two tables; writes JSON only with ``--json``.

1. Compile time against ``T``. ``jax.jit`` of the forward pass (``lstm_forward`` with
   ``return_caches=False``) and of forward+backward (``lstm_forward`` then
   ``lstm_backward``), with ``x``, ``a0`` and ``da`` closed over and the parameters as the
   argument, at ``n_x = n_a = --n``, ``m = --m``, ``n_y = 10``, float64, for each ``--T``:

   * ``plain loop`` (``XLSTM_ACCEL=0``): the Python time loop, which ``jit`` unrolls into
     ``T`` copies of the step (the code path every JAX call took before ``lax.scan``);
   * ``lax.scan`` (the default on JAX): one compiled loop body.

   ``trace`` is ``jax.jit(f).lower(params)`` (tracing and lowering), ``compile`` is
   ``.compile()`` of that, ``run`` the median of ``--repeat`` calls of the compiled function
   after one untimed call.

2. Autodiff. ``jax.jit(jax.grad(loss))`` with ``loss = sum(a * w)`` over the parameters
   and ``x``, for ``a`` from :func:`xlstm.autodiff.lstm` (``custom_vjp``: the backward is
   ``lstm_backward``) and from ``lstm_forward`` (JAX differentiates the forward pass); the
   same on torch (CPU, float64): ``backward()`` through the ``torch.autograd.Function`` and
   through ``lstm_forward``, with ``--torch-threads`` threads (default 1). Forward and
   backward together, median of ``--repeat`` runs; for JAX also the first call, which
   traces and compiles.

Every measurement runs in a fresh process, so that no compiled program is reused from an
earlier one; the parent records its peak resident memory, and stops it (and says so in the
table) past ``--timeout`` seconds or ``--max-rss-gb`` GiB: compiling the unrolled plain loop
of forward+backward at ``T = 1000`` takes minutes and more than 14 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

N_Y = 10
AD_SIZES = ("32,32,8,100", "128,128,32,100", "32,32,8,1000")


def _case(xp, n, m, T, *, n_x=None, seed=0):
    import numpy as np

    import xlstm

    rng = np.random.default_rng(seed)
    n_x = n if n_x is None else n_x
    p = {k: xp.asarray(v) for k, v in xlstm.init_params(n_x, n, N_Y, seed=seed).items()}
    x = xp.asarray(0.1 * rng.standard_normal((n_x, m, T)))
    a0 = xp.asarray(0.1 * rng.standard_normal((n, m)))
    da = xp.asarray(0.1 * rng.standard_normal((n, m, T)))
    return p, x, a0, da


def _median_time(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def worker_compile(job):
    """One (path, what, T) compile measurement; ``XLSTM_ACCEL`` is set by the parent."""
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    import xlstm

    p, x, a0, da = _case(jnp, job["n"], job["m"], job["T"])
    if job["what"] == "fwd":
        def f(p):
            return xlstm.lstm_forward(x, a0, p, return_caches=False)[0]
    else:
        def f(p):
            return xlstm.lstm_backward(da, xlstm.lstm_forward(x, a0, p)[3])

    t0 = time.perf_counter()
    lowered = jax.jit(f).lower(p)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    run = _median_time(lambda: jax.block_until_ready(compiled(p)), job["repeat"])
    return {"trace_s": t1 - t0, "compile_s": t2 - t1, "run_s": run}


def worker_autodiff(job):
    """One (framework, method, size) forward+backward measurement."""
    n_x, n, m, T = job["size"]
    if job["framework"] == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp
        from xlstm.autodiff import lstm

        import xlstm

        p, x, a0, w = _case(jnp, n, m, T, n_x=n_x)
        forward = lstm if job["method"] == "custom_vjp" else (
            lambda x, a0, p: xlstm.lstm_forward(x, a0, p, return_caches=False)[0])

        def loss(p, x):
            return jnp.sum(forward(x, a0, p) * w)

        g = jax.jit(jax.grad(loss, argnums=(0, 1)))
        t0 = time.perf_counter()
        jax.block_until_ready(g(p, x))
        first = time.perf_counter() - t0
        run = _median_time(lambda: jax.block_until_ready(g(p, x)), job["repeat"])
        return {"first_call_s": first, "run_s": run}
    import torch
    from xlstm.autodiff import lstm

    import xlstm

    torch.set_num_threads(job["torch_threads"])
    p, x, a0, w = _case(torch, n, m, T, n_x=n_x)
    forward = lstm if job["method"] == "Function" else (
        lambda x, a0, p: xlstm.lstm_forward(x, a0, p, return_caches=False)[0])
    leaves = [x, *p.values()]

    def step():
        for t in leaves:
            t.grad = None
            t.requires_grad_(True)
        (forward(x, a0, p) * w).sum().backward()

    return {"run_s": _median_time(step, job["repeat"])}


def _rss_gb(pid):
    """Resident memory of process ``pid`` in GiB (Linux), or 0.0 where unknown."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def _spawn(job, accel="1", timeout=None, max_rss_gb=None):
    """Run one measurement in a fresh process.

    Returns its result, or ``{"stopped": why}`` when it ran past ``timeout`` seconds or its
    resident memory passed ``max_rss_gb`` GiB (the plain loop's compile at large ``T``).
    """
    env = dict(os.environ, XLSTM_ACCEL=accel)
    proc = subprocess.Popen(
        [sys.executable, __file__, "--worker", json.dumps(job)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    t0, peak, why = time.perf_counter(), 0.0, None
    while proc.poll() is None:
        time.sleep(0.2)
        peak = max(peak, _rss_gb(proc.pid))
        elapsed = time.perf_counter() - t0
        if timeout is not None and elapsed > timeout:
            why = f"over {timeout:g} s"
        elif max_rss_gb is not None and peak > max_rss_gb:
            why = f"over {max_rss_gb:g} GiB after {elapsed:.0f} s"
        if why:
            proc.kill()
            proc.communicate()
            return {"stopped": why}
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"worker {job} failed:\n{err[-3000:]}")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_rss_gb": peak}


def _versions():
    out = {"python": platform.python_version(), "machine": platform.machine(),
           "processor": platform.processor(), "cpus": len(os.sched_getaffinity(0))}
    for mod in ("jax", "jaxlib", "torch", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    try:
        out["load_average"] = os.getloadavg()
    except OSError:
        pass
    return out


def _table(head, rows):
    widths = [max(len(str(r[i])) for r in (head, *rows)) for i in range(len(head))]
    for r in (head, tuple("-" * w for w in widths), *rows):
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", type=int, nargs="+", default=[10, 100, 1000],
                    help="sequence lengths of the compile-time table")
    ap.add_argument("--n", type=int, default=32, help="n_x = n_a of the compile-time table")
    ap.add_argument("--m", type=int, default=8, help="batch size of the compile-time table")
    ap.add_argument("--what", nargs="+", choices=("fwd", "fwd+bwd"), default=["fwd", "fwd+bwd"])
    ap.add_argument("--sizes", nargs="+", default=list(AD_SIZES), metavar="N_X,N_A,M,T",
                    help="sizes of the autodiff table")
    ap.add_argument("--repeat", type=int, default=7, help="timed runs per measurement")
    ap.add_argument("--timeout", type=float, default=600.0,
                    help="seconds after which a measurement is stopped and reported as such")
    ap.add_argument("--max-rss-gb", type=float, default=6.0,
                    help="GiB of resident memory at which a measurement is stopped and "
                         "reported as such (the plain loop's compile at T=1000 needs more "
                         "than 14)")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch rows")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch.set_num_threads for the torch rows (default 1: tiny per-step "
                         "operations gain nothing from more, and idle threads spin)")
    ap.add_argument("--quick", action="store_true", help="small sizes, 2 repeats: a smoke test")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        fn = worker_compile if job["kind"] == "compile" else worker_autodiff
        print(json.dumps(fn(job)))
        return 0
    if args.quick:
        args.T, args.sizes, args.repeat = [5, 20], ["8,8,4,10"], 2

    report = {"env": _versions(), "compile": [], "autodiff": []}
    print(f"== jax.jit compile and run times, n_x = n_a = {args.n}, m = {args.m}, float64")
    rows = []
    for what in args.what:
        for T in args.T:
            for label, accel in (("plain loop", "0"), ("lax.scan", "1")):
                job = {"kind": "compile", "what": what, "T": T, "n": args.n, "m": args.m,
                       "repeat": args.repeat}
                r = {"what": what, "T": T, "path": label,
                     **_spawn(job, accel, args.timeout, args.max_rss_gb)}
                report["compile"].append(r)
                if "stopped" in r:
                    rows.append((what, T, label, "-", f"stopped: {r['stopped']}", "-", "-"))
                else:
                    rows.append((what, T, label, f"{r['trace_s']:.2f}", f"{r['compile_s']:.2f}",
                                 f"{1e3 * r['run_s']:.2f}", f"{r['peak_rss_gb']:.2f}"))
                print(*rows[-1], sep="  ", flush=True)
    print()
    _table(("what", "T", "loop", "trace s", "compile s", "run ms", "peak GiB"), rows)

    print("\n== forward+backward: the hand-written backward against autodiff, float64")
    rows = []
    for size in args.sizes:
        dims = tuple(int(v) for v in size.split(","))
        methods = [("jax", "custom_vjp"), ("jax", "grad of forward")]
        if not args.no_torch:
            methods += [("torch", "Function"), ("torch", "autograd of forward")]
        for framework, method in methods:
            job = {"kind": "autodiff", "framework": framework, "method": method,
                   "size": dims, "repeat": args.repeat, "torch_threads": args.torch_threads}
            r = {"size": size, "framework": framework, "method": method,
                 **_spawn(job, timeout=args.timeout, max_rss_gb=args.max_rss_gb)}
            if "stopped" in r:
                rows.append((size, framework, method, "-", f"stopped: {r['stopped']}"))
                print(*rows[-1], sep="  ", flush=True)
                report["autodiff"].append(r)
                continue
            report["autodiff"].append(r)
            first = f"{r['first_call_s']:.2f}" if "first_call_s" in r else "-"
            rows.append((size, framework, method, first, f"{1e3 * r['run_s']:.2f}"))
            print(*rows[-1], sep="  ", flush=True)
    print()
    _table(("n_x,n_a,m,T", "framework", "gradient", "first call s", "run ms"), rows)
    print(f"\n{report['env']}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=1)
            fh.write("\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
