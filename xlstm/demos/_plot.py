"""The loss-curve PNGs that the demos write."""

from __future__ import annotations

import os

import numpy as np


def loss_curve(path, history, evals, *, title, ylabel, eval_label, baseline=None, logy=False,
               others=None, label="train"):
    """Write a PNG of the per-step loss and the evaluation points; None without matplotlib.

    ``others`` maps labels to more per-step loss histories, drawn smoothed alongside."""
    try:
        # The object API: no pyplot, so no global backend to choose or to disturb.
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    steps = np.arange(1, len(history) + 1)
    ax.plot(steps, history, lw=0.6, alpha=0.5, color="tab:blue", label=f"{label} (per step)")
    if len(history) >= 20:
        k = max(len(history) // 50, 5)
        smooth = np.convolve(history, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, lw=1.5, color="tab:blue", label=f"{label} ({k}-step mean)")
    for (label, other), color in zip((others or {}).items(), ("tab:green", "tab:red", "tab:purple")):
        k = max(len(other) // 50, 5) if len(other) >= 20 else 1
        smooth = np.convolve(other, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(k, len(other) + 1), smooth, lw=1.5, color=color, label=label)
    if evals:
        ax.plot(*zip(*evals), "o-", color="tab:orange", ms=3, label=eval_label)
    return _finish(fig, ax, path, title=title, ylabel=ylabel, baseline=baseline, logy=logy)


def training_curves(path, histories, *, title, ylabel):
    """Write a PNG of the per-step training losses of several models (label -> history),
    the first drawn in full and the others smoothed; None without matplotlib."""
    first, *rest = histories
    return loss_curve(path, histories[first], [], title=title, ylabel=ylabel, eval_label="",
                      others={k: histories[k] for k in rest}, label=first)


def eval_curves(path, curves, *, title, ylabel, baseline=None):
    """Write a PNG of several held-out loss curves (label -> ``[(step, loss), ...]``);
    None without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    for label, points in curves.items():
        ax.plot(*zip(*points), "o-", ms=3, label=label)
    return _finish(fig, ax, path, title=title, ylabel=ylabel, baseline=baseline)


def _finish(fig, ax, path, *, title, ylabel, baseline=None, logy=False):
    """The frame of every curve plot (baseline, axes, legend), written to ``path``."""
    if baseline is not None:
        ax.axhline(baseline, ls="--", color="gray", lw=1, label=f"baseline {baseline:.3g}")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return os.fspath(path)


def curve_path(out, plot):
    """Where the loss curve goes: ``plot`` if given, else next to ``out``; None: no plot."""
    if plot is False:
        return None
    if plot not in (None, True):
        return os.fspath(plot)
    root, _ = os.path.splitext(os.fspath(out))
    return root + "_loss.png"
