"""The checks that need a GPU, as one prepared script for a session that is lent one (none of them run in CI):

    python bench/gpu_check.py                 # CUDA bf16: a real LoRA run through train(), planner vs measured
    python bench/gpu_check.py --device cpu    # the same path on CPU (fp32), to check the script itself

1. train() on an open-calm-small-shaped random checkpoint (real reviews, the GPT-NeoX tokenizer), bf16 base,
   a few steps: the loss is finite and falls, and the run's peak accelerator memory (metrics.jsonl,
   torch.cuda.max_memory_allocated) is compared with the planner's figure (minicalm.tools.plan) for the same
   settings;
2. the decoding and evaluation paths in bf16 (greedy_generate with and without the KV cache agree);
3. train_lora.py's step (minicalm.train.train_step) timed four ways: the shared prompt prefix or --no-share-prefix,
   eager or --compile (after warm-up steps, which include compiling), tokens/s of each.
Then run `python bench/bench.py --device cuda --reps 3` for the README's GPU table.
"""
import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]   # minicalm, and the tests' reference decoder
from minicalm.config import CalmConfig  # noqa: E402
from minicalm.generate import greedy_generate  # noqa: E402
from minicalm.io.tokenizer import load_tokenizer  # noqa: E402
from minicalm.io.weights import load_model, save_checkpoint  # noqa: E402
from minicalm.loss import shared_prefix_len  # noqa: E402
from minicalm.model import CalmForCausalLM  # noqa: E402
from minicalm.tasks import data  # noqa: E402
from minicalm.tools.plan import GiB, PlanConfig, plan  # noqa: E402
from minicalm.tools.run import processes  # noqa: E402
from minicalm.train import TrainConfig, global_batch, setup, train, train_step  # noqa: E402
from reference import greedy_no_cache  # noqa: E402

SHARED = ROOT.parent / "shared"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=6)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    cfg = CalmConfig(vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=3072)
    tok_dir = SHARED / "tokenizers" / "gpt-neox-20b"
    save_checkpoint(CalmForCausalLM(cfg).init_weights(seed=0), tmp / "base", tokenizer_dir=tok_dir)
    tc = TrainConfig(model=str(tmp / "base"), train_file=str(SHARED / "data/amazon-ja-reviews/train.jsonl"),
                     valid_file="none", out=str(tmp / "run"), limit_train=16 * a.steps, batch_size=16,
                     micro_batch_size=16, max_len=256, max_steps=a.steps, warmup_steps=1, lr=1e-3, save_every=0,
                     device=a.device, dtype="auto")
    res = train(tc)
    rows = [json.loads(ln) for ln in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    dtype = next(res["model"].parameters()).dtype
    print(f"1. train(): {a.steps} steps, base dtype {dtype}, losses {[round(x, 3) for x in losses]}, "
          f"{rows[-1]['tokens_per_s']:.0f} tokens/s")
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0], "loss did not fall"
    if a.device.startswith("cuda"):
        measured = max(r["peak_memory_bytes"] for r in rows)
        planned = plan(PlanConfig(model=tc.model, micro_batch_size=16, max_len=256, shared_prefix=shared_prefix(tc),
                                  lora=tc.lora, dtype="bfloat16", answer_tokens=4), cfg).peak_bytes
        print(f"   peak memory: measured {measured / GiB:.2f} GiB, planned {planned / GiB:.2f} GiB "
              f"({measured / planned - 1:+.1%}; the planner leaves out kernel workspaces and fragmentation)")

    model = load_model(tmp / "base", device=a.device)
    ids = torch.randint(0, cfg.vocab_size, (2, 40), device=a.device)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    same = torch.equal(greedy_generate(model, ids, 24, attention_mask=mask),
                       greedy_no_cache(model, ids, 24, attention_mask=mask))
    print(f"2. greedy decoding in {next(model.parameters()).dtype}: KV cache equals no cache: {same}")

    print("3. train_lora.py's step, batch 16 in one micro-batch (tokens/s after 2 warm-up steps):")
    for share, compiled in ((True, False), (False, False), (True, True), (False, True)):
        with processes(a.device) as proc:
            run = setup(replace(tc, out=str(tmp / f"t-{share}-{compiled}"), limit_train=16 * 8, max_steps=8,
                                share_prefix=share, compile=compiled, log=False), proc)
            rates = []
            for _ in range(7):
                batch = global_batch(run, run.step)
                tokens = sum(len(run.train_set[j].input_ids) for j in batch)
                t0 = time.perf_counter()
                train_step(run, batch)   # ends with .item() on the loss and grad norm: the GPU has finished
                rates.append(tokens / (time.perf_counter() - t0))
        print(f"   {'shared prefix' if share else '--no-share-prefix'}, {'--compile' if compiled else 'eager'}: "
              f"{sorted(rates[2:])[2]:.0f} tokens/s (median of 5; first step {rates[0]:.0f})")
    print("next: python bench/bench.py --device cuda --reps 3")


def shared_prefix(tc: TrainConfig) -> int:
    """The prompt prefix every training example starts with (what train() shares), for the plan."""
    enc = data.PromptEncoder(load_tokenizer(tc.model), tc.max_len)
    examples = data.encode_rows(enc, data.read_jsonl(tc.train_file, limit=tc.limit_train))[0]
    return shared_prefix_len([e.input_ids for e in examples])


if __name__ == "__main__":
    main()
