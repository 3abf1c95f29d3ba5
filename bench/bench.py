"""minicalm vs transformers + peft on the same work, same random weights, in one process.

    python bench/bench.py [--size small|tiny] [--part all|training|variants|qlora|small|free-form|choices|serve]
                          [--reps N] [--device cpu|cuda]

A random transformers GPTNeoXForCausalLM is saved with save_pretrained and loaded by both sides (minicalm through
minicalm.load_model), LoRA r=8 alpha=16 dropout 0.05 on query_key_value is added to both, and the adapter A
matrices are copied so that both start from identical weights. Each repetition times minicalm and transformers
back to back, alternating which goes first; the table reports medians of the rates and of the paired ratios
(ratio = minicalm rate / transformers rate, above 1 means minicalm is faster). Writes bench/results.json.

Seven parts: `training` (the main job's step on 7B-shaped proxies, where the LM head is a small share of the work,
and the whole train_lora.py step against transformers + peft), `variants` (DoRA's step, PiSSA's initialisation),
`qlora` (the step on an NF4 base against the full-precision one and against transformers + peft + bitsandbytes'
4-bit), `small` (open-calm-small's shape: a training step, evaluation, decoding), `free-form` (free-form
evaluation's greedy answers against transformers' generate, in generated tokens/s, on the 7B-shaped proxy and
open-calm-small's shape), `choices` (a multiple-choice question's five choices scored by log-likelihood: one batch
on copies of each row's prompt cache, against one forward per choice and against transformers' prompt + choice per
sequence, as the JP harness scores them) and `serve` (a batch whose rows use 4 adapters against the same batch on
one; python -m minicalm serve under load against --max-batch 1 and against transformers + peft's
generate(adapter_names=...) in static batches, in generated tokens/s and latency). A part run alone keeps the other
parts' entries of --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import minicalm
from minicalm.config import LoraConfig
from minicalm.io.files import write_json
from minicalm.io.tokenizer import train_tokenizer
from minicalm.lora import trainable_parameters
from minicalm.loss import IGNORE_INDEX, answer_loss, shared_prefix_len
from minicalm.tasks import data
from minicalm.generate import left_pad, prefill
from minicalm.tasks.task import ALPACA, JCOMMONSENSEQA, MARC_JA
from minicalm.tools.evaluate import Answers, evaluate_rows, score_choices
from minicalm.tools.run import Processes
from minicalm.train import TrainConfig, global_batch, setup, train_step

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TOKENIZER = SHARED / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"
REVIEWS = SHARED / "data" / "amazon-ja-reviews"
SIZES = {   # open-calm-small's shape, and a quick one; vocab 50304 covers the GPT-NeoX tokenizer's 50277 ids
    "small": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
}
# OpenCALM-7B's proportions at CPU size: hidden 512, 8 layers (hs 64). With a 4,000-token vocabulary the LM head
# is 7.5% of a full forward (OpenCALM-7B: 3%), so the body's work decides the step.
PROXY_7B = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=2048)
LORA = dict(r=8, alpha=16, dropout=0.05, targets=("query_key_value",))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds): with one thread and other jobs on the machine, CPU time
    leaves out the time we wait for a core, so it is the steadier of the two on CPU."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def paired(name: str, ours, theirs, work: float | Callable[[], float], unit: str, reps: int, device,
           names=("minicalm", "transformers+peft")) -> dict:
    """Warm up each side once, then `reps` pairs alternating who goes first; rates are work / seconds. `work` may be
    a function, asked after the warm-up (what a call does, e.g. the tokens it generates, is known once it has run)."""
    ours(), theirs()
    work = work() if callable(work) else work
    t_ours, t_theirs = [], []
    for i in range(reps):
        first, second = ((ours, t_ours), (theirs, t_theirs)) if i % 2 == 0 else ((theirs, t_theirs), (ours, t_ours))
        for fn, out in (first, second):
            out.append(timed(fn, device))
        print(f"  {name} rep {i + 1}/{reps}: {names[0]} {t_ours[-1][0]:.3f}s, {names[1]} {t_theirs[-1][0]:.3f}s "
              f"(CPU {t_ours[-1][1]:.3f}s, {t_theirs[-1][1]:.3f}s)", file=sys.stderr, flush=True)
    wall_o, cpu_o = zip(*t_ours)
    wall_t, cpu_t = zip(*t_theirs)
    return {"work": name, "unit": unit, "sides": list(names), "work_per_call": work, "minicalm_s": wall_o,
            "transformers_s": wall_t,
            "minicalm_cpu_s": cpu_o, "transformers_cpu_s": cpu_t,
            "minicalm": work / statistics.median(wall_o), "transformers": work / statistics.median(wall_t),
            "ratio": statistics.median(b / a for a, b in zip(wall_o, wall_t)),
            "ratio_cpu_time": statistics.median(b / a for a, b in zip(cpu_o, cpu_t))}


def build_models(shape: dict, device, dtype, folder: Path, vocab_size: int = 50304, tokenizer: Path = TOKENIZER,
                 dropout: float = LORA["dropout"], use_dora: bool = False):
    """The same random weights on both sides, with LoRA (DoRA); returns (minicalm model, peft model). The checkpoint
    folder (with tokenizer.json) stays for train_lora.py's step."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=vocab_size, rotary_pct=1.0, use_parallel_residual=False,
                        max_position_embeddings=2048, bos_token_id=0, eos_token_id=0, pad_token_id=1,
                        tie_word_embeddings=False, **shape)
    GPTNeoXForCausalLM(cfg).save_pretrained(folder)
    shutil.copy(tokenizer, folder / "tokenizer.json")
    ours = minicalm.load_model(folder, dtype=dtype, device=device)
    minicalm.apply_lora(ours, targets=LORA["targets"], r=LORA["r"], alpha=LORA["alpha"], dropout=dropout,
                        use_dora=use_dora)
    hf = GPTNeoXForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    theirs = get_peft_model(hf, PeftLoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=dropout,
                                               target_modules=list(LORA["targets"]), task_type="CAUSAL_LM",
                                               use_dora=use_dora))
    with torch.no_grad():   # identical adapters: copy our random A and DoRA's m (B is zero on both sides)
        mine = dict(ours.named_parameters())
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(mine[name.removeprefix("base_model.model.").replace(".default", "").removesuffix(
                    "_vector.weight") + ("_vector" if "magnitude" in name else "")])
    return ours, theirs


def train_lora_run(folder: Path, out: Path, device, batch_size: int, micro_batch_size: int, share: bool):
    """train_lora.py's set-up (minicalm.train.setup, one process on `device`) on the bench checkpoint and the real
    reviews; its train_step(run, batch) is the whole step the script times (micro-batches, clipping, AdamW)."""
    cfg = TrainConfig(model=str(folder), train_file=str(REVIEWS / "train.jsonl"), valid_file="none", out=str(out),
                      limit_train=512, batch_size=batch_size, micro_batch_size=micro_batch_size, max_steps=10_000,
                      lora=LoraConfig(**LORA), share_prefix=share, device=device.type,
                      dtype="float32" if device.type == "cpu" else "bfloat16", log=False)
    return setup(cfg, Processes(rank=0, world=1, device=device))


def median_batch(run) -> list[int]:
    """The global batch of the first epoch with the median padded length: a typical step, not the shortest or
    longest reviews."""
    batches = [global_batch(run, i) for i in range(run.steps_per_epoch)]
    return sorted(batches, key=lambda b: max(len(run.train_set[j].input_ids) for j in b))[len(batches) // 2]


def same_step(run, batch: list[int]):
    """train_step on the same global batch each time (the work of one step, repeatable)."""
    return lambda: train_step(run, batch)


def scored(y: torch.Tensor) -> int:
    """Tokens a micro-batch's loss scores (labels after the first that are not IGNORE_INDEX)."""
    return int((y[:, 1:] != IGNORE_INDEX).sum())


def hf_global_step(model, opt, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]):
    """What a transformers + peft user writes for the same global batch: labels=..., the mean loss re-weighted by
    each micro-batch's share of the scored tokens, backward, clipping at 1.0, AdamW."""
    n = sum(scored(y) for _, y in micro_batches)

    def step():
        for x, y in micro_batches:
            loss = model(input_ids=x, labels=y).loss   # full (B, T, V) logits, mean over labelled tokens
            (loss * scored(y) / n).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def adamw(model) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


@dataclass
class Bench:
    """What every measurement needs: the settings, where to run, scratch space, and the facts it records."""
    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    tmp: Path
    info: dict

    def paired(self, name: str, ours, theirs, work: float | Callable[[], float], unit: str,
               names=("minicalm", "transformers+peft")):
        return paired(name, ours, theirs, work, unit, self.args.reps, self.device, names)


def proxy_tokenizer(b: Bench) -> minicalm.Tokenizer:
    """A 4,000-token BPE trained on the reviews, as the miniature trains its own (made once per run): the prompt's
    shared prefix is 59 of a mean 121 tokens (README: the shared prompt prefix), the less flattering of the two
    tokenizers."""
    path = b.tmp / "bpe" / "tokenizer.json"
    if path.is_file():
        return minicalm.load_tokenizer(path)
    texts = [r.text for r in data.read_jsonl(REVIEWS / "train.jsonl")]
    return train_tokenizer(texts + [MARC_JA.format({"sentence": ""})] * 100, path, 4000)


def proxy_7b(b: Bench) -> list[dict]:
    """The main job's step where the LM head is a small share of the work (7B-shaped proxy, 4,000-token vocabulary):
    minicalm's public API against transformers + peft (the same body), and train_lora.py's step with the shared
    prefix against --no-share-prefix."""
    bpe = proxy_tokenizer(b)
    ours, theirs = build_models(PROXY_7B, b.device, b.dtype, b.tmp / "proxy", vocab_size=4000, tokenizer=bpe.path)
    runs = {share: train_lora_run(b.tmp / "proxy", b.tmp / f"run-{share}", b.device, 16, 16, share)
            for share in (True, False)}
    batch = median_batch(runs[True])
    x, y = (t.to(b.device) for t in data.collate([runs[True].train_set[i] for i in batch], bpe.pad_token_id))
    P, n_tokens = shared_prefix_len(x.tolist()), int((x != bpe.pad_token_id).sum())
    with FlopCounterMode(display=False) as full:
        ours(x)
    with FlopCounterMode(display=False) as head:
        ours.embed_out(torch.zeros(x.numel(), ours.config.hidden_size, device=b.device, dtype=b.dtype))
    b.info["proxy_7b"] = {"shape": PROXY_7B, "vocab": 4000, "batch": list(x.shape), "shared_tokens": P,
                          "real_tokens": n_tokens,
                          "lm_head_share_of_forward": head.get_total_flops() / full.get_total_flops()}
    theirs_step = hf_global_step(theirs.train(), adamw(theirs), [(x, y)])
    return [b.paired(f"7B-shaped proxy: LoRA step through the public API (model(x), cross-entropy), no sharing, "
                     f"{x.shape[0]} prompts", public_api_step(ours, x, y), theirs_step, n_tokens, "tokens/s"),
            b.paired(f"7B-shaped proxy: train_lora.py step, batch {x.shape[0]} in one micro-batch, shared prefix "
                     f"({P} of {x.shape[1]} tokens) vs --no-share-prefix", same_step(runs[True], batch),
                     same_step(runs[False], batch), n_tokens, "tokens/s", names=("shared", "no-share-prefix"))]


def wide_train_step(b: Bench) -> dict:
    """The whole train_lora.py step against transformers + peft where the head is heavy (vocab 50304, the GPT-NeoX
    tokenizer): batch 8 as 2 micro-batches of 4."""
    _, theirs = build_models(PROXY_7B, b.device, b.dtype, b.tmp / "wide")
    run = train_lora_run(b.tmp / "wide", b.tmp / "run-wide", b.device, 8, 4, True)
    batch = median_batch(run)
    examples = [run.train_set[i] for i in batch]
    micro = [tuple(t.to(b.device) for t in data.collate(examples[k:k + 4], run.tok.pad_token_id)) for k in (0, 4)]
    opt_theirs = adamw(theirs)
    theirs.train()
    return b.paired("train_lora.py step vs transformers + peft, hidden 512, 8 layers, vocab 50304, batch 8 as 2 "
                    "micro-batches of 4", same_step(run, batch), hf_global_step(theirs, opt_theirs, micro),
                    sum(len(e.input_ids) for e in examples), "tokens/s")


def matmul_flops(M: int, K: int, N: int, device, dtype, reps: int) -> float:
    """FLOP/s of a bare (M, K) x (K, N) matmul, median of reps."""
    a, b = torch.randn(M, K, device=device, dtype=dtype), torch.randn(K, N, device=device, dtype=dtype)
    a @ b
    target = 2e9 if device.type == "cpu" else 2e12   # FLOPs per timing, so that it is not all launch overhead
    n = max(1, int(target // (2 * M * K * N)))
    times = [timed(lambda: [a @ b for _ in range(n)], device) for _ in range(reps)]
    return 2 * M * K * N * n / min(wall for wall, _ in times)   # the best run: the least disturbed by other jobs


def machine(args) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    import peft
    import transformers
    return {"cpu": cpu, "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "python": platform.python_version(),
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "loadavg_start": os.getloadavg()}


def variants_7b(b: Bench) -> list[dict]:
    """LoRA's variants on the 7B-shaped proxy: DoRA's step against plain LoRA's (minicalm, the public API), and
    against peft's DoRA on the same work (dropout 0, where both reuse W x: with dropout peft recomputes W on the
    dropped input); PiSSA's initialisation of OpenCALM-7B's layers with a full and a randomized SVD."""
    bpe = proxy_tokenizer(b)
    models = {dora: build_models(PROXY_7B, b.device, b.dtype, b.tmp / f"dora-{dora}", vocab_size=4000,
                                 tokenizer=bpe.path, dropout=0.0, use_dora=dora) for dora in (False, True)}
    run = train_lora_run(b.tmp / "dora-False", b.tmp / "run-variants", b.device, 16, 16, False)
    x, y = (t.to(b.device) for t in data.collate([run.train_set[i] for i in median_batch(run)], bpe.pad_token_id))
    n_tokens, rows = int((x != bpe.pad_token_id).sum()), []
    steps = {"lora": public_api_step(models[False][0], x, y), "dora": public_api_step(models[True][0], x, y),
             "peft-dora": hf_global_step(models[True][1].train(), adamw(models[True][1]), [(x, y)])}
    rows.append(b.paired(f"7B-shaped proxy: DoRA step vs LoRA step, both minicalm, {x.shape[0]} prompts",
                         steps["dora"], steps["lora"], n_tokens, "tokens/s", names=("dora", "lora")))
    rows.append(b.paired(f"7B-shaped proxy: DoRA step vs transformers + peft's DoRA, {x.shape[0]} prompts, dropout 0",
                         steps["dora"], steps["peft-dora"], n_tokens, "tokens/s"))
    for out, name in ((12288, "query_key_value"), (16384, "dense_h_to_4h")):   # OpenCALM-7B: 4096 in
        rows.append(pissa_init_time(b, out, 4096, name))
    return rows


def qlora_7b(b: Bench) -> list[dict]:
    """QLoRA on the 7B-shaped proxy, the public API step: minicalm's NF4 base (nf4.py, double-quantized scales)
    against its full-precision base, and against transformers + peft on bitsandbytes' NF4 Linear4bit (double
    quantization, compute in the run's dtype), the same random weights and adapters."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, GPTNeoXForCausalLM

    bpe = proxy_tokenizer(b)
    full, _ = build_models(PROXY_7B, b.device, b.dtype, b.tmp / "qlora", vocab_size=4000, tokenizer=bpe.path)
    ours = minicalm.load_model(b.tmp / "qlora", dtype=b.dtype, device=b.device, quantize="nf4")
    minicalm.apply_lora(ours, targets=LORA["targets"], r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"])
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=b.dtype)
    hf = GPTNeoXForCausalLM.from_pretrained(b.tmp / "qlora", quantization_config=q, dtype=b.dtype,
                                            device_map=b.device.type)
    theirs = get_peft_model(hf, PeftLoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"],
                                               lora_dropout=LORA["dropout"], target_modules=list(LORA["targets"]),
                                               task_type="CAUSAL_LM"))
    with torch.no_grad():
        mine = dict(full.named_parameters())
        for model in (ours, theirs):
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(mine[name.removeprefix("base_model.model.").replace(".default", "")])
    run = train_lora_run(b.tmp / "qlora", b.tmp / "run-qlora", b.device, 16, 16, False)
    x, y = (t.to(b.device) for t in data.collate([run.train_set[i] for i in median_batch(run)], bpe.pad_token_id))
    n_tokens = int((x != bpe.pad_token_id).sum())
    b.info["qlora"] = {"bitsandbytes": __import__("bitsandbytes").__version__,
                       "base_bytes": {"nf4": weight_bytes(ours), "full": weight_bytes(full)}}
    step = public_api_step(ours, x, y)
    return [b.paired(f"7B-shaped proxy: LoRA step on an NF4 base vs on the full-precision base, both minicalm, "
                     f"{x.shape[0]} prompts", step, public_api_step(full, x, y), n_tokens, "tokens/s",
                     names=("nf4", "full precision")),
            b.paired(f"7B-shaped proxy: QLoRA step vs transformers + peft + bitsandbytes' NF4, {x.shape[0]} prompts",
                     step, hf_global_step(theirs.train(), adamw(theirs), [(x, y)]), n_tokens, "tokens/s")]


def weight_bytes(model) -> int:
    """Bytes of the model's parameters and buffers (NF4 codes and scales included)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def public_api_step(model, x, y):
    """A LoRA step as a user of the model writes it: model(x) (B, T, V), cross-entropy, backward, AdamW."""
    opt = adamw(model)
    model.train()

    def step():
        F.cross_entropy(model(x)[:, :-1].flatten(0, 1), y[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def pissa_init_time(b: Bench, out_features: int, in_features: int, name: str) -> dict:
    """Seconds to initialise PiSSA (r 8) on one (out, in) layer: the full SVD and the randomized one (4 iterations),
    fp32, the threads of the run."""
    from minicalm.lora import LoRALinear
    from minicalm.variants import init_lora

    linear = torch.nn.Linear(in_features, out_features, bias=False, device=b.device, dtype=b.dtype)
    times = {}
    for how, reps in (("pissa", 1), ("pissa_niter_4", b.args.reps)):   # the full SVD takes minutes on one thread
        times[how] = statistics.median(timed(lambda: init_lora(LoRALinear(linear, LoraConfig(r=8, alpha=16)), how),
                                             b.device)[0] for _ in range(reps))
    b.info.setdefault("pissa_init_seconds", {})[name] = times
    return {"work": f"PiSSA initialisation of OpenCALM-7B's {name} ({out_features} x {in_features}, r 8)",
            "text": f"full SVD {times['pissa']:.1f} s, randomized SVD (4 iterations) {times['pissa_niter_4']:.2f} s"}


@dataclass
class Small:
    """open-calm-small's shape (vocab 50304, the GPT-NeoX-20B tokenizer) on both sides, built once."""
    ours: torch.nn.Module
    theirs: torch.nn.Module
    tok: minicalm.Tokenizer
    enc: data.PromptEncoder


def small_models(b: Bench) -> Small:
    tok = minicalm.load_tokenizer(TOKENIZER)
    ours, theirs = build_models(SIZES[b.args.size], b.device, b.dtype, b.tmp / "small")
    b.info["params"], b.info["attn_implementation"] = trainable_parameters(ours)[1], theirs.config._attn_implementation
    return Small(ours, theirs, tok, data.PromptEncoder(tok, max_len=256))


def small_train_step(b: Bench, m: Small) -> tuple[dict, dict]:
    """A LoRA training step on a length-grouped batch of real prompts, as train.py batches them: minicalm's
    answer_loss(...).backward() (the shared prefix once, the LM head only at the answer) against transformers +
    peft's labels=... loss; and the FLOP/s minicalm's step achieves against a bare matmul of a representative
    size."""
    examples, _ = data.encode_rows(m.enc, data.read_jsonl(REVIEWS / "train.jsonl", limit=256))
    idx = data.length_batches([len(e.input_ids) for e in examples], b.args.batch_size, seed=0)[0]
    x, y = (t.to(b.device) for t in data.collate([examples[i] for i in idx], m.tok.pad_token_id))
    n_target, n_tokens = scored(y), sum(len(examples[i].input_ids) for i in idx)
    shared = shared_prefix_len(x.tolist())   # the prompt's shared prefix, computed once per micro-batch as train() does
    b.info["train_batch"] = {"shape": list(x.shape), "real_tokens": n_tokens, "answer_tokens": n_target,
                             "shared_tokens": shared}
    with torch.no_grad():   # the same loss on both sides (dropout off), so both do the same work
        m.ours.eval(), m.theirs.eval()
        b.info["train_loss"] = {"minicalm": answer_loss(m.ours, x, y, prefix=shared).item() / n_target,
                                "transformers": m.theirs(input_ids=x, labels=y).loss.item()}
    m.ours.train(), m.theirs.train()
    opt_ours, opt_theirs = adamw(m.ours), adamw(m.theirs)

    def backward_ours():   # train_step's micro-batch: the summed answer loss over the batch's scored tokens
        (answer_loss(m.ours, x, y, prefix=shared) / n_target).backward()

    def step_ours():
        opt_ours.zero_grad(set_to_none=True)
        backward_ours()
        opt_ours.step()

    def step_theirs():
        opt_theirs.zero_grad(set_to_none=True)
        m.theirs(input_ids=x, labels=y).loss.backward()   # full (B, T, V) logits, mean over labelled tokens
        opt_theirs.step()

    row = b.paired(f"LoRA training step, {x.shape[0]} prompts, shared prefix", step_ours, step_theirs, n_tokens,
                   "tokens/s")
    with FlopCounterMode(display=False) as counter:
        backward_ours()
    opt_ours.zero_grad(set_to_none=True)
    m.ours.eval(), m.theirs.eval()
    (B, T), C = x.shape, m.ours.config.hidden_size
    mm_rep = matmul_flops(B * T, C, 3 * C, b.device, b.dtype, b.args.reps)
    achieved = counter.get_total_flops() / min(row["minicalm_s"])   # best against best, as for the matmul
    b.info["flops"] = {"step_flops": counter.get_total_flops(), "achieved_flops_per_s": achieved,
                       "matmul_shape": f"{B * T}x{C}x{3 * C}", "matmul_flops_per_s": mm_rep,
                       "fraction_of_matmul": achieved / mm_rep}
    return row, {"work": f"training step FLOP/s vs bare {B * T}x{C}x{3 * C} matmul (best runs)",
                 "text": f"{achieved / 1e9:.1f} GFLOP/s = {100 * achieved / mm_rep:.0f}% of {mm_rep / 1e9:.1f}"}


def left_padded_batches(prompts: list[list[int]], pad_id: int, device, size: int = 16):
    """(input_ids, attention_mask) batches of `size` prompts, left padded, as generate() takes them."""
    out = []
    for b0 in range(0, len(prompts), size):
        rows = prompts[b0:b0 + size]
        L = max(map(len, rows))
        ids = torch.tensor([[pad_id] * (L - len(p)) + p for p in rows], device=device)
        mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in rows], device=device)
        out.append((ids, mask))
    return out


def small_evaluation(b: Bench, m: Small) -> list[dict]:
    """Evaluation of the post's prompt: minicalm's evaluate_rows with its own batching (length-sorted, the shared
    prefix computed once) against transformers' generate on batches of 16, left padded, (a) on the same
    length-sorted batches, (b) in file order, as a plain evaluation loop (and the post's) batches them."""
    reviews = data.read_jsonl(REVIEWS / "valid.jsonl", limit=b.args.eval_reviews)
    in_order = [ids for ids, _ in m.enc.encode_prompts(reviews)]
    new_tokens = {}

    def eval_ours():
        out = evaluate_rows(m.ours, m.tok, reviews, mode="generate", batch_size=16, max_new_tokens=8, log=False)
        new_tokens["minicalm_rows_stopped_at_newline"] = sum("\n" in p["continuation"] for p in out["predictions"])

    def eval_theirs_on(batches, key):
        @torch.inference_mode()
        def run():
            new_tokens[key] = 0
            for ids, mask in batches:
                out = m.theirs.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8,
                                        pad_token_id=m.tok.pad_token_id, eos_token_id=m.tok.eos_token_id)
                new_tokens[key] += int((out[:, ids.shape[1]:] != m.tok.pad_token_id).sum())
        return run

    sorted_batches = left_padded_batches(sorted(in_order, key=len), m.tok.pad_token_id, b.device)
    file_batches = left_padded_batches(in_order, m.tok.pad_token_id, b.device)
    b.info["eval_padding"] = {name: round(1 - sum(int(k.sum()) for _, k in bs) / sum(k.numel() for _, k in bs), 3)
                              for name, bs in (("sorted", sorted_batches), ("file_order", file_batches))}
    rows = [b.paired(f"evaluation, {len(reviews)} reviews, vs generate on the same length-sorted batches", eval_ours,
                     eval_theirs_on(sorted_batches, "transformers_new_tokens_sorted"), len(reviews), "reviews/s"),
            b.paired(f"evaluation, {len(reviews)} reviews, vs generate on file-order batches", eval_ours,
                     eval_theirs_on(file_batches, "transformers_new_tokens_file_order"), len(reviews), "reviews/s")]
    b.info["eval_new_tokens"] = new_tokens   # ours stops a row at EOS or a newline token; generate at EOS only
    return rows


def small_decoding(b: Bench, m: Small) -> dict:
    """Greedy decoding at batch 1: one real prompt, 64 new tokens, no early stop on either side."""
    review = data.read_jsonl(REVIEWS / "valid.jsonl", limit=1)[0]
    prompt = torch.tensor([m.enc.encode_prompt(review)[0]], device=b.device)
    outs = {}

    def decode_ours():
        outs["minicalm"] = minicalm.greedy_generate(m.ours, prompt, 64, eos_token_id=None)

    @torch.inference_mode()
    def decode_theirs():
        outs["transformers"] = m.theirs.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                                 do_sample=False, max_new_tokens=64, min_new_tokens=64,
                                                 pad_token_id=m.tok.pad_token_id)

    row = b.paired(f"greedy decoding, batch 1, prompt {prompt.shape[1]} + 64 tokens", decode_ours, decode_theirs, 64,
                   "tokens/s")
    a, t = outs["minicalm"][0, prompt.shape[1]:], outs["transformers"][0, prompt.shape[1]:]
    b.info["decode"] = {"new_tokens": [len(a), len(t)], "same_tokens": int((a == t[:len(a)]).sum())}
    return row


ANSWER_TOKENS = 32   # the free-form answers' budget: a random model rarely writes EOS, so both sides write all of it
INSTRUCTION = "このレビューを読んだ感想を書いて。"


def free_form_rows(n: int) -> list[data.Row]:
    """The first n validation reviews as Alpaca rows: one instruction, the review as input, its label word as the
    reference (which only evaluate_rows' scoring reads)."""
    reviews = data.read_jsonl(REVIEWS / "valid.jsonl", limit=n)
    return [data.parse_row({"instruction": INSTRUCTION, "input": r.fields["sentence"],
                            "output": MARC_JA.labels[r.label]}, ALPACA, i) for i, r in enumerate(reviews)]


class KeptAnswers(Answers):
    """evaluate.py's Answers, keeping each row's new tokens to count and compare: text() sees every row's tokens (one
    per decoding step, padding after EOS) once when the task has no stop strings."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokens: list[list[int]] = []

    def text(self, tokens: list[int]) -> str:
        self.tokens.append(tokens)
        return super().text(tokens)


def up_to_eos(tokens: list[int], eos: int) -> list[int]:
    """A row's generated tokens, EOS included (both sides pad the row after it)."""
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


def free_form_answers(b: Bench, where: str, ours, theirs, tok: minicalm.Tokenizer, batch_size: int = 16) -> dict:
    """Free-form evaluation's greedy answers, in generated tokens/s: evaluate.py's Answers (the shared prompt prefix
    run once per evaluation, each row stopping at EOS or after ANSWER_TOKENS) against transformers' generate
    (do_sample=False, EOS as the stop, each prompt in full) on the same left-padded, length-sorted batches of the same
    prompts. Answers is timed directly: evaluate_rows' extra forward for the answers' loss is left out. Fails if the
    two sides' tokens differ."""
    task = dataclasses.replace(ALPACA, max_new_tokens=ANSWER_TOKENS, stop=None)
    enc = data.PromptEncoder(tok, 256, task)   # evaluate_rows' max_len
    rows = free_form_rows(b.args.free_form_reviews)
    prompts = sorted((ids for ids, _ in enc.encode_prompts(rows)), key=len)   # as evaluate_rows batches them
    shared, eos = prompts[0][:shared_prefix_len(prompts)], tok.eos_token_id   # as evaluate_rows shares it
    P = len(shared)
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    padded = left_padded_batches(prompts, tok.pad_token_id, b.device, batch_size)
    ours.eval(), theirs.eval()
    new = {}

    @torch.inference_mode()
    def answer_ours():
        answers = KeptAnswers(ours, tok, enc, ANSWER_TOKENS, likelihood=False)
        answers.share_prefix(shared)   # once per evaluation, as evaluate_rows does
        for batch in batches:
            answers([p[P:] for p in batch])
        new["minicalm"] = [up_to_eos(t, eos) for t in answers.tokens]

    @torch.inference_mode()
    def answer_theirs():
        out = []
        for ids, mask in padded:
            gen = theirs.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=ANSWER_TOKENS,
                                  pad_token_id=tok.pad_token_id, eos_token_id=eos)
            out += [up_to_eos(t, eos) for t in gen[:, ids.shape[1]:].tolist()]
        new["transformers"] = out

    def generated() -> int:
        """The tokens both sides generated in a call, once checked to be the same row by row."""
        ours_, theirs_ = new["minicalm"], new["transformers"]
        assert len(ours_) == len(theirs_) == len(prompts), "one answer per prompt on each side"
        differ = [i for i, (a, t) in enumerate(zip(ours_, theirs_)) if a != t]
        if differ:
            i = differ[0]
            raise RuntimeError(f"free-form answers, {where}: the two sides' greedy tokens differ in {len(differ)} of "
                               f"{len(prompts)} rows; the first, row {i} of the length-sorted prompts:\n"
                               f"  minicalm:     {ours_[i]}\n  transformers: {theirs_[i]}")
        b.info.setdefault("free_form", {})[where] = {
            "rows": len(prompts), "batch_size": batch_size, "max_new_tokens": ANSWER_TOKENS, "shared_tokens": P,
            "mean_prompt_tokens": round(sum(map(len, prompts)) / len(prompts), 1),
            "new_tokens": {side: sum(map(len, got)) for side, got in new.items()},
            "rows_ended_by_eos": {side: sum(r[-1:] == [eos] for r in got) for side, got in new.items()},
            "same_tokens": True}
        return sum(map(len, ours_))

    return b.paired(f"free-form answers, {where}: {len(prompts)} reviews, batch {batch_size}, up to {ANSWER_TOKENS} "
                    f"new tokens, shared prefix {P} tokens, vs generate on the same left-padded batches",
                    answer_ours, answer_theirs, generated, "generated tokens/s")


def free_form_7b(b: Bench) -> dict:
    """Free-form answers on the 7B-shaped proxy (its 4,000-token BPE), fresh models with identical adapters."""
    bpe = proxy_tokenizer(b)
    ours, theirs = build_models(PROXY_7B, b.device, b.dtype, b.tmp / "free-form", vocab_size=4000, tokenizer=bpe.path)
    return free_form_answers(b, "7B-shaped proxy", ours, theirs, bpe)


# ----------------------------------------------------------------------------- serving: many adapters, one batch

SERVE_ADAPTERS = {   # three adapters a server might hold: different ranks, scales and targets
    "qkv8": LoraConfig(r=8, alpha=16),
    "rs16": LoraConfig(r=16, alpha=16, use_rslora=True, targets=("query_key_value", "dense")),
    "mlp4": LoraConfig(r=4, alpha=8, targets=("dense_h_to_4h", "dense_4h_to_h")),
}


def random_adapter(folder: Path, out: Path, cfg: LoraConfig, seed: int) -> Path:
    """An adapter for the checkpoint in `folder` whose A and B are random (B not zero: it changes the answers)."""
    from minicalm.io.adapter import save_adapter
    model = minicalm.apply_lora(minicalm.load_model(folder), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return save_adapter(model, out, base=str(folder))


def serving_checkpoint(b: Bench, size: str, adapters: dict[str, LoraConfig]) -> tuple[Path, dict[str, Path]]:
    """A random GPT-NeoX of `size`'s shape (vocab 50304, the GPT-NeoX-20B tokenizer) and adapters for it."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    folder = b.tmp / f"serve-{size}-{len(adapters)}"
    if not folder.is_dir():
        torch.manual_seed(0)
        GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=50304, rotary_pct=1.0, use_parallel_residual=False,
                                         max_position_embeddings=2048, bos_token_id=0, eos_token_id=0, pad_token_id=1,
                                         tie_word_embeddings=False, **SIZES[size])).save_pretrained(folder)
        shutil.copy(TOKENIZER, folder / "tokenizer.json")
    return folder, {name: random_adapter(folder, folder.parent / f"{folder.name}-{name}", cfg, i)
                    for i, (name, cfg) in enumerate(adapters.items())}


def many_adapters(b: Bench, size: str, rows: int = 16, prompt: int = 64, steps: int = 32) -> list[dict]:
    """What serving many adapters in one batch costs (multi_lora.py): the same batch with its rows over 4 adapters
    against all its rows on one (LoRALinear), r 8 on query_key_value alike: a prefill of rows x prompt tokens, and
    `steps` decoding steps of the rows."""
    from minicalm.generate import Decoding, decode_one_token, prefill
    from minicalm.io.adapter import load_adapter, load_adapters
    from minicalm.multi_lora import row_adapters

    folder, dirs = serving_checkpoint(b, size, {f"a{i}": LoraConfig(r=8, alpha=16) for i in range(4)})
    multi = minicalm.load_model(folder, dtype=b.dtype, device=b.device).eval()
    load_adapters(multi, dirs)
    single = load_adapter(minicalm.load_model(folder, dtype=b.dtype, device=b.device), dirs["a0"]).eval()
    which = torch.arange(rows, device=b.device) % 4 + 1                     # rows over the 4 adapters
    x = torch.randint(2, 50000, (rows, prompt), generator=torch.Generator().manual_seed(0)).to(b.device)
    token = x[:, -1]

    def run(model, part):
        with torch.inference_mode(), row_adapters(model, which):
            _, after = prefill(model, x, extra=steps)   # decoding continues from here, each call over the same slots

        @torch.inference_mode()
        def call():
            with row_adapters(model, which):
                if part == "prefill":
                    prefill(model, x, extra=steps)
                    return
                state = Decoding(after.cache, after.positions.clone(), after.slot)
                for _ in range(steps):
                    decode_one_token(model, token, state)
        return call

    out = []
    for part, work in (("prefill", rows * prompt), ("decode", rows * steps)):
        name = (f"{size} shape: {rows} rows over 4 adapters vs the same rows on 1 adapter, " +
                (f"prefill of {prompt} tokens each" if part == "prefill" else f"{steps} decoding steps"))
        out.append(b.paired(name, run(multi, part), run(single, part), work, "tokens/s",
                            names=("4 adapters (multi_lora)", "1 adapter (LoRALinear)")))
    return out


def serving_requests(n: int, seed: int = 0) -> list[tuple[int, list[int], int]]:
    """n requests as (model index 0-3, prompt ids, max_tokens): real reviews cut to 16-96 tokens of the GPT-NeoX
    tokenizer, 8-40 new tokens each, round robin over the base and three adapters."""
    tok = minicalm.load_tokenizer(TOKENIZER)
    g = torch.Generator().manual_seed(seed)
    reviews = [r.text for r in data.read_jsonl(REVIEWS / "valid.jsonl", limit=n)]
    return [(i % 4, tok.encode(text)[:int(torch.randint(16, 97, (1,), generator=g))],
             int(torch.randint(8, 41, (1,), generator=g))) for i, text in enumerate(reviews)]


def serving_load(b: Bench, size: str, batches: list[int]) -> list[dict]:
    """python -m minicalm serve under load: every request sent at once by its own client (the openai client, greedy),
    answered in one continuous batch of at most B rows, for each B in `batches`; against the same server with
    --max-batch 1 (one request at a time) and against transformers + peft's generate(adapter_names=...) on the same
    requests in static batches of B in order of arrival (a batch ends with its longest answer). Generated tokens/s,
    and each request's latency from the start (p50, p95). Every side's answers are checked to be the same."""
    import openai
    from concurrent.futures import ThreadPoolExecutor
    from peft import PeftModel
    from transformers import GPTNeoXForCausalLM
    from minicalm.generate import left_pad
    from minicalm.tools.serve import ServeConfig, running

    folder, dirs = serving_checkpoint(b, size, SERVE_ADAPTERS)
    models = [str(folder), *dirs]
    requests = serving_requests(b.args.serve_requests)
    tok = minicalm.load_tokenizer(TOKENIZER)
    results: dict[str, list] = {}

    def over_http(batch: int):
        cfg = ServeConfig(model=str(folder), adapter=[f"{n}={d}" for n, d in dirs.items()], port=0, max_batch=batch,
                          max_queue=len(requests), device=b.device.type, dtype=str(b.dtype).removeprefix("torch."))

        def run() -> dict:
            with running(cfg) as (url, _):
                client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=3600)

                def ask(req):
                    m, prompt, n = req
                    out = client.completions.create(model=models[m], prompt=prompt, max_tokens=n, temperature=0)
                    return time.perf_counter() - t0, out.usage.completion_tokens, out.choices[0].text

                with ThreadPoolExecutor(len(requests)) as pool:
                    t0 = time.perf_counter()
                    done = list(pool.map(ask, requests))
                    seconds = time.perf_counter() - t0
            return {"seconds": seconds, "latency": [d[0] for d in done], "tokens": [d[1] for d in done],
                    "texts": [d[2] for d in done]}
        return run

    hf = PeftModel.from_pretrained(GPTNeoXForCausalLM.from_pretrained(folder, dtype=b.dtype).to(b.device),
                                   dirs["qkv8"], adapter_name="qkv8")
    for name in ("rs16", "mlp4"):
        hf.load_adapter(dirs[name], adapter_name=name)
    hf.eval()

    def static(max_batch: int):
        @torch.inference_mode()
        def run() -> dict:
            return static_batches(max_batch)
        return run

    def static_batches(max_batch: int) -> dict:
        t0, latency, tokens, texts = time.perf_counter(), [], [], []
        for i in range(0, len(requests), max_batch):
            batch = requests[i:i + max_batch]
            ids, mask = left_pad([p for _, p, _ in batch], tok.pad_token_id, b.device)
            out = hf.generate(input_ids=ids, attention_mask=mask.long(), do_sample=False, eos_token_id=0,
                              pad_token_id=tok.pad_token_id, max_new_tokens=max(n for _, _, n in batch),
                              adapter_names=[["__base__", *SERVE_ADAPTERS][m] for m, _, _ in batch])
            for (_, _, n), row in zip(batch, out[:, ids.shape[1]:].tolist()):
                new = up_to_eos(row[:n], 0)
                tokens.append(len(new))
                texts.append(tok.decode(new[:-1] if new[-1:] == [0] else new))
                latency.append(time.perf_counter() - t0)
        return {"seconds": time.perf_counter() - t0, "latency": latency, "tokens": tokens, "texts": texts}

    sides = {"--max-batch 1": over_http(1)}
    for B in batches:
        sides |= {f"--max-batch {B}": over_http(B), f"static {B}": static(B)}
    for side in sides.values():
        side()   # warm-up
    for rep in range(b.args.reps):
        for name in list(sides) if rep % 2 == 0 else list(reversed(sides)):
            results.setdefault(name, []).append(sides[name]())
            r = results[name][-1]
            print(f"  serving {size} rep {rep + 1}: {name} {r['seconds']:.2f}s, {sum(r['tokens'])} tokens",
                  file=sys.stderr, flush=True)
    texts = {name: runs[0]["texts"] for name, runs in results.items()}
    differ = [i for i in range(len(requests)) if len({t[i] for t in texts.values()}) > 1]
    if differ:   # the same greedy answers on every side, or the comparison is of different work
        raise RuntimeError(f"serving, {size}: the sides' answers differ for {len(differ)} of {len(requests)} requests; "
                           f"the first, {differ[0]}: " + "; ".join(f"{k}: {v[differ[0]]!r}" for k, v in texts.items()))

    def summary(runs: list[dict]) -> dict:
        lat = sorted(x for r in runs for x in r["latency"])
        return {"tokens_per_s": statistics.median(sum(r["tokens"]) / r["seconds"] for r in runs),
                "p50_s": lat[len(lat) // 2], "p95_s": lat[int(0.95 * (len(lat) - 1))],
                "seconds": [r["seconds"] for r in runs]}
    stats = {name: summary(runs) for name, runs in results.items()}
    b.info.setdefault("serve", {})[size] = {
        "requests": len(requests), "prompt_tokens": sum(len(p) for _, p, _ in requests),
        "generated_tokens": sum(results["--max-batch 1"][0]["tokens"]), **stats}
    rows = []
    for B in batches:
        ours = results[f"--max-batch {B}"]
        for other, label in (("--max-batch 1", "--max-batch 1 (one request at a time)"),
                             (f"static {B}", f"transformers + peft generate(adapter_names) in static batches of {B}")):
            rows.append({"work": f"{size} shape: {len(requests)} requests at once over the base and 3 adapters, "
                                 f"--max-batch {B} vs {label}", "unit": "generated tokens/s",
                         "sides": [f"minicalm serve --max-batch {B}", other],
                         "minicalm": stats[f"--max-batch {B}"]["tokens_per_s"],
                         "transformers": stats[other]["tokens_per_s"],
                         "ratio": statistics.median(t["seconds"] / o["seconds"] for o, t in zip(ours, results[other])),
                         "ratio_cpu_time": None})
    return rows
def question_rows(n: int) -> list[data.Row]:
    """n JCommonsenseQA-shaped questions from the validation reviews: a review's opening as the question, five
    choices of 1 to 9 characters (so their token counts differ), the right one's place cycling."""
    reviews = data.read_jsonl(REVIEWS / "valid.jsonl", limit=n + 8)
    return [data.parse_row({"q_id": i, "question": f"「{reviews[i].text[:30]}」の次は?", "label": i % 5,
                            **{f"choice{k}": r.text[3:4 + (i + k) % 9] for k, r in enumerate(reviews[i:i + 5])}},
                           JCOMMONSENSEQA, i) for i in range(n)]


@torch.inference_mode()
def five_forwards(model, logits: torch.Tensor, state, choices: list[list[list[int]]]) -> list[list[float]]:
    """score_choices' numbers the other way: the rows' prompts once (prefill's cache, with room for the longest
    choice), then one forward per choice place, each row feeding its own choice there (score_continuations' way for
    label words, with per-row tokens), overwriting the same free slots."""
    B, device = len(choices), logits.device
    first, out = logits.float().log_softmax(-1), torch.zeros(B, len(choices[0]))
    for j in range(len(choices[0])):
        cj = [cs[j] for cs in choices]
        score = first[torch.arange(B), torch.tensor([c[0] for c in cj])]
        K = max(map(len, cj)) - 1
        if K > 0:
            pad = lambda c: c + [0] * (K + 1 - len(c))   # noqa: E731
            feed = torch.tensor([pad(c)[:-1] for c in cj], device=device)
            target = torch.tensor([pad(c)[1:] for c in cj], device=device)
            real = torch.arange(K, device=device)[None] < torch.tensor([len(c) - 1 for c in cj], device=device)[:, None]
            pos = state.positions[:, None] + 1 + torch.arange(K, device=device)
            lg = model(feed, pos, start=state.slot, cache=state.cache, logits_at=real)
            picked = lg.float().log_softmax(-1).gather(1, target[real][:, None])[:, 0]
            score = score.index_add(0, torch.nonzero(real)[:, 0], picked)
        out[:, j] = score
    return out.tolist()


def choices_7b(b: Bench) -> list[dict]:
    """A multiple-choice question's five choices by log-likelihood on the 7B-shaped proxy (its 4,000-token BPE), 64
    questions in batches of 16 rows, the prompts' shared prefix once (evaluate_rows' path) on minicalm's side: the
    choices of each row as one batch on copies of its prompt cache (score_choices, evaluation's) against one forward
    per choice place (five_forwards); and against transformers + peft scoring each choice as the JP harness does,
    prompt + choice as one sequence (80 per batch of rows, in batches of 16 sequences, right padded). Fails unless the
    three give the same numbers."""
    bpe = proxy_tokenizer(b)
    ours, theirs = build_models(PROXY_7B, b.device, b.dtype, b.tmp / "choices", vocab_size=4000, tokenizer=bpe.path)
    ours.eval(), theirs.eval()
    rows, batch = question_rows(b.args.questions), 16
    enc = data.PromptEncoder(bpe, 512, JCOMMONSENSEQA)
    prompts, choices = [ids for ids, _ in enc.encode_prompts(rows)], enc.choice_ids(rows)
    shared = prompts[0][:shared_prefix_len(prompts)]   # as evaluate_rows shares it
    P, K = len(shared), max(len(c) for cs in choices for c in cs)
    got = {}

    def ours_with(scorer, key):
        @torch.inference_mode()
        def run():
            answers = Answers(ours, bpe, enc, 0, likelihood=True)
            answers.share_prefix(shared)   # once per evaluation, as evaluate_rows does
            out = []
            for b0 in range(0, len(rows), batch):
                ids, mask = left_pad([p[P:] for p in prompts[b0:b0 + batch]], bpe.pad_token_id, b.device)
                logits, state = prefill(ours, ids, mask, extra=K, prefix=answers.prefix, start=answers.start)
                out += scorer(ours, logits, state, choices[b0:b0 + batch])
            got[key] = torch.tensor(out)
        return run

    sequences = [(p, c) for p, cs in zip(prompts, choices) for c in cs]

    @torch.inference_mode()
    def harness():
        out = []
        for s0 in range(0, len(sequences), batch):
            part = sequences[s0:s0 + batch]
            T = max(len(p) + len(c) for p, c in part)
            ids = torch.tensor([p + c + [bpe.pad_token_id] * (T - len(p) - len(c)) for p, c in part], device=b.device)
            mask = torch.tensor([[1] * (len(p) + len(c)) + [0] * (T - len(p) - len(c)) for p, c in part],
                                device=b.device)
            logits = theirs(input_ids=ids, attention_mask=mask).logits                        # (16, T, V)
            for r, (p, c) in enumerate(part):
                lp = logits[r, len(p) - 1:len(p) + len(c) - 1].float().log_softmax(-1)
                out.append(float(lp.gather(1, torch.tensor(c, device=b.device)[:, None]).sum()))
        got["transformers"] = torch.tensor(out).view(len(rows), -1)

    def same() -> float:
        """The work is the same: the three sides' log-likelihoods agree (and so their picks)."""
        scale = got["transformers"].abs().max().item()
        diffs = {k: (got[k] - got["transformers"]).abs().max().item() for k in ("batched", "five")}
        if max(diffs.values()) > 1e-4 * scale:
            raise RuntimeError(f"choices: the sides' log-likelihoods differ by {diffs} (scale {scale:.3g})")
        b.info["choices"] = {"questions": len(rows), "choices": 5, "rows_per_batch": batch, "shared_tokens": P,
                             "mean_prompt_tokens": round(sum(map(len, prompts)) / len(prompts), 1),
                             "mean_choice_tokens": round(sum(len(c) for cs in choices for c in cs) / 5 / len(rows), 2),
                             "max_abs_difference": diffs, "scale": scale,
                             "same_picks": bool((got["batched"].argmax(1) == got["transformers"].argmax(1)).all())}
        return len(rows)

    batched, five = ours_with(score_choices, "batched"), ours_with(five_forwards, "five")
    harness()
    return [b.paired(f"multiple choice, 7B-shaped proxy: {len(rows)} questions x 5 choices, {batch} rows per batch, "
                     f"each row's choices as one batch on its prompt cache vs one forward per choice", batched, five,
                     same, "questions/s", names=("batched", "five forwards")),
            b.paired(f"multiple choice, 7B-shaped proxy: the same vs transformers + peft, prompt + choice per sequence "
                     f"(the JP harness's way), {batch} sequences per batch", batched, harness, same, "questions/s")]


def format_table(b: Bench, results: list[dict]) -> str:
    lines = [f"{b.dtype}, {b.args.device}, {b.args.threads} thread(s), {b.args.reps} reps", "",
             "| work | minicalm | the other side | ratio | ratio (CPU time) |", "|---|---|---|---|---|"]
    for r in results:
        if "text" in r:
            lines.append(f"| {r['work']} | {r['text']} | | | |")
        else:
            cpu = "" if r["ratio_cpu_time"] is None else f"{r['ratio_cpu_time']:.2f}x"
            lines.append(f"| {r['work']} ({r['unit']}) | {r['minicalm']:.1f} | {r['transformers']:.1f} | "
                         f"{r['ratio']:.2f}x | {cpu} |")
    load = " -> ".join(f"{b.info['machine'][k][0]:.1f}" for k in ("loadavg_start", "loadavg_end"))
    return "\n".join(lines + ["", "rates: work / median wall time; ratios: median over repetitions of the other "
                              "side's time / minicalm's (above 1: minicalm faster). Load average " + load +
                              f" on {b.info['machine']['cpus']} CPUs."])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("all", "training", "variants", "qlora", "small", "free-form", "choices",
                                       "serve"),
                    default="all")
    ap.add_argument("--size", choices=SIZES, default="small", help="the shape of the `small` part")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8, help="the `small` part's training micro-batch")
    ap.add_argument("--eval-reviews", type=int, default=64)
    ap.add_argument("--free-form-reviews", type=int, default=32, help="reviews answered free-form (batches of 16)")
    ap.add_argument("--questions", type=int, default=64, help="multiple-choice questions scored (batches of 16)")
    ap.add_argument("--serve-requests", type=int, default=32, help="the `serve` part's requests, sent at once")
    ap.add_argument("--serve-sizes", default="tiny,small", help="the `serve` part's shapes")
    ap.add_argument("--serve-max-batch", default="8,16", help="the `serve` part's --max-batch values (and static "
                                                              "batch sizes on the other side)")
    ap.add_argument("--out", default="bench/results.json", help="relative paths are to the repository")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    info = {"args": vars(args), "machine": machine(args), "dtype": str(dtype), "lora": LORA}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        b = Bench(args, device, dtype, Path(tmp), info)
        if args.part in ("all", "training"):
            results += proxy_7b(b) + [wide_train_step(b)]
        if args.part in ("all", "variants"):
            results += variants_7b(b)
        if args.part in ("all", "qlora"):
            results += qlora_7b(b)
        if args.part in ("all", "free-form"):
            results.append(free_form_7b(b))
        if args.part in ("all", "small", "free-form"):
            m = small_models(b)
            shape = "open-calm-small's shape" if args.size == "small" else f"{args.size} shape"
            # before the training step, which leaves the two sides' adapters trained apart (no longer identical)
            free_form = [free_form_answers(b, shape, m.ours, m.theirs, m.tok)] if args.part != "small" else []
            if args.part != "free-form":
                train_row, flops_row = small_train_step(b, m)
                results += [train_row, *small_evaluation(b, m), small_decoding(b, m), flops_row]
            results += free_form
        if args.part in ("all", "choices"):
            results += choices_7b(b)
        if args.part in ("all", "serve"):
            for size in args.serve_sizes.split(","):
                results += many_adapters(b, size) + serving_load(b, size, [int(x) for x in
                                                                          args.serve_max_batch.split(",")])
    info["machine"]["loadavg_end"] = os.getloadavg()
    table = format_table(b, results)
    print(table)
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.part != "all" and out.is_file():   # one part: the other parts' latest entries stay
        kept = json.loads(out.read_text(encoding="utf-8"))
        mine = {r["work"] for r in results}
        results = [r for r in kept.get("results", []) if r["work"] not in mine] + results
        table = format_table(b, results)
        run = {k: info[k] for k in ("args", "machine")}   # the top-level ones stay those of the run they came from
        info = ({k: v for k, v in kept.items() if k not in ("results", "table")} |
                {k: v for k, v in info.items() if k not in run} | {f"{args.part}_run": run})
    write_json(out, {**info, "results": results, "table": table})
    print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
