"""The figures derived from the times, and the report: markdown tables, the JSON, the chart."""

from __future__ import annotations

import json
from pathlib import Path

from _lstm_impls import CORE, N_Y
from _machine import slug, versions


def add_rates(res, flops, ceiling):
    """GFLOP/s, fraction of the GEMM ceiling and speed ratios vs torch and vs the seed.

    ``ceiling`` is the run's dict (:func:`_timing.gemm_ceiling`). A rate above it (a
    workload whose GEMMs ran faster than the square one's fastest sample) raises it, so
    that no fraction exceeds 1; its ``source`` then names that row.
    """
    for key, r in res.items():
        f = r.get("flops") or {ph: flops[("core_" if key in CORE else "") + ph]
                               for ph in ("fwd", "fwd_bwd")}  # fmt: skip
        for ph in ("fwd", "fwd_bwd"):
            r[f"gflops_{ph}"] = f[ph] / (r[ph]["median_ms"] * 1e6)
            if r[f"gflops_{ph}"] > ceiling["gflops"]:
                ceiling.update(gflops=r[f"gflops_{ph}"], source=f"{r['label']}, {ph}")
            # reference time / this time: > 1 is faster. A model row (GRU, stacked
            # bidirectional) is compared with its own torch module, and with no seed.
            refs = {"torch": r["ref"], "seed": None} if "ref" in r else {"torch": "torch", "seed": "seed"}
            for ref, key_ref in refs.items():
                if key_ref in res:
                    ratio = res[key_ref][ph]["median_ms"] / r[ph]["median_ms"]
                    r.setdefault(f"speedup_vs_{ref}", {})[ph] = ratio
    set_fractions(res, ceiling)


def set_fractions(res, ceiling):
    """Each result's fraction of the ceiling (again after the ceiling was raised)."""
    for r in res.values():
        for ph in ("fwd", "fwd_bwd"):
            r[f"ceiling_fraction_{ph}"] = r[f"gflops_{ph}"] / ceiling["gflops"]


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


def markdown_head(report):
    """The title and the settings of the run, above the tables."""
    ceiling, threads = report["gemm_ceiling"], report["threads"]
    return (f"# LSTM benchmark: {report['backend']}, {report['dtype']}, {report['device']}\n\n"
            f"{report['timestamp']}; {threads['requested']} threads (torch {threads['torch']}); "
            f"BLAS {report['blas']}; "
            f"GEMM ceiling {ceiling['gflops']:.1f} GFLOP/s ({ceiling['source']}); median of "
            f"{report['repeat']} samples after {report['warmup']} warm-ups (median of "
            f"{report['rounds']} round-robin rounds); versions {report['versions']}; "
            f"env {report['env']}.\n\nn_y = {N_Y}: xlstm and the seed also compute the softmax "
            "prediction, torch.nn.LSTM the LSTM core only. 'vs X' = X's time / this time "
            "(> 1: faster than X). The seed works in float64 whatever the dtype, as the "
            "notebook does. % ceiling: fwd+bwd GFLOP/s over the ceiling's GFLOP/s.\n\n")


def write(report, tables, folder, *, chart=True):
    """Write ``bench_<backend>_<dtype>_<device>.{json,md,png}`` into ``folder`` (made if
    missing); the PNG only with ``chart`` and matplotlib. Returns the paths written."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"bench_{report['backend']}_{report['dtype']}_{slug(report['device'])}"
    written = [f"{base}.json", f"{base}.md"]
    if chart and plot(report, f"{base}.png"):
        written.append(f"{base}.png")
        report["versions"].update(versions())  # now with matplotlib
    Path(f"{base}.md").write_text(markdown_head(report) + "\n".join(tables))
    Path(f"{base}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    return written
