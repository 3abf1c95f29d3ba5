"""LoRA's variants (variants.py) against peft 0.21 on the same weights, tiny configs, fp32, dropout 0: DoRA, rsLoRA,
PiSSA (full and randomized SVD), OLoRA, Gaussian init, LoRA+. For each: the initial A, B (and residual base) equal
peft's where they are derived from W; the logits, the loss and every trainable gradient equal peft's; minicalm's
saved adapter loads into peft on the original base with the same logits, and peft's into minicalm; merging then
unmerging restores the weights. And the variants through train_lora.py: the flags, resume, evaluation, the
inspector and the planner."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import FP32_REL, assert_close_to_scale, hf_tiny
from minicalm import load_model
from minicalm.io.adapter import load_adapter, save_adapter
from minicalm.config import BLOCK_LINEARS
from minicalm.lora import apply_lora, lora_disabled, lora_layers, merge_lora, unmerge_lora
from minicalm.variants import loraplus_groups

IDS = torch.tensor([[3, 17, 42, 5, 99, 0, 64, 7], [1, 2, 3, 4, 5, 6, 7, 8]])
R, ALPHA = 4, 8
# name: the keyword arguments of apply_lora and of peft's LoraConfig (PEFT's own names on both sides)
VARIANTS = {"dora": dict(use_dora=True), "rslora": dict(use_rslora=True), "dora-rslora": dict(use_dora=True,
            use_rslora=True), "gaussian": dict(init_lora_weights="gaussian"), "pissa": dict(init_lora_weights="pissa"),
            "pissa_niter_2": dict(init_lora_weights="pissa_niter_2"), "olora": dict(init_lora_weights="olora"),
            "olora-rslora": dict(init_lora_weights="olora", use_rslora=True)}
RESIDUAL = ("pissa", "pissa_niter_2", "olora", "olora-rslora")   # A, B derived from W; the base becomes a residual


def ours_and_peft(folder, kw: dict):
    """The same checkpoint with the variant on both sides, built from the same RNG state (randomized SVD)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(0)
    mine = {("init" if k == "init_lora_weights" else k): v for k, v in kw.items()}   # LoraConfig's name for it
    ours = apply_lora(load_model(folder), targets=BLOCK_LINEARS, r=R, alpha=ALPHA, dropout=0.0, **mine)
    torch.manual_seed(0)
    hf = GPTNeoXForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    theirs = get_peft_model(hf, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(BLOCK_LINEARS),
                                           task_type="CAUSAL_LM", **kw))
    return ours, theirs


def peft_name(name: str) -> str:
    """minicalm's parameter name -> peft's: adapter name "default" inserted, DoRA's m a module with a weight."""
    name = name.replace("lora_A.weight", "lora_A.default.weight").replace("lora_B.weight", "lora_B.default.weight")
    return "base_model.model." + name.replace("lora_magnitude_vector", "lora_magnitude_vector.default.weight")


def perturb(ours, theirs, seed: int = 1) -> None:
    """Move every trainable tensor off its initial value (B = 0 and m = ||W|| would hide most bugs), the same on
    both sides."""
    g = torch.Generator().manual_seed(seed)
    theirs_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1 * (p.abs().mean() + 0.1))
                theirs_params[peft_name(name)].copy_(p)


def check_residual_init(ours, theirs, folder, exact: bool) -> None:
    """PiSSA / OLoRA: the residual base plus s B A is the original W; A, B and the residual equal peft's, derived
    from the same W. A randomized SVD draws its own random start on each side: there, s B A must hold most of the
    energy of W's top-r part and no more than all of it, and peft takes our residual base, so that the rest of the
    test compares the same weights."""
    params, original = dict(theirs.named_parameters()), load_model(folder)
    for name, layer in lora_layers(ours).items():
        W = original.get_submodule(name).weight
        assert_close_to_scale(layer.weight + layer.delta(), W, msg=name)
        their_base = params[f"base_model.model.{name}.base_layer.weight"]
        if exact:
            for part in ("lora_A", "lora_B"):
                assert_close_to_scale(getattr(layer, part).weight, params[peft_name(f"{name}.{part}.weight")],
                                      msg=f"{name}.{part}")
            assert_close_to_scale(layer.weight, their_base, msg=name)
        else:
            top = torch.linalg.svdvals(W)[:R].norm()              # ||W's top-r part||_F
            assert 0.5 * top <= layer.delta().norm() <= (1 + 1e-5) * top, name
            with torch.no_grad():
                their_base.copy_(layer.weight)


def step_grads(model, ids) -> tuple[torch.Tensor, torch.Tensor, dict]:
    logits = model(ids[:, :-1])
    logits = logits if isinstance(logits, torch.Tensor) else logits.logits
    loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_loss_and_gradients_equal_peft(tmp_path, variant):
    folder, _ = hf_tiny(tmp_path)
    ours, theirs = ours_and_peft(folder, VARIANTS[variant])
    if variant in RESIDUAL:
        check_residual_init(ours, theirs, folder, exact=variant != "pissa_niter_2")
    if "dora" in variant:     # m starts at the row norms of W
        for name, layer in lora_layers(ours).items():
            assert_close_to_scale(layer.lora_magnitude_vector, layer.weight.norm(dim=1), msg=name)
    perturb(ours, theirs)
    ours.train(), theirs.train()
    ours_logits, ours_loss, ours_grads = step_grads(ours, IDS)
    their_logits, their_loss, their_grads = step_grads(theirs, IDS)
    assert_close_to_scale(ours_logits, their_logits)
    assert abs(ours_loss - their_loss) <= FP32_REL * their_loss
    assert len(ours_grads) == len(their_grads) == 2 * len(BLOCK_LINEARS) * 2 * (1.5 if "dora" in variant else 1)
    for name, grad in ours_grads.items():
        assert_close_to_scale(grad, their_grads[peft_name(name)], msg=name)


@pytest.mark.parametrize("variant", VARIANTS)
def test_adapter_files_cross_both_ways_on_the_original_base(tmp_path, variant):
    from peft import PeftModel
    from transformers import GPTNeoXForCausalLM

    folder, _ = hf_tiny(tmp_path)
    ours, theirs = ours_and_peft(folder, VARIANTS[variant])
    if variant in RESIDUAL:   # peft's way to save for the original base: the initial adapter, kept for conversion
        theirs.peft_config["default"].init_lora_weights = True
        theirs.save_pretrained(tmp_path / "init")
        theirs.peft_config["default"].init_lora_weights = VARIANTS[variant]["init_lora_weights"]
    perturb(ours, theirs)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        want = ours(IDS)
    original = lambda: GPTNeoXForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()   # noqa: E731

    # minicalm -> peft, on the original checkpoint (a residual-base adapter was saved as a plain LoRA of rank 2r)
    save_adapter(ours, tmp_path / "ours", str(folder))
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (cfg["use_dora"], cfg["use_rslora"]) == ("dora" in variant, "rslora" in variant)
    assert (cfg["r"], cfg["init_lora_weights"]) == ((2 * R, True) if variant in RESIDUAL else (R, VARIANTS[
        variant].get("init_lora_weights", True)))
    with torch.no_grad():
        assert_close_to_scale(PeftModel.from_pretrained(original(), tmp_path / "ours")(input_ids=IDS).logits, want)

    # peft -> minicalm: its file (converted for the original base where PEFT converts) into a model without LoRA
    extra = {"path_initial_model_for_weight_conversion": str(tmp_path / "init")} if variant in RESIDUAL else {}
    theirs.save_pretrained(tmp_path / "peft", **extra)
    if "dora" in variant:   # the same tensors under the same keys
        assert load_file(tmp_path / "peft" / "adapter_model.safetensors").keys() == \
            load_file(tmp_path / "ours" / "adapter_model.safetensors").keys()
    with torch.no_grad():
        assert_close_to_scale(load_adapter(load_model(folder), tmp_path / "peft")(IDS), theirs(input_ids=IDS).logits)


def test_an_unconverted_residual_adapter_loads_as_peft_loads_it(tmp_path):
    """A PiSSA adapter peft saved without conversion applies to the residual base: like peft, minicalm derives the
    residual again from the original weights and then loads A and B."""
    from peft import PeftModel
    from transformers import GPTNeoXForCausalLM

    folder, _ = hf_tiny(tmp_path)
    ours, theirs = ours_and_peft(folder, VARIANTS["pissa"])
    perturb(ours, theirs)
    theirs.save_pretrained(tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    loaded = load_adapter(load_model(folder), tmp_path / "peft")
    reloaded = PeftModel.from_pretrained(GPTNeoXForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(),
                                         tmp_path / "peft")
    with torch.no_grad():
        assert_close_to_scale(loaded(IDS), ours.eval()(IDS))
        assert_close_to_scale(loaded(IDS), reloaded(input_ids=IDS).logits)
    with pytest.raises(ValueError, match="residual"):   # its base alone is not the original model
        with lora_disabled(loaded):
            pass


@pytest.mark.parametrize("variant", ["dora", "dora-rslora", "olora"])
def test_merge_then_unmerge_restores_the_weights(tmp_path, variant):
    folder, _ = hf_tiny(tmp_path)
    ours, theirs = ours_and_peft(folder, VARIANTS[variant])
    perturb(ours, theirs)
    ours.eval()
    before = {n: m.weight.clone() for n, m in lora_layers(ours).items()}
    with torch.no_grad():
        unmerged = ours(IDS)
        merge_lora(ours)
        assert_close_to_scale(ours(IDS), unmerged)
        theirs.eval().merge_adapter()
        for name, layer in lora_layers(ours).items():   # the same merged weight as peft's
            assert_close_to_scale(layer.weight, dict(theirs.named_parameters())[
                f"base_model.model.{name}.base_layer.weight"], msg=name)
        unmerge_lora(ours)
        assert_close_to_scale(ours(IDS), unmerged)
    for name, layer in lora_layers(ours).items():
        assert_close_to_scale(layer.weight, before[name], rel=1e-6, msg=name)


def test_loraplus_groups_equal_peft_s(tmp_path):
    """B and the 1-D parameters (DoRA's m) at lr x ratio, A at lr: per parameter, the learning rates of peft's
    create_loraplus_optimizer."""
    from peft.optimizers import create_loraplus_optimizer

    folder, _ = hf_tiny(tmp_path)
    ours, theirs = ours_and_peft(folder, VARIANTS["dora"])
    ours_lr = {n: g["lr"] for g in loraplus_groups(ours, 1e-3, 16.0) for p in g["params"]
               for n, q in ours.named_parameters() if q is p}
    opt = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0)
    their_lr = {n: g["lr"] for g in opt.param_groups for p in g["params"] for n, q in theirs.named_parameters()
                if q is p}
    assert len(ours_lr) == len(their_lr) == 3 * 2 * len(BLOCK_LINEARS)
    assert {peft_name(n): lr for n, lr in ours_lr.items()} == pytest.approx(their_lr)
    assert sorted(set(ours_lr.values())) == pytest.approx([1e-3, 16e-3])


@pytest.mark.parametrize("kw, message", [
    (dict(init="svd"), r"LoraConfig.init: 'svd': expected one of default, gaussian"),
    (dict(init="pissa", use_dora=True), "LoraConfig.init: pissa with use_dora"),
])
def test_bad_variant_settings_are_refused_before_the_model_changes(tmp_path, kw, message):
    folder, _ = hf_tiny(tmp_path)
    model = load_model(folder)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        apply_lora(model, r=R, **kw)
    assert not lora_layers(model) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- through train_lora.py's code path

def run_config(folder, out, lora=None, **kw):
    """Small settings; `lora` holds LoraConfig settings beside the defaults here (r 2, alpha 4, two targets)."""
    from conftest import REVIEWS
    from minicalm.config import LoraConfig
    from minicalm.train import TrainConfig

    adapter = LoraConfig(**dict(r=2, alpha=4, dropout=0.0, targets=("query_key_value", "dense_4h_to_h")) | (lora or {}))
    return TrainConfig(**dict(model=str(folder), train_file=str(REVIEWS / "train.jsonl"), valid_file="none",
                              out=str(out), limit_train=32, batch_size=8, micro_batch_size=8, max_len=128, lr=1e-2,
                              warmup_steps=1, max_steps=4, save_every=0, lora=adapter, seed=0, device="cpu",
                              dtype="float32", log=False) | kw)


def losses(out) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()]


def test_dora_rslora_loraplus_run_resumes_exactly(base, tmp_path):
    from minicalm.train import train

    kw = dict(lora=dict(use_dora=True, use_rslora=True), loraplus_lr_ratio=4.0)
    train(run_config(base[0], tmp_path / "once", **kw))
    train(run_config(base[0], tmp_path / "twice", max_steps=2, **kw))
    train(run_config(base[0], tmp_path / "twice", resume=True, **kw))
    assert losses(tmp_path / "twice") == losses(tmp_path / "once") and len(losses(tmp_path / "once")) == 4
    cfg = json.loads((tmp_path / "once" / "adapter" / "adapter_config.json").read_text())
    assert (cfg["use_dora"], cfg["use_rslora"], cfg["r"], cfg["lora_alpha"]) == (True, True, 2, 4)
    with pytest.raises(ValueError, match="--resume: .* --use-dora True now False"):
        train(run_config(base[0], tmp_path / "twice", resume=True, max_steps=6))


def test_a_pissa_run_is_saved_for_the_original_base(base, tmp_path):
    """The run trains on the residual base in memory; its adapter (rank 2r) on the untouched checkpoint gives the
    trained model's logits, so eval.py --adapter needs nothing more."""
    from minicalm.train import train

    res = train(run_config(base[0], tmp_path / "run", lora=dict(init="pissa"), max_steps=3))
    cfg = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["init_lora_weights"]) == (4, 8, True)
    x = torch.randint(0, 500, (2, 16))
    with torch.no_grad():
        loaded = load_adapter(load_model(base[0]), tmp_path / "run" / "adapter")
        assert_close_to_scale(loaded(x), res["model"].eval()(x))


def test_the_inspector_reports_dora_s_magnitude_change(base, tmp_path):
    from minicalm.tools.adapter_stats import inspect_adapter
    from minicalm.train import train

    train(run_config(base[0], tmp_path / "run", lora=dict(use_dora=True)))
    stats = inspect_adapter(tmp_path / "run" / "adapter", base=base[0])
    assert stats["use_dora"] and len(stats["modules"]) == 4
    assert all(m["magnitude_change"] > 0 and m["relative_update"] > 0 for m in stats["modules"])


def test_the_planner_counts_dora_s_extra_memory_and_work():
    from minicalm.config import LoraConfig
    from minicalm.tools.plan import PlanConfig, plan

    lora, dora = (plan(PlanConfig("tiny", 4, 64, shared_prefix=0, lora=LoraConfig(use_dora=d), dtype="float32"))
                  for d in (False, True))
    assert dora.trainable_params == lora.trainable_params + 2 * 3 * 64   # m: one per row of query_key_value
    assert dora.peak_bytes > lora.peak_bytes and dora.step_flops > lora.step_flops


def test_train_lora_names_the_flag_of_a_bad_variant(base, tmp_path):
    import subprocess
    import sys

    from conftest import REVIEWS, ROOT

    done = subprocess.run([sys.executable, str(ROOT / "train_lora.py"), "--model", str(base[0]), "--train-file",
                           str(REVIEWS / "train.jsonl"), "--valid-file", "none", "--lora-init", "svd", "--device",
                           "cpu", "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("train_lora.py: error: --lora-init: 'svd': expected one of")
    assert not (tmp_path / "run").exists()
