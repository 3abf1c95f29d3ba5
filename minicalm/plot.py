"""Pictures (PNG): a run's training curves and a confusion matrix.

`python -m minicalm.plot RUN_DIR` draws RUN_DIR/metrics.jsonl into RUN_DIR/plots/: loss.png (training loss, the
validation loss and accuracy when the run has them), lr.png, grad_norm.png and tokens_per_s.png, all against the
step. It works on a run still in progress: a last line torn mid-write is skipped.

matplotlib is optional (`pip install "minicalm[plot]"`) and imported only when something is drawn. Figures are
drawn by the Agg backend straight to files, without pyplot: no window, and a notebook's backend is left alone.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .weights import atomic_write

MISSING = 'drawing needs matplotlib: pip install "minicalm[plot]"'


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

def read_metrics(path: str | os.PathLike) -> list[dict]:
    """metrics.jsonl's records. A line that is not valid JSON (the last one, torn while being written) is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            records.append(rec)
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that hold `key`."""
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [s for s, _ in points], [v for _, v in points]


def plot_run(run_dir: str | os.PathLike) -> list[Path]:
    """Draw RUN_DIR/metrics.jsonl into RUN_DIR/plots/*.png; returns the files written."""
    run = Path(run_dir)
    records = read_metrics(run / "metrics.jsonl")
    if not records:
        raise ValueError(f"{run / 'metrics.jsonl'}: no complete step yet")
    fig, (ax,) = new_figure()   # before any folder is made: without matplotlib nothing is left behind
    out = run / "plots"
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m minicalm.plot",
                                description="Draw a run's metrics.jsonl (loss, lr, gradient norm, tokens/s) into "
                                            "RUN_DIR/plots/*.png; works while the run is still going.")
    p.add_argument("run_dir", help="a training run's --out folder")
    a = p.parse_args(argv)
    try:
        written = plot_run(a.run_dir)
    except (OSError, ValueError) as e:
        sys.exit(f"python -m minicalm.plot: {e}")
    except ModuleNotFoundError as e:
        if e.name != "matplotlib":
            raise
        sys.exit(f"python -m minicalm.plot: {e}")
    print(f"wrote {', '.join(str(w) for w in written)}", file=sys.stderr)


if __name__ == "__main__":
    main()
