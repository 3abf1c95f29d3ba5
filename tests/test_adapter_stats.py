"""minicalm.tools.adapter_stats: the math on matrices built with known answers (a chosen spectrum, nested and orthogonal
subspaces, a diagonal W whose strong and weak directions are known), the files and pictures the CLI writes, and on
two real short LoRA runs the numbers equal a computation straight from the adapter's files."""
from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REVIEWS, ROOT, assert_close_to_scale, need
from minicalm.io.adapter import PEFT_PREFIX
from minicalm.tools.adapter_stats import amplification, delta_svd, inspect_adapter, subspace_similarity
from minicalm.tools.commands import main as minicalm
from minicalm.config import BLOCK_LINEARS, LoraConfig
from minicalm.train import TrainConfig, train

F64 = dict(dtype=torch.float64)
FP64_REL = 1e-10   # fp64 QR and SVD of small well-conditioned matrices: errors near 1e-15 of the scale
ENV = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
QKV, DENSE = "gpt_neox.layers.{}.attention.query_key_value", "gpt_neox.layers.{}.attention.dense"


def orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    """(n, k) with orthonormal columns."""
    return torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed), **F64))[0]


def write_adapter(folder: Path, factors: dict, r: int, alpha: float, base: str | None = None) -> Path:
    """An adapter folder in PEFT's format from {module name: (A (r, in), B (out, r))}."""
    folder.mkdir(parents=True)
    tensors = {}
    for name, (A, B) in factors.items():
        tensors[PEFT_PREFIX + name + ".lora_A.weight"] = A.float().contiguous()
        tensors[PEFT_PREFIX + name + ".lora_B.weight"] = B.float().contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    targets = sorted({n.rpartition(".")[2] for n in factors})
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": targets,
         "base_model_name_or_path": base}))
    return folder


def write_base(folder: Path, weights: dict) -> Path:
    """A checkpoint folder holding only the named weights: all that adapter_stats reads from a base."""
    folder.mkdir(parents=True)
    save_file({n + ".weight": W.float().contiguous() for n, W in weights.items()}, str(folder / "model.safetensors"))
    return folder


def assert_png(path: Path) -> None:
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])   # the IHDR chunk comes first
    assert len(data) > 5000 and width > 200 and height > 200, f"{path}: {len(data)} bytes, {width} x {height}"


# ----------------------------------------------------------------------------- the math, on known answers

def test_delta_svd_recovers_a_chosen_spectrum_and_the_scaling(tmp_path):
    """ΔW = Uo diag(5, 2, 0.5) Vi^T, written as B A of rank r = 4 through a random mixing (so neither factor is
    orthogonal and one direction of the adapter is unused): delta_svd finds those values, 0, and the same ΔW."""
    out, inp, r, alpha = 12, 10, 4, 8.0
    sigma = torch.tensor([5.0, 2.0, 0.5], **F64)
    Uo, Vi = orthonormal(out, 3, seed=0), orthonormal(inp, 3, seed=1)
    want = Uo @ torch.diag(sigma) @ Vi.T
    g = torch.Generator().manual_seed(2)
    mix = torch.randn(r, r, generator=g, **F64) + 3 * torch.eye(r, **F64)            # invertible
    B0 = torch.cat([Uo * sigma, torch.zeros(out, 1, **F64)], 1) / (alpha / r)        # (out, r)
    A0 = torch.cat([Vi.T, torch.randn(1, inp, generator=g, **F64)], 0)               # (r, in)
    B, A = B0 @ torch.linalg.inv(mix), mix @ A0                                       # B A = B0 A0

    U, S, V = delta_svd(A, B, alpha / r)
    assert_close_to_scale(S, torch.tensor([5.0, 2.0, 0.5, 0.0], **F64), rel=FP64_REL)
    assert_close_to_scale(U @ torch.diag(S) @ V.T, want, rel=FP64_REL)
    assert_close_to_scale(U.T @ U, torch.eye(r, **F64), rel=FP64_REL)
    assert_close_to_scale(V.T @ V, torch.eye(r, **F64), rel=FP64_REL)

    # through the files (fp32 on disk) and inspect_adapter; doubling alpha doubles ΔW
    for a, factor in ((alpha, 1.0), (2 * alpha, 2.0)):
        folder = write_adapter(tmp_path / f"alpha{a:g}", {QKV.format(0): (A, B)}, r, a)
        (mod,) = inspect_adapter(folder)["modules"]
        assert mod["name"] == QKV.format(0) and mod["layer"] == 0 and mod["target"] == "query_key_value"
        assert mod["delta_norm"] == pytest.approx(factor * math.sqrt(25 + 4 + 0.25), rel=1e-5)
        assert_close_to_scale(torch.tensor(mod["singular_values"]), factor * torch.tensor([5.0, 2.0, 0.5, 0.0]),
                              rel=1e-5)
        assert "weight_norm" not in mod   # no base given


def test_subspace_similarity_nested_orthogonal_and_by_hand():
    Q = orthonormal(20, 6, seed=0)            # six orthonormal directions q0..q5 of a 20-dim input
    def A(*rows, scale):                       # rows combine the q's; a random rotation on the left changes nothing
        rot = orthonormal(len(rows), len(rows), seed=len(rows))
        return rot @ torch.diag(torch.tensor(scale, **F64)) @ torch.stack(rows)

    q = Q.T
    A1 = A(q[0], q[1], scale=[3.0, 1.0])                       # top directions q0, then q1
    A2 = A(q[0], q[1], q[2], q[3], scale=[4.0, 3.0, 2.0, 1.0])  # q0, q1, q2, q3: A1's subspaces nest inside
    phi = subspace_similarity(A1, A2)
    assert phi.shape == (2, 4)
    assert_close_to_scale(phi, torch.ones(2, 4, **F64), rel=FP64_REL)
    assert_close_to_scale(subspace_similarity(A2, A2), torch.ones(4, 4, **F64), rel=FP64_REL)   # with itself
    g = torch.Generator().manual_seed(0)
    rand = torch.randn(5, 20, generator=g, **F64)
    assert_close_to_scale(torch.diagonal(subspace_similarity(rand, rand)), torch.ones(5, **F64), rel=FP64_REL)

    A3 = A(q[4], q[5], scale=[2.0, 1.0])                       # orthogonal to A1 and to A2's top four
    assert subspace_similarity(A1, A3).abs().max() < 1e-12
    assert subspace_similarity(A3, A2).abs().max() < 1e-12

    # top direction (q0 + q1)/sqrt2, then (q0 - q1)/sqrt2: cos^2 = 1/2 with q0; any two span the same plane
    A4 = A((q[0] + q[1]) / 2 ** 0.5, (q[0] - q[1]) / 2 ** 0.5, scale=[2.0, 1.0])
    assert_close_to_scale(subspace_similarity(A1, A4), torch.tensor([[0.5, 1.0], [1.0, 1.0]], **F64), rel=FP64_REL)
    # reversed order: A5's top direction is A2's weakest
    A5 = A(q[3], q[2], q[1], q[0], scale=[4.0, 3.0, 2.0, 1.0])
    phi = subspace_similarity(A2, A5)
    assert phi[0, 0] < 1e-12 and phi[1, 1] < 1e-12                          # {q0, q1} against {q3, q2}
    assert phi[0, 3] == pytest.approx(1.0) and phi[2, 2] == pytest.approx(2 / 3)   # q1, q2 shared of three


def test_amplification_is_large_where_W_is_weak(tmp_path):
    """W = diag(10, 5, 1, 0.1) (out 5 x in 4): an update of size 3 along W's strongest direction is amplified
    3/10, along its weakest 3/0.1; one of singular values (4, 3) on the plane of 10 and 5: 5 / sqrt(10^2 + 5^2)."""
    W = torch.zeros(5, 4, **F64)
    W[:4] = torch.diag(torch.tensor([10.0, 5.0, 1.0, 0.1], **F64))
    e_out, e_in = torch.eye(5, **F64), torch.eye(4, **F64)

    def amp(directions: list[int], sizes: list[float]) -> float:   # ΔW = sum_k sizes[k] e_d e_d^T
        B, A = e_out[:, directions] * torch.tensor(sizes, **F64), e_in[directions]
        return amplification(W, *delta_svd(A, B, 1.0))

    strong, weak = amp([0], [3.0]), amp([3], [3.0])
    assert strong == pytest.approx(3 / 10) and weak == pytest.approx(3 / 0.1) and strong < 1 < weak
    assert amp([0, 1], [3.0, 4.0]) == pytest.approx(5 / math.sqrt(125))

    # a dense ΔW through torch.linalg.svd, as amplification's docstring says, gives the factored form's value
    g = torch.Generator().manual_seed(0)
    Wr, Br, Ar = (torch.randn(*s, generator=g, **F64) for s in ((7, 6), (7, 2), (2, 6)))
    U, S, Vh = torch.linalg.svd(Br @ Ar)
    assert amplification(Wr, U[:, :2], S[:2], Vh[:2].T) == pytest.approx(amplification(Wr, *delta_svd(Ar, Br, 1.0)))

    # through the files: the weak direction, with the base read from a checkpoint folder
    base = write_base(tmp_path / "base", {QKV.format(0): W})
    folder = write_adapter(tmp_path / "adapter", {QKV.format(0): (e_in[[3]], 3 * e_out[:, [3]])}, r=1, alpha=1)
    (mod,) = inspect_adapter(folder, base=base)["modules"]
    w_norm = math.sqrt(100 + 25 + 1 + 0.01)
    assert mod["weight_norm"] == pytest.approx(w_norm, rel=1e-6)
    assert mod["relative_update"] == pytest.approx(3 / w_norm, rel=1e-6)
    assert mod["amplification"] == pytest.approx(30, rel=1e-5)   # 0.1 stored in fp32


# ----------------------------------------------------------------------------- the CLI on constructed adapters

@pytest.fixture
def two_adapters(tmp_path):
    """Two random adapters (r 3 and r 2) on query_key_value and dense of 2 layers (hidden 8), and their base."""
    g = torch.Generator().manual_seed(0)
    shapes = {QKV: (24, 8), DENSE: (8, 8)}
    weights = {n.format(i): torch.randn(*s, generator=g) for n, s in shapes.items() for i in range(2)}
    base = write_base(tmp_path / "base", weights)
    dirs = []
    for r in (3, 2):
        factors = {n: (torch.randn(r, W.shape[1], generator=g), torch.randn(W.shape[0], r, generator=g) * 0.1)
                   for n, W in weights.items()}
        dirs.append(write_adapter(tmp_path / f"r{r}" / "adapter", factors, r, 2 * r, base=str(base)))
    return dirs, base


def test_cli_writes_json_and_pictures_with_base_compare_and_without_base(two_adapters, tmp_path):
    (a, b), base = two_adapters
    minicalm(["stats", str(a), "--compare", str(b), "--out", str(tmp_path / "both")])   # base from the adapter's config
    result = json.loads((tmp_path / "both" / "adapter_stats.json").read_text())
    assert result["base"] == str(base) and result["r"] == 3 and result["alpha"] == 6
    names = [m["name"] for m in result["modules"]]
    assert names == [QKV.format(0), DENSE.format(0), QKV.format(1), DENSE.format(1)]   # layer, then block order
    assert all(len(m["singular_values"]) == 3 and m["relative_update"] > 0 and m["amplification"] > 0
               for m in result["modules"])
    cmp = result["compare"]
    assert cmp["adapter"] == str(b) and sorted(cmp["modules"]) == sorted(names)
    phis = torch.tensor(list(cmp["modules"].values()), **F64)
    assert phis.shape == (4, 3, 2) and 0 <= phis.min() and phis.max() <= 1 + 1e-9
    assert_close_to_scale(torch.tensor(cmp["mean"], **F64), phis.mean(0), rel=1e-12)
    for name in ("update_per_layer", "singular_values", "subspace_similarity"):
        assert_png(tmp_path / "both" / f"{name}.png")

    minicalm(["stats", str(a), "--base", "none", "--out", str(tmp_path / "alone")])
    result = json.loads((tmp_path / "alone" / "adapter_stats.json").read_text())
    assert result["base"] is None and result["compare"] is None
    assert all("relative_update" not in m and m["delta_norm"] > 0 for m in result["modules"])
    assert sorted(p.name for p in (tmp_path / "alone").glob("*.png")) == ["singular_values.png", "update_per_layer.png"]
    for p in (tmp_path / "alone").glob("*.png"):
        assert_png(p)


def test_cli_refuses_a_base_that_does_not_match_in_one_line(two_adapters, tmp_path, capsys):
    (a, _), _ = two_adapters
    wrong = write_base(tmp_path / "wrong", {QKV.format(0): torch.ones(24, 8)})   # lacks the other modules
    with pytest.raises(SystemExit) as e:
        minicalm(["stats", str(a), "--base", str(wrong), "--out", str(tmp_path / "x")])
    msg = capsys.readouterr().err
    assert e.value.code == 1 and msg.count("\n") == 1 and "gpt_neox.layers" in msg and "--base none" in msg
    assert msg.startswith("python -m minicalm stats: error: ")
    assert not (tmp_path / "x" / "adapter_stats.json").exists()


def test_without_matplotlib_the_json_is_written_and_one_line_says_what_to_install(two_adapters, tmp_path,
                                                                                 monkeypatch, capsys):
    (a, _), _ = two_adapters
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # `import matplotlib` now fails as if not installed
    minicalm(["stats", str(a), "--out", str(tmp_path / "out")])
    msg = capsys.readouterr().err
    assert msg == 'python -m minicalm stats: no pictures: drawing needs matplotlib: pip install ' \
                  '"minicalm[plot]"\n', msg
    assert json.loads((tmp_path / "out" / "adapter_stats.json").read_text())["modules"]
    assert not list((tmp_path / "out").glob("*.png"))


# ----------------------------------------------------------------------------- real short LoRA runs

@pytest.fixture(scope="module")
def runs(base, tmp_path_factory):
    """conftest's tiny random GPT-NeoX + 500-token BPE and two 10-step LoRA runs on all four targets: r 4 seed 0
    with validation loss and accuracy, r 2 seed 1 without."""
    root = tmp_path_factory.mktemp("adapter_stats")
    folder, _ = base
    common = dict(model=str(folder), train_file=str(REVIEWS / "train.jsonl"), limit_train=32, batch_size=8,
                  micro_batch_size=8, max_len=128, lr=1e-2, warmup_steps=2, max_steps=10, save_every=0,
                  device="cpu", dtype="float32", log=False)
    lora = dict(targets=BLOCK_LINEARS, dropout=0.0)
    train(TrainConfig(**common, out=str(root / "r4"), lora=LoraConfig(r=4, alpha=8, **lora), seed=0,
                      valid_file=str(need(REVIEWS / "valid.jsonl")), eval_limit=8, eval_every=5, eval_accuracy=4))
    train(TrainConfig(**common, out=str(root / "r2"), lora=LoraConfig(r=2, alpha=4, **lora), seed=1, valid_file="none"))
    return root, folder


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)


def test_real_run_numbers_equal_a_computation_from_the_adapter_files(runs, tmp_path):
    root, base = runs
    adapter = root / "r4" / "adapter"
    result = inspect_adapter(adapter, base=base)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    W_all = load_file(base / "model.safetensors")
    names = [m["name"] for m in result["modules"]]
    assert len(names) == 2 * len(BLOCK_LINEARS) and result["base"] == str(base)
    for m in result["modules"]:
        A, B = (tensors[PEFT_PREFIX + m["name"] + f".lora_{x}.weight"].double() for x in "AB")
        delta = cfg["lora_alpha"] / cfg["r"] * B @ A                    # (out, in), formed in full
        W = W_all[m["name"] + ".weight"].double()
        U, S, Vh = torch.linalg.svd(delta)
        r = cfg["r"]
        assert m["delta_norm"] == pytest.approx(torch.linalg.matrix_norm(delta).item(), rel=1e-3)
        assert m["singular_values"][0] == pytest.approx(torch.linalg.svdvals(delta)[0].item(), rel=1e-3)
        assert m["relative_update"] == pytest.approx((delta.norm() / W.norm()).item(), rel=1e-3)
        assert m["amplification"] == pytest.approx((delta.norm() / (U[:, :r].T @ W @ Vh[:r].T).norm()).item(),
                                                   rel=1e-3)
        assert m["delta_norm"] > 0   # ten steps at lr 1e-2 moved every module


def test_real_run_clis_write_json_and_pictures(runs, tmp_path):
    root, base = runs
    done = cli("minicalm", "stats", str(root / "r4" / "adapter"), "--compare", str(root / "r2" / "adapter"),
               "--out", str(tmp_path / "cmp"))
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "cmp" / "adapter_stats.json").read_text())
    assert result["base"] == str(base)   # the default: the adapter config's base_model_name_or_path
    assert torch.tensor(result["compare"]["mean"]).shape == (4, 2)
    for name in ("update_per_layer", "singular_values", "subspace_similarity"):
        assert_png(tmp_path / "cmp" / f"{name}.png")

    done = cli("minicalm", "stats", str(root / "r2" / "adapter"), "--out", str(tmp_path / "one"))
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "one" / "adapter_stats.json").read_text())["compare"] is None
    assert sorted(p.name for p in (tmp_path / "one").glob("*.png")) == ["singular_values.png", "update_per_layer.png"]

    done = cli("minicalm", "plot", str(root / "r4"))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (root / "r4" / "plots").glob("*.png")) == [
        "grad_norm.png", "loss.png", "lr.png", "tokens_per_s.png"]
    for p in (root / "r4" / "plots").glob("*.png"):
        assert_png(p)
