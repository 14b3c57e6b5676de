"""Command line: ``python -m xlstm {check,info,demo}``, installed as the ``xlstm`` command too.

``check`` runs the seed notebook's four examples and float64 gradient checks of the LSTM and
the RNN notebook APIs on every backend that is importable here, prints a pass/fail table and
exits non-zero on any failure, or when no backend ran, or when a backend named with
``--backends`` cannot run here.
``info`` prints versions and devices.
``demo charlm``, ``demo adding``, ``demo bidirectional``, ``demo recall`` and ``demo
cells`` train the demos of :mod:`xlstm.demos`.
Bad arguments are argparse errors: a usage line and one error line (from the subcommand
that was given them), exit status 2.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import xlstm

from . import demos
from ._lib.compat import (
    BACKEND_MODULES,
    BACKENDS,
    COMPAT_VERSION,
    BackendUnavailable,
    load_backend,
    to_host,
)
from .engine import loop as _engine
from .notebook import seed as _seed

#: What the [cpu] extra adds: the compiled time loops on numpy.
CPU_EXTRA = "numba>=0.61"
#: The top-level ``--help`` text (plain: argparse prints it as it is).
DESCRIPTION = (
    "xlstm: LSTM, GRU, RNN, sLSTM and mLSTM, forward and backward, written once for the "
    "Python array API (numpy, CuPy, torch, JAX). Check the notebook's examples and the "
    "gradients on every backend, print versions and devices, or train a demo."
)

SEED_TOL = 1e-7  # the notebook prints 8-12 significant digits
GRAD_TOL = 1e-7  # central differences with h = 1e-6 in float64


def _arrays(xp, device, tree):
    """Host data as float64 arrays of ``xp`` on ``device`` (plain numpy when ``xp`` is None)."""
    if isinstance(tree, dict):
        return {k: _arrays(xp, device, v) for k, v in tree.items()}
    if xp is None:
        return np.asarray(tree, dtype=np.float64)
    return xp.asarray(np.asarray(tree, dtype=np.float64), device=device)


def _pick(results, key):
    """``results['dWf'][3][1]`` for the seed's printed key ``'dWf[3][1]'``."""
    name, _, rest = key.partition("[")
    value = results[name]
    for i in rest.replace("]", "").split("[") if rest else ():
        value = value[int(i)] if isinstance(value, tuple) else value[int(i), ...]
    return to_host(value)


def _worst(results, expected):
    return max(float(np.max(np.abs(_pick(results, k) - np.asarray(v)))) for k, v in expected.items())


def seed_examples(xp, device):
    """Largest absolute deviation from the notebook's printed outputs, over all four examples."""
    xt, a_prev, c_prev, params, da_next, dc_next = _seed.cell_case()
    P = _arrays(xp, device, params)
    a_next, c_next, yt, cache = xlstm.lstm_cell_forward(
        *(_arrays(xp, device, v) for v in (xt, a_prev, c_prev)), P
    )
    err = _worst({"a_next": a_next, "c_next": c_next, "yt": yt, "cache": cache},
                 _seed.CELL_FORWARD)
    g = xlstm.lstm_cell_backward(_arrays(xp, device, da_next), _arrays(xp, device, dc_next), cache)
    err = max(err, _worst(g, _seed.CELL_BACKWARD))
    x, a0, params, _ = _seed.sequence_case()
    a, y, c, caches = xlstm.lstm_forward(_arrays(xp, device, x), _arrays(xp, device, a0),
                                         _arrays(xp, device, params))
    err = max(err, _worst({"a": a, "y": y, "c": c, "caches": caches}, _seed.FORWARD))
    x, a0, params, da = _seed.sequence_case(zero_output=True)
    *_, caches = xlstm.lstm_forward(_arrays(xp, device, x), _arrays(xp, device, a0),
                                    _arrays(xp, device, params))
    g = xlstm.lstm_backward(_arrays(xp, device, da), caches)
    return max(err, _worst(g, _seed.BACKWARD))


def _gradcheck_case(n_x=2, n_a=3, m=2, T=3, seed=0):
    rng = np.random.default_rng(seed)
    host = {k: 0.8 * rng.standard_normal(v.shape)
            for k, v in xlstm.init_params(n_x, n_a, 2, seed=seed).items()}
    host.update(x=rng.standard_normal((n_x, m, T)), a0=rng.standard_normal((n_a, m)),
                c0=rng.standard_normal((n_a, m)))
    return host, rng.standard_normal((n_a, m, T))


def _run(xp, device, host, G=None):
    d = _arrays(xp, device, host)
    P = {k: d[k] for k in xlstm.params.PARAM_KEYS}
    a, _, _, caches = xlstm.lstm_forward(d["x"], d["a0"], P, c0=d["c0"],
                                         return_caches=G is not None)
    if G is None:
        return to_host(a)
    return {k: to_host(v) for k, v in xlstm.lstm_backward(_arrays(xp, device, G), caches).items()}


def _rnn_gradcheck_case(n_x=2, n_a=3, m=2, T=3, seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"Wax": (n_a, n_x), "Waa": (n_a, n_a), "Wya": (2, n_a), "ba": (n_a, 1),
              "by": (2, 1), "x": (n_x, m, T), "a0": (n_a, m)}
    host = {k: 0.8 * rng.standard_normal(shape) for k, shape in shapes.items()}
    return host, rng.standard_normal((n_a, m, T))


def _run_rnn(xp, device, host, G=None):
    d = _arrays(xp, device, host)
    P = {k: d[k] for k in xlstm.rnn.PARAM_KEYS}
    a, _, caches = xlstm.rnn_forward(d["x"], d["a0"], P, return_caches=G is not None)
    if G is None:
        return to_host(a)
    return {k: to_host(v) for k, v in xlstm.rnn_backward(_arrays(xp, device, G), caches).items()}


#: The gradient checks, by API: the case, the run (hidden states, or every gradient of
#: ``sum(G * a)``) and the inputs that the central differences perturb.
GRADCHECKS = {
    "lstm": (_gradcheck_case, _run, ("x", "a0", "c0", *xlstm.params.PARAM_KEYS[:8])),
    "rnn": (_rnn_gradcheck_case, _run_rnn, ("x", "a0", "Wax", "Waa", "ba")),
}


def central_differences(api="lstm", h=1e-6):
    """Central-difference gradients (numpy, float64) of ``L = sum(G * a)`` in every input.

    ``api`` names one of :data:`GRADCHECKS`. ``G`` is a fixed random array, so the exact
    gradient in ``a`` is ``G``; every entry of the inputs, the initial state and the cell's
    weights and biases is perturbed.
    """
    case, run, names = GRADCHECKS[api]
    host, G = case()
    num = {}
    for name in names:
        num["d" + name] = np.zeros_like(host[name])
        for idx in np.ndindex(host[name].shape):
            up, down = ({**host, name: host[name].copy()} for _ in range(2))
            up[name][idx] += h
            down[name][idx] -= h
            diff = np.sum((run(None, None, up) - run(None, None, down)) * G)
            num["d" + name][idx] = diff / (2 * h)
    return num


def gradcheck(xp, device, numeric, api="lstm"):
    """Worst relative error of the backend's gradients against ``numeric`` differences."""
    case, run, _ = GRADCHECKS[api]
    host, G = case()
    grads = run(xp, device, host, G)
    return max(float(np.max(np.abs(numeric[k] - grads[k]))) / max(1.0, float(np.max(np.abs(v))))
               for k, v in numeric.items())


def _check_backend(name, xp, device, numeric):
    """One row of the check table: seed examples and the gradient checks on one backend.

    ``numeric`` holds the central differences of every API of :data:`GRADCHECKS`.
    """
    t0 = time.perf_counter()
    try:
        seed_err = seed_examples(xp, device)
        grad_errs = [gradcheck(xp, device, numeric[api], api) for api in GRADCHECKS]
    except Exception as exc:  # noqa: BLE001 - report every backend, then fail
        return (name, str(device), "error", *("error" for _ in GRADCHECKS), "FAIL",
                repr(exc)), True
    ok = seed_err < SEED_TOL and all(e < GRAD_TOL for e in grad_errs)
    return (name, str(device), f"{seed_err:.1e}", *(f"{e:.1e}" for e in grad_errs),
            "pass" if ok else "FAIL", f"{time.perf_counter() - t0:.2f} s"), not ok


def _backend_names(text):
    """``--backends``: comma-separated names from BACKENDS, at least one, each once."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise argparse.ArgumentTypeError(f"name at least one of {', '.join(BACKENDS)}")
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown backend {', '.join(map(repr, unknown))}; choose from {', '.join(BACKENDS)}"
        )
    return names


def cmd_check(args):
    chosen = args.backends is not None
    names = args.backends if chosen else BACKENDS
    rows = []
    numeric = {api: central_differences(api) for api in GRADCHECKS}
    for name in names:
        try:
            xp, device = load_backend(name)
        except BackendUnavailable as exc:
            rows.append((name, "-", "-", *("-" for _ in GRADCHECKS), "skip", str(exc)))
            continue
        rows.append(_check_backend(name, xp, device, numeric)[0])
        if _engine.accelerated_loops(xp, xp.float64) is not None:  # the array path too
            with _engine.accelerators(False):
                rows.append(_check_backend(f"{name} (array path)", xp, device, numeric)[0])
    head = ("backend", "device", "notebook max |err|",
            *(f"{api} gradcheck rel err" for api in GRADCHECKS), "result", "note")
    widths = [max(len(str(r[i])) for r in (head, *rows)) for i in range(len(head))]
    for r in (head, tuple("-" * w for w in widths), *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    print(f"\nthe notebook's examples must match to {SEED_TOL:g}; "
          f"gradients to {GRAD_TOL:g} (relative)")
    ran = sum(r[-2] != "skip" for r in rows)
    n_failed = sum(r[-2] == "FAIL" for r in rows)
    missing = [r[0] for r in rows if r[-2] == "skip"] if chosen else []
    if ran == 0:
        print(f"FAILED: no backend ran ({', '.join(r[0] for r in rows)} cannot run here)")
        return 1
    if n_failed:
        print(f"FAILED: {n_failed} of {ran} checks failed")
        return 1
    if missing:
        print(f"FAILED: {', '.join(missing)} (named with --backends) cannot run here; "
              f"{ran} other {'check' if ran == 1 else 'checks'} passed")
        return 1
    print(f"all {ran} {'check' if ran == 1 else 'checks'} passed "
          f"({'the chosen backends' if chosen else 'every available backend'} and paths)")
    return 0


def _cpu_loops_status():
    """Whether numpy arrays take the compiled loops of ``xlstm.accel.cpu.loops``, and why not."""
    if not _engine.accel_enabled():
        return "off (XLSTM_ACCEL=0)"
    cpu, why = _engine.cpu_loops_module()
    if cpu is None:
        return f"off ({why}: python -m pip install '{CPU_EXTRA}')"
    import numba

    return f"on (numba {numba.__version__})"


def cmd_info(_args):
    print(f"xlstm {xlstm.__version__}")
    print(f"python {platform.python_version()} on {platform.platform()}")
    print(f"numpy {np.__version__}, array-api-compat {COMPAT_VERSION}")
    print(f"compiled CPU loops: {_cpu_loops_status()}")
    for name in BACKENDS[1:]:
        if name == "strict-device1":
            continue
        try:
            xp, device = load_backend(name)
        except BackendUnavailable as exc:
            print(f"{name}: unavailable ({exc})")
            continue
        mod = sys.modules[BACKEND_MODULES[name]]
        extra = ""
        if name == "cupy":
            props = mod.cuda.runtime.getDeviceProperties(0)
            extra = f", {props['name'].decode()}"
        elif name == "torch-cuda":
            extra = f", {mod.cuda.get_device_name(device)}"
        print(f"{name} {getattr(mod, '__version__', '?')}: device {device}{extra}")
    return 0


#: The names in a parsed ``demo`` command line that are not the demo's options.
_NOT_DEMO_OPTIONS = ("command", "func", "command_parser")


def cmd_demo(args):
    result = demos.run_parsed(args, ignore=_NOT_DEMO_OPTIONS)
    return 0 if result.get("solved", True) else 1


def program_name() -> str:
    """``xlstm`` when this runs as the installed ``xlstm`` command, else ``python -m xlstm``."""
    path = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    return "xlstm" if path.stem == "xlstm" and path.suffix in ("", ".exe") else "python -m xlstm"


def build_parser(prog: str = "python -m xlstm") -> argparse.ArgumentParser:
    """The command-line parser (plain-text help, no markup); ``prog`` names the command in
    usage lines and errors."""
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"xlstm {xlstm.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{check,info,demo}")
    p = sub.add_parser(
        "check", help="the notebook's examples and gradient checks on every backend",
        description="Run the notebook's four examples and float64 gradient checks of the LSTM "
                    "and RNN APIs on every backend that can run here (or on those named with "
                    "--backends), print a pass/fail table, and exit with status 1 on any "
                    "failure, when no backend ran, or when a named backend cannot run here.")
    p.add_argument("--backends", type=_backend_names, metavar="NAMES",
                   help=f"comma-separated subset of {','.join(BACKENDS)}")
    p.set_defaults(func=cmd_check, command_parser=p)
    p = sub.add_parser("info", help="versions and devices",
                       description="Print the versions of xlstm, Python and the array "
                                   "libraries, and the devices that each backend sees.")
    p.set_defaults(func=cmd_info, command_parser=p)
    p = sub.add_parser("demo", help="training demos (see: demo NAME --help)",
                       description="Train one of the demos; demo NAME --help lists its "
                                   "options and how long its defaults take.")
    p.set_defaults(func=cmd_demo, command_parser=p)
    for demo_parser in demos.add_parsers(p.add_subparsers(dest="demo", required=True,
                                                          metavar="NAME")).values():
        demo_parser.set_defaults(command_parser=demo_parser)
    return parser


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); return the exit status.

    ``prog`` names the command in usage lines and errors (default: ``xlstm`` when this runs
    as the installed ``xlstm`` command, else ``python -m xlstm``). Argument errors raise
    ``SystemExit(2)`` after argparse prints the usage and the error.
    """
    parser = build_parser(program_name() if prog is None else prog)
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the subcommand that was given them, with its usage line
        args.command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
