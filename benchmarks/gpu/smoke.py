"""GPU smoke for xlstm: CuPy (persistent and per-step kernels), torch-CUDA (fused kernels
through DLPack, and the array path) and JAX-GPU inputs against numpy float64; the MLSTM
chunkwise form on CuPy; then per-step slopes (t(T=200) - t(T=100)) / 100 for xlstm and cuDNN.
One line per check, FAIL on a miss."""
import sys
import time
import traceback

import numpy as np

import xlstm
from xlstm.accel import cuda as _cuda

BAD = []


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def check(name, err, tol):
    ok = bool(np.isfinite(err)) and err <= tol
    print(f"{'ok  ' if ok else 'FAIL'} {name}: rel err {err:.1e} (tol {tol:.0e})", flush=True)
    if not ok:
        BAD.append(name)


def section(fn):
    try:
        fn()
    except Exception:  # noqa: BLE001 - report and go on with the next section
        BAD.append(fn.__name__)
        print(f"FAIL {fn.__name__}:\n{traceback.format_exc(limit=6)}", flush=True)


rng = np.random.default_rng(0)
n_x, n_a, n_y, m, T = 32, 64, 10, 8, 40
P = xlstm.init_params(n_x, n_a, n_y, seed=0)
X, A0, DA = rng.standard_normal((n_x, m, T)), 0.5 * rng.standard_normal((n_a, m)), rng.standard_normal((n_a, m, T))
with xlstm.accelerators(False):
    REF = xlstm.lstm_forward(X, A0, P)
    GREF = xlstm.lstm_backward(DA, REF[3])


def run_lstm(name, conv, host, tol):
    a, y, c, caches = xlstm.lstm_forward(conv(X), conv(A0), {k: conv(v) for k, v in P.items()})
    g = xlstm.lstm_backward(conv(DA), caches)
    check(f"{name} a", rel(host(a), REF[0]), tol)
    check(f"{name} grads (worst)", max(rel(host(g[k]), GREF[k]) for k in GREF), 10 * tol)


def cupy_lstm():
    import cupy as cp
    for dt, tol in (("float32", 1e-5), ("float64", 1e-12)):
        for persistent in (True, False):
            _cuda.Loops.persistent = persistent
            _cuda.Loops.rule = _cuda.PERSISTENT_WHERE_IT_FITS  # every plan that fits runs
            run_lstm(f"cupy {dt} {'persistent' if persistent else 'per-step'}",
                     lambda v, dt=dt: cp.asarray(v, dtype=dt), cp.asnumpy, tol)
    _cuda.Loops.persistent, _cuda.Loops.rule = True, None
    print("  compiled kernels:", sorted({k[:2] + k[3:] for k in _cuda._kernels}), flush=True)


def torch_cuda_lstm():
    import array_api_compat
    import torch

    from xlstm.accel import registry as _accel
    from xlstm.cells import CELLS
    tx = array_api_compat.array_namespace(torch.empty(0))
    loops = _accel.accelerated_loops(tx, torch.float32, CELLS["lstm"], device=torch.device("cuda", 0))
    print(f"  torch-cuda loops: {getattr(loops, 'label', None)}", flush=True)
    if not isinstance(loops, _accel.DLPackLoops):
        BAD.append("torch-cuda does not reach the fused kernels")
    for dt, tol in (("float32", 1e-5), ("float64", 1e-12)):
        conv = lambda v, dt=dt: torch.tensor(v, dtype=getattr(torch, dt), device="cuda")  # noqa: E731
        run_lstm(f"torch-cuda {dt} fused (DLPack)", conv, lambda t: t.detach().cpu().numpy(), tol)
        with xlstm.accelerators(False):
            run_lstm(f"torch-cuda {dt} array path", conv, lambda t: t.detach().cpu().numpy(), tol)


def jax_gpu_lstm():
    import jax
    jax.config.update("jax_enable_x64", True)
    gpu = jax.devices("gpu")[0]
    conv = lambda v: jax.device_put(np.asarray(v, np.float32), gpu)  # noqa: E731
    a = xlstm.lstm_forward(conv(X), conv(A0), {k: conv(v) for k, v in P.items()})[0]
    print(f"info jax-gpu float32 default matmul precision: rel err {rel(np.asarray(a), REF[0]):.1e}"
          f" (TF32 shows as ~1e-3), device {list(a.devices())[0]}", flush=True)
    with jax.default_matmul_precision("highest"):
        run_lstm("jax-gpu float32 (highest)", conv, np.asarray, 1e-5)


def cupy_mlstm():
    import cupy as cp
    x = rng.standard_normal((16, 4, 150))
    ys = []
    for xp in (None, cp):
        model = xlstm.MLSTM(16, 32, num_heads=2, seed=1, xp=xp, dtype="float64", chunk=64)
        xin = x if xp is None else cp.asarray(x)
        y, _, cache = model.forward(xin, form="chunkwise")
        dy = np.ones((32, 4, 150)) if xp is None else cp.ones((32, 4, 150))
        dx = model.backward(dy, cache)[0]
        ys.append([np.asarray(v.get() if hasattr(v, "get") else v) for v in (y, dx)])
    check("cupy float64 MLSTM chunkwise y", rel(ys[1][0], ys[0][0]), 1e-10)
    check("cupy float64 MLSTM chunkwise dx", rel(ys[1][1], ys[0][1]), 1e-9)


def timed(fn, sync, reps=5):
    fn(); sync()
    out = []
    for _ in range(reps):
        sync(); t0 = time.perf_counter(); fn(); sync(); out.append(time.perf_counter() - t0)
    return float(np.median(out))


def slopes():
    import cupy as cp
    import torch
    # like for like: FP32 on both sides (torch 2.9+ reads fp32_precision; older, the flags)
    if hasattr(torch.backends.cudnn, "rnn") and hasattr(torch.backends.cudnn.rnn, "fp32_precision"):
        torch.backends.cudnn.rnn.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    else:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    sync = cp.cuda.Device().synchronize
    print("per-step slope us = (t(T=200) - t(T=100)) / 100; fixed ms = t(100) - 100 slope")
    for n, mm in ((256, 8), (256, 64), (1024, 64)):
        p = {k: cp.asarray(v, dtype="float32") for k, v in xlstm.init_params(n, n, 10, seed=0).items()}
        lstm = torch.nn.LSTM(n, n).cuda()
        row = []
        for label in ("persistent", "per-step", "cudnn"):
            for phase in ("fwd", "fwd+bwd"):
                t = {}
                for TT in (100, 200):
                    x = rng.standard_normal((n, mm, TT)).astype("float32")
                    if label == "cudnn":
                        lstm.train(phase != "fwd")  # eval + no_grad forward, as the bench
                        xt = torch.tensor(x.transpose(2, 1, 0), device="cuda", requires_grad=True)
                        if phase == "fwd":
                            def f():
                                with torch.no_grad():
                                    lstm(xt)
                        else:
                            def f():
                                lstm(xt)[0].sum().backward()
                    else:
                        _cuda.Loops.persistent = label == "persistent"
                        _cuda.Loops.rule = _cuda.PERSISTENT_WHERE_IT_FITS
                        xc, a0 = cp.asarray(x), cp.zeros((n, mm), "float32")
                        da = cp.ones((n, mm, TT), "float32")
                        if phase == "fwd":
                            f = lambda: xlstm.lstm_forward(xc, a0, p, return_caches=False)  # noqa: E731
                        else:
                            f = lambda: xlstm.lstm_backward(da, xlstm.lstm_forward(xc, a0, p)[3])  # noqa: E731
                    t[TT] = timed(f, sync)
                s = (t[200] - t[100]) / 100
                row.append(f"{label} {phase} {1e6 * s:.1f} us/step + {1e3 * (t[100] - 100 * s):.2f} ms")
        _cuda.Loops.persistent, _cuda.Loops.rule = True, None
        print(f"(n={n}, m={mm}): " + "; ".join(row), flush=True)


if __name__ == "__main__":
    for fn in (cupy_lstm, torch_cuda_lstm, jax_gpu_lstm, cupy_mlstm):
        section(fn)
    if "--slopes" in sys.argv:
        section(slopes)
    print(f"smoke: {len(BAD)} failed: {BAD}" if BAD else "smoke: all passed", flush=True)
    sys.exit(1 if BAD else 0)
