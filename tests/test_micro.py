"""A shortened run of the offline miniature (python -m minicalm.micro): the whole pipeline through minicalm's own
code, on the real review files. The full-length run and its table are in the README."""
import json

from conftest import REVIEWS, need

from minicalm.micro import run
from minicalm.weights import load_model


def test_micro_pipeline_lora_teaches_the_answer_format(tmp_path):
    need(REVIEWS)
    res = run(str(tmp_path), str(REVIEWS / "train.jsonl"), str(REVIEWS / "valid.jsonl"), pretrain_steps=120,
              lora_steps=60, eval_limit=64, vocab_size=1000, log=False)
    # 3. the pretrained model is an ordinary checkpoint folder
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "pretrain" / "model").iterdir()}
    load_model(tmp_path / "pretrain" / "model")
    # 5. LoRA lowers the answer loss ...
    losses = [json.loads(ln)["loss"] for ln in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 60 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    # ... and the invalid-answer rate falls (the post's story: 98.5% -> 0%)
    before, after = res["before"]["generate"], res["after"]["generate"]
    assert before["n"] == after["n"] == 64
    assert after["invalid_rate"] < before["invalid_rate"]
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "before LoRA" in report and "OpenCALM-7B + LoRA, 3 epochs (post)" in report
