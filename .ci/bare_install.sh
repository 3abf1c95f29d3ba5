#!/usr/bin/env bash
# The README's install with no extras, in a fresh venv, then a run that trains and saves: every runtime dependency
# that saving needs must come with the package (numpy once did not, and the first checkpoint failed).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
bare="$(mktemp -d)"
trap 'rm -rf "$bare"' EXIT
python3 -m venv "$bare/venv"
"$bare/venv/bin/pip" install -q --upgrade pip
"$bare/venv/bin/pip" install -q torch==2.13.0
mkdir "$bare/src"   # built from a copy: setuptools would leave build/ in the checkout
cp -r "$repo/minicalm" "$repo/pyproject.toml" "$repo/README.md" "$bare/src/"
"$bare/venv/bin/pip" install -q "$bare/src"
cd "$bare"   # the installed package, not the source tree
OMP_NUM_THREADS=1 venv/bin/python - "$repo/../shared" <<'PY'
import sys
from pathlib import Path

from minicalm import CalmConfig, CalmForCausalLM, save_checkpoint
from minicalm.train import TrainConfig, train

shared = Path(sys.argv[1])
tok = shared / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"
cfg = CalmConfig(vocab_size=50304, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=256)
base = save_checkpoint(CalmForCausalLM(cfg).init_weights(seed=0), "base", tokenizer_dir=tok.parent)
res = train(TrainConfig(model=str(base), train_file=str(shared / "data" / "amazon-ja-reviews" / "train.jsonl"),
                        valid_file="none", out="run", limit_train=8, batch_size=8, micro_batch_size=8, max_len=128,
                        max_steps=1, device="cpu", log=False))
assert res["step"] == 1 and Path("run/state.pt").is_file() and Path("run/adapter/adapter_model.safetensors").is_file()
print("bare install: trained and saved", sorted(p.name for p in Path("run").iterdir()))
PY
