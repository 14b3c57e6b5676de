"""The documentation's figures, drawn from real runs, with the numbers behind each.

    python docs/_scripts/make_figures.py             # both figures
    python docs/_scripts/make_figures.py recall      # the front page's only
    python docs/_scripts/make_figures.py forms       # the mLSTM forms' only

``recall``: the associative-recall demo (``python -m xlstm demo recall``, its default
settings but ``--steps``, 1000 by default: an LSTM, an sLSTM and an mLSTM of about equal
size, numpy float32), their training losses (smoothed over 50 steps) and held-out
accuracies.

``forms``: ``xlstm.MLSTM`` (numpy float32, batch 2, 2 heads, ``n_h = 64``, ``n_x = 32``,
``chunk = 64``) in each of its three forms, over sequences of 16 to 4096 steps: the time
of a training call (forward with a cache, then backward) and of an inference call
(forward, no cache), the fastest of at least ``--repeat`` calls after an untimed one (more
while they take less than 2 s in all), and the peak memory that numpy allocated during
one call beyond the inputs (tracemalloc sees numpy's buffers). The BLAS runs
``--threads`` threads (default 1): on a machine whose cores other work shares, a BLAS
thread that waits for a busy core slows a call several times over, and one thread
measures the forms rather than the neighbours.

Each writes a PNG into ``docs/figures/`` and the numbers it draws, with the machine and the
library versions, into a JSON file beside it; the pages quote those numbers. Needs
matplotlib (the ``demo`` or ``bench`` extra). The timings depend on the machine and on
whatever else runs on it: the fastest call of several is the least disturbed one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import tracemalloc
from pathlib import Path

FIGURES = Path(__file__).resolve().parents[1] / "figures"
#: The forms' sequence lengths.
LENGTHS = (16, 64, 256, 1024, 4096)
#: Colours of the three models or forms, the same in both figures.
COLOURS = ("#1f77b4", "#d62728", "#2ca02c")


def machine() -> dict:
    """The CPU, its cores, the BLAS and the load: what the timings depend on."""
    import numpy as np

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__}
    try:
        from threadpoolctl import threadpool_info

        info["blas"] = [f"{lib['internal_api']} {lib['version']}, {lib['num_threads']} threads"
                        for lib in threadpool_info() if lib.get("user_api") == "blas"]
    except ImportError:
        pass
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    return info


def _save(fig, name: str, numbers: dict) -> None:
    import xlstm

    FIGURES.mkdir(exist_ok=True)
    png = FIGURES / f"{name}.png"
    fig.savefig(png, dpi=110, bbox_inches="tight")
    numbers = {**numbers, "xlstm": xlstm.__version__, "machine": machine()}
    (FIGURES / f"{name}.json").write_text(json.dumps(numbers, indent=1) + "\n",
                                          encoding="utf-8")
    print(f"wrote {png} ({png.stat().st_size / 1024:.0f} KiB) and its JSON")


# ---------------------------------------------------------------- the front page
def recall_figure(steps: int) -> None:
    """Train the recall demo's three models; draw their smoothed training losses."""
    import matplotlib.pyplot as plt
    import numpy as np

    from xlstm.demos import recall

    res = recall(steps=steps, plot=None, progress=False, verbose=False)
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    width = 50
    for (name, hist), colour in zip(res["history"].items(), COLOURS):
        hist = np.asarray(hist)
        smooth = np.convolve(hist, np.ones(width) / width, mode="valid")
        label = (f"{name} ({res['parameters'][name]:,} parameters): "
                 f"held-out accuracy {res['accuracy'][name]:.2f}")
        ax.plot(np.arange(1, len(hist) + 1), hist, color=colour, lw=0.5, alpha=0.25)
        ax.plot(np.arange(width, len(hist) + 1), smooth, color=colour, lw=1.8, label=label)
    ax.axhline(np.log(1 / res["guess"]), color="0.5", ls=":", lw=1)
    ax.text(steps, np.log(1 / res["guess"]), "blind guess ", color="0.4", ha="right",
            va="bottom", fontsize=8)
    ax.set(xlabel="Adam step", ylabel="training loss (nats)", ylim=(0, None),
           title=f"Associative recall, {steps} steps (the recall demo)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    _save(fig, "recall", {
        "command": f"xlstm.demos.recall(steps={steps}) (the demo's defaults otherwise)",
        **{k: res[k] for k in ("accuracy", "parameters", "hidden", "seconds", "guess")},
    })


# ---------------------------------------------------------------- the mLSTM's forms
def _measure(call, repeat: int, budget: float = 2.0) -> tuple[float, float, int]:
    """The fastest of at least ``repeat`` timed calls (after one untimed; more while they
    have taken less than ``budget`` seconds, at most 200), in ms; the peak memory that
    numpy allocated in one call, in MiB; and the number of timed calls."""
    call()
    tracemalloc.start()
    call()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    best, spent, calls = float("inf"), 0.0, 0
    while calls < repeat or (spent < budget and calls < 200):
        t0 = time.perf_counter()
        call()
        took = time.perf_counter() - t0
        best, spent, calls = min(best, took), spent + took, calls + 1
    return 1e3 * best, peak / 2**20, calls


def forms_figure(repeat: int) -> None:
    """Time and memory of the mLSTM's three forms against the sequence length."""
    import matplotlib.pyplot as plt
    import numpy as np

    import xlstm

    forms = xlstm.mlstm.FORMS
    n_x, n_h, batch, heads, chunk = 32, 64, 2, 2, 64
    model = xlstm.MLSTM(n_x, n_h, num_heads=heads, chunk=chunk, dtype="float32", seed=0)
    rng = np.random.default_rng(0)
    rows = []
    for T in LENGTHS:
        x = rng.standard_normal((n_x, batch, T)).astype(np.float32)
        dy = rng.standard_normal((n_h, batch, T)).astype(np.float32)
        for form in forms:
            def train(form=form, x=x, dy=dy):
                _, _, cache = model.forward(x, form=form)
                model.backward(dy, cache)

            def infer(form=form, x=x):
                model.forward(x, form=form, return_cache=False)

            train_ms, train_mib, train_calls = _measure(train, repeat)
            infer_ms, infer_mib, infer_calls = _measure(infer, repeat)
            rows.append({"T": T, "form": form, "train_ms": train_ms, "train_mib": train_mib,
                         "train_calls": train_calls, "infer_ms": infer_ms,
                         "infer_mib": infer_mib, "infer_calls": infer_calls})
            print(f"T={T:5d} {form:10s} train {train_ms:9.1f} ms {train_mib:8.1f} MiB   "
                  f"inference {infer_ms:9.1f} ms {infer_mib:8.1f} MiB", flush=True)
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.3))
    panels = (("train_ms", "training call: time (ms)"),
              ("infer_ms", "inference call: time (ms)"),
              ("train_mib", "training call: peak memory (MiB)"))
    for ax, (key, title) in zip(axes, panels):
        for form, colour in zip(forms, COLOURS):
            pts = [(r["T"], r[key]) for r in rows if r["form"] == form]
            ax.loglog(*zip(*pts), "o-", color=colour, lw=1.6, ms=4, label=form)
        ax.set(xlabel="sequence length T", title=title)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(frameon=False, fontsize=9)
    threads = int(os.environ["OPENBLAS_NUM_THREADS"])
    fig.suptitle(f"xlstm.MLSTM, numpy float32, {threads} BLAS thread{'s' * (threads > 1)}: "
                 f"batch {batch}, {heads} heads, n_h {n_h}, n_x {n_x}, chunk {chunk}",
                 fontsize=10)
    fig.tight_layout()
    _save(fig, "mlstm_forms", {
        "config": {"n_x": n_x, "n_h": n_h, "batch": batch, "heads": heads, "chunk": chunk,
                   "dtype": "float32", "repeat": repeat,
                   "blas_threads": threads,
                   "timing": "fastest of at least repeat calls, more within 2 s"},
        "rows": rows,
    })


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("which", nargs="*", choices=("recall", "forms"), default=[],
                    help="the figures to draw (default: both)")
    ap.add_argument("--steps", type=int, default=1000, help="recall: Adam steps per model")
    ap.add_argument("--repeat", type=int, default=5,
                    help="forms: the fewest timed calls per point")
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads (default 1)")
    args = ap.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)  # before numpy is first imported, below
    import matplotlib

    matplotlib.use("Agg")
    which = args.which or ["recall", "forms"]
    if "recall" in which:
        recall_figure(args.steps)
    if "forms" in which:
        forms_figure(args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
