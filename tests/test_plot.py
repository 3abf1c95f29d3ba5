"""minicalm.tools.plot: a run's curves from metrics.jsonl (with and without validation, with a last line torn
mid-write), the confusion matrix, and the one line a CLI prints when matplotlib is missing. Every picture must be a
real PNG."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from minicalm.io.files import read_records
from minicalm.tools.commands import main as minicalm
from minicalm.tools.plot import plot_confusion, plot_run, series
from minicalm.tasks.score import compute_metrics

CURVES = ["grad_norm.png", "loss.png", "lr.png", "tokens_per_s.png"]
ENV = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def assert_png(path: Path) -> None:
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])   # the IHDR chunk comes first
    assert len(data) > 5000 and width > 200 and height > 200, f"{path}: {len(data)} bytes, {width} x {height}"


def records(steps: int = 12, validation: bool = True) -> list[dict]:
    """metrics.jsonl lines as train() writes them; validation loss and accuracy every 6 steps."""
    recs = []
    for s in range(1, steps + 1):
        rec = {"step": s, "epoch": s / 6, "loss": 6.0 / s, "lr": 1e-3 * min(1, s / 3), "tokens_per_s": 900.0 + s,
               "peak_memory_bytes": 2**30, "grad_norm": 1.0 / s, "elapsed_s": 0.5 * s}
        if validation and s % 6 == 0:
            rec |= {"val_loss": 5.0 / s, "val_accuracy": s / 12}
        recs.append(rec)
    return recs


def write_run(folder: Path, recs: list[dict], torn: str = "") -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + torn, encoding="utf-8")
    return folder


def test_read_records_skips_a_line_torn_mid_write(tmp_path):
    run = write_run(tmp_path / "run", records(), torn='{"step": 13, "epoch": 2.1, "lo')
    recs = read_records(run / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, 13))
    assert series(recs, "val_loss") == ([6, 12], [5.0 / 6, 5.0 / 12])


@pytest.mark.parametrize("validation", [False, True])
@pytest.mark.parametrize("torn", ["", '{"step": 13, "loss": 0.4'])
def test_plot_run_draws_every_curve(tmp_path, validation, torn):
    run = write_run(tmp_path / "run", records(validation=validation), torn)
    written = plot_run(run)
    assert sorted(p.name for p in written) == CURVES and all(p.parent == run / "plots" for p in written)
    for p in written:
        assert_png(p)


def test_cli_draws_a_run_and_refuses_a_folder_without_metrics_in_one_line(tmp_path, capsys):
    run = write_run(tmp_path / "run", records())
    minicalm(["plot", str(run)])
    assert sorted(p.name for p in (run / "plots").glob("*.png")) == CURVES
    for folder, why in ((tmp_path / "nothing", "No such file"), (write_run(tmp_path / "empty", [], torn='{"st'),
                                                                  "no complete step yet")):
        folder.mkdir(exist_ok=True)
        with pytest.raises(SystemExit) as e:
            minicalm(["plot", str(folder)])
        err = capsys.readouterr().err
        assert e.value.code == 1 and why in err and err.count("\n") == 1 and err.startswith("python -m minicalm plot")


def test_plot_confusion_draws_gold_rows_against_predicted_and_invalid(tmp_path):
    golds = ["positive"] * 5 + ["negative"] * 4
    preds = ["positive", "positive", "positive", "negative", "invalid", "negative", "negative", "positive", "invalid"]
    confusion = compute_metrics(golds, preds)["confusion"]   # the structure evaluation hands over
    path = plot_confusion(confusion, ["positive", "negative"], tmp_path / "confusion.png", "validation, after LoRA")
    assert path == tmp_path / "confusion.png"
    assert_png(path)


def test_without_matplotlib_the_cli_says_so_in_one_line(tmp_path):
    """A fresh interpreter where `import matplotlib` fails: importing every module of minicalm still works, and the
    CLI exits 1 with one line naming the extra to install."""
    run = write_run(tmp_path / "run", records())
    code = ("import sys; sys.modules['matplotlib'] = None; import minicalm.tools.adapter_stats, "
            "minicalm.tools.evaluate, minicalm.train, minicalm.tools.plot, minicalm.tools.commands; "
            f"minicalm.tools.commands.main(['plot', {str(run)!r}])")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == ('python -m minicalm plot: no pictures: drawing needs matplotlib: pip install '
                           '"minicalm[plot]"\n')
    assert not (run / "plots").exists()
