"""Pictures (PNG): a run's training curves, a confusion matrix, a sweep, and what an adapter changed (adapter_stats).

`python -m minicalm plot RUN_DIR` draws RUN_DIR/metrics.jsonl into RUN_DIR/plots/: loss.png (training loss, the
validation loss and accuracy when the run has them), lr.png, grad_norm.png and tokens_per_s.png, all against the
step. It works on a run still in progress: a last line torn mid-write is skipped.

matplotlib is optional (`pip install "minicalm[plot]"`) and imported only when something is drawn; without it the
commands write their numbers and say in one line that there are no pictures (`draw_if_possible`). Figures are
drawn by the Agg backend straight to files, without pyplot: no window, and a notebook's backend is left alone.
"""
from __future__ import annotations

import itertools
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..io.files import atomic_write, check_writable, read_records

MISSING = 'drawing needs matplotlib: pip install "minicalm[plot]"'


def draw_if_possible(draw, *args, prog: str) -> list[Path]:
    """draw(*args)'s files (one path or a list); without matplotlib, one line on stderr saying so and no files."""
    try:
        out = draw(*args)
    except ModuleNotFoundError as e:
        if e.name != "matplotlib":
            raise
        print(f"{prog}: no pictures: {MISSING}", file=sys.stderr)
        return []
    return out if isinstance(out, list) else [out]


def new_figure(ncols: int = 1, size: tuple[float, float] = (6.4, 4.0)):
    """A matplotlib Figure with ncols axes side by side, drawn by Agg; (figure, [axes])."""
    try:
        import matplotlib
    except ModuleNotFoundError as e:
        if e.name != "matplotlib":   # matplotlib is there but broken: show the real error
            raise
        raise ModuleNotFoundError(MISSING, name="matplotlib") from None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(size[0] * ncols, size[1]), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, ncols, k + 1) for k in range(ncols)]


def save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))   # the temporary name has no .png
    return path


# ----------------------------------------------------------------------------- a run's curves

def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that hold `key`."""
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [s for s, _ in points], [v for _, v in points]


def plot_run(run_dir: str | os.PathLike) -> list[Path]:
    """Draw RUN_DIR/metrics.jsonl into RUN_DIR/plots/*.png; returns the files written."""
    run, damaged = Path(run_dir), []
    records = [r for r in read_records(run / "metrics.jsonl", damaged) if "step" in r]
    if not records:
        raise ValueError(f"{run / 'metrics.jsonl'}: no complete step yet")
    if damaged:   # drawn without them: say which
        more = f", ... ({len(damaged)} in all)" if len(damaged) > 5 else ""
        print(f"{run / 'metrics.jsonl'}: skipped {len(damaged)} damaged line(s) (line {', '.join(map(str, damaged[:5]))}"
              f"{more})", file=sys.stderr)
    out = check_writable(run / "plots", "the pictures' folder")
    fig, (ax,) = new_figure()   # before any folder is made: without matplotlib nothing is left behind
    out.mkdir(exist_ok=True)
    ax.plot(*series(records, "loss"), label="training loss", lw=1)
    if series(records, "val_loss")[0]:
        ax.plot(*series(records, "val_loss"), "o-", label="validation loss")
    ax.set(xlabel="step", ylabel="loss (nats per scored token)", title=f"{run.name}: loss")
    handles = ax.get_legend_handles_labels()
    if series(records, "val_accuracy")[0]:   # a fraction, not a loss: its own axis on the right
        acc = ax.twinx()
        acc.plot(*series(records, "val_accuracy"), "s--", color="tab:green", label="validation accuracy")
        acc.set(ylabel="validation accuracy", ylim=(0, 1))
        handles = [a + b for a, b in zip(handles, acc.get_legend_handles_labels())]
    ax.legend(*handles)
    written = [save(fig, out / "loss.png")]
    for key, label in (("lr", "learning rate"), ("grad_norm", "gradient norm (before clipping)"),
                       ("tokens_per_s", "tokens/s")):
        steps, values = series(records, key)
        if steps:
            fig, (ax,) = new_figure()
            ax.plot(steps, values, lw=1)
            ax.set(xlabel="step", ylabel=label, title=f"{run.name}: {label}")
            written.append(save(fig, out / f"{key}.png"))
    return written


# ----------------------------------------------------------------------------- evaluation

def plot_confusion(confusion: dict, labels: list[str], path: str | os.PathLike, title: str) -> Path:
    """confusion[gold][predicted] as a grid of counts: rows the gold labels, columns the labels and `invalid`."""
    columns = [*labels, "invalid"]
    counts = [[confusion.get(g, {}).get(p, 0) for p in columns] for g in labels]
    fig, (ax,) = new_figure(size=(1.3 * len(columns) + 2, 1.1 * len(labels) + 1.5))
    ax.imshow(counts, cmap="Blues", vmin=0)
    top = max(max(row) for row in counts)
    for i, row in enumerate(counts):
        for j, n in enumerate(row):
            ax.text(j, i, str(n), ha="center", va="center", color="white" if n > top / 2 else "black")
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="predicted", ylabel="gold", title=title)
    return save(fig, path)


def plot_sweep(rows: list[dict], path: str | os.PathLike, title: str) -> Path:
    """A LoRA rank sweep (experiments/miniature.py --sweep-ranks): accuracy, invalid rate and macro-F1 against the rank
    (log scale), one set of lines per variant, each rank's trainable parameters written under its point."""
    fig, (ax,) = new_figure(size=(7.0, 4.2))
    groups: dict[str, list[dict]] = {}
    for x in rows:
        groups.setdefault(x.get("variant", "lora"), []).append(x)
    for name, runs in groups.items():
        prefix = f"{name}: " if len(groups) > 1 else ""
        for key, label, style in (("accuracy", "accuracy", "o-"), ("macro_f1", "macro-F1", "s--"),
                                  ("invalid_rate", "no valid answer", "x:")):
            ax.plot([x["r"] for x in runs], [x[key] for x in runs], style, label=prefix + label)
    for x in groups[next(iter(groups))]:
        ax.annotate(f"{x['trainable']:,}", (x["r"], x["accuracy"]), textcoords="offset points", xytext=(0, -14),
                    ha="center", fontsize=7)
    ranks = sorted({x["r"] for x in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set(xlabel="LoRA rank r (alpha = 2r); trainable parameters under each point", ylabel="share of rows",
           ylim=(0, 1.02))
    ax.set_title(title, fontsize=9, wrap=True)
    ax.legend(fontsize=7)
    return save(fig, path)


def plot_losses(curves: dict[str, list[float]], path: str | os.PathLike, title: str) -> Path:
    """Several runs' training loss against the step on one picture (a sweep of ranks or of LoRA's variants): each
    step faint, and its mean over a window of 1/40 of the run drawn over it, so that close runs can be told apart."""
    fig, (ax,) = new_figure(size=(7.0, 4.2))
    for label, losses in curves.items():
        steps, w = range(1, len(losses) + 1), max(1, len(losses) // 40)
        line, = ax.plot(steps, losses, lw=0.5, alpha=0.2)
        c = [0.0, *itertools.accumulate(losses)]
        means = [(c[i] - c[max(0, i - w)]) / min(i, w) for i in steps]
        ax.plot(steps, means, lw=1.5, color=line.get_color(), label=f"{label} (mean of {w} steps)")
    ax.set(xlabel="step", ylabel="training loss (nats per scored token)", yscale="log")
    ax.set_title(title, fontsize=9, wrap=True)
    ax.legend(fontsize=8)
    return save(fig, path)


def plot_dora_analysis(runs: dict[str, list[dict]], path: str | os.PathLike, layer: str) -> Path:
    """DoRA's figure 2 (Liu et al. 2024, section 3.2): each step's change of a layer's weight in direction (dD, x)
    against its change in magnitude (dM, y), one colour per run, the step darkening along the way."""
    fig, axes = new_figure(len(runs), size=(4.2, 3.8))
    for ax, (label, points) in zip(axes, runs.items()):
        im = ax.scatter([p["dD"] for p in points], [p["dM"] for p in points], c=[p["step"] for p in points],
                        cmap="viridis", s=8)
        ax.set(xlabel="direction change dD", ylabel="magnitude change dM", title=label)
        ax.ticklabel_format(style="sci", scilimits=(-2, 2))
    fig.colorbar(im, ax=axes, label="step")
    fig.suptitle(f"magnitude against direction, {layer}")
    return save(fig, path)


# ----------------------------------------------------------------------------- what an adapter changed

def plot_adapter_stats(result: dict, out_dir: str | os.PathLike) -> list[Path]:
    """adapter_stats.json's pictures in out_dir: the update per layer and target (update_per_layer.png), the singular
    values (singular_values.png) and, with a comparison, the subspace similarity (subspace_similarity.png)."""
    out, mods = Path(out_dir), result["modules"]
    targets = list(dict.fromkeys(m["target"] for m in mods))   # listed in the block's order
    layers = sorted({m["layer"] for m in mods})
    relative = all("relative_update" in m for m in mods)
    key = "relative_update" if relative else "delta_norm"
    grid = [[math.nan] * len(targets) for _ in layers]         # (layers, targets); a module not adapted stays blank
    for m in mods:
        grid[layers.index(m["layer"])][targets.index(m["target"])] = m[key]
    fig, (ax,) = new_figure(size=(2 + 1.2 * len(targets), 1.5 + 0.25 * len(layers)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    fig.colorbar(im, ax=ax)
    ax.set_xticks(range(len(targets)), targets, rotation=20)
    ax.set_yticks(range(len(layers)), layers)
    ax.set(xlabel="target", ylabel="layer", title="relative update ||ΔW||_F / ||W||_F" if relative else
           "delta_norm ||ΔW||_F (no base model: not relative to W)")
    written = [save(fig, out / "update_per_layer.png")]

    fig, (ax,) = new_figure()
    colors = {t: f"C{k}" for k, t in enumerate(targets)}
    for m in mods:   # one line a module, coloured by target; each divided by its largest value
        s = m["singular_values"]
        if s[0] > 0:
            ax.semilogy(range(1, len(s) + 1), [v / s[0] for v in s], ".-", color=colors[m["target"]], alpha=0.5,
                        label=m["target"])
    handles, labels = ax.get_legend_handles_labels()
    first = {lab: h for h, lab in zip(handles, labels)}   # one legend entry per target
    ax.legend(first.values(), first.keys())
    ax.set(xlabel="index", ylabel="singular value / largest", title="singular values of each module's ΔW")
    written.append(save(fig, out / "singular_values.png"))

    if result.get("compare"):
        phis = result["compare"]["modules"]
        middle = layers[len(layers) // 2]   # the mean over all modules, and each target's in the middle layer
        picks = [("mean over modules", result["compare"]["mean"])]
        picks += [(f"layer {middle} {m['target']}", phis[m["name"]]) for m in mods
                  if m["layer"] == middle and m["name"] in phis]
        fig, axes = new_figure(len(picks), size=(3.6, 3.4))
        for ax, (title, phi) in zip(axes, picks):
            r1, r2 = len(phi), len(phi[0])
            im = ax.imshow(phi, vmin=0, vmax=1, cmap="magma", extent=(0.5, r2 + 0.5, r1 + 0.5, 0.5), aspect="auto")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.yaxis.get_major_locator().set_params(integer=True)
            ax.set(title=title, xlabel="j (compared adapter)", ylabel="i (this adapter)")
        fig.colorbar(im, ax=axes, label="phi(i, j)")
        short = lambda path: "/".join(Path(path).parts[-2:])   # e.g. run-seed0/adapter
        fig.suptitle(f"subspace similarity of A's top directions: {short(result['adapter'])} vs "
                     f"{short(result['compare']['adapter'])}")
        written.append(save(fig, out / "subspace_similarity.png"))
    return written


@dataclass
class PlotConfig:
    run_dir: str                             # a training run's --out folder


def plot(a: PlotConfig) -> None:
    """python -m minicalm plot RUN_DIR."""
    written = draw_if_possible(plot_run, a.run_dir, prog="python -m minicalm plot")
    if not written:
        sys.exit(1)
    print(f"wrote {', '.join(str(w) for w in written)}")
