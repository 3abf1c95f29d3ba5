"""minicalm's hub path (minicalm.io.hub, and through it io.weights.resolve, load_tokenizer and tasks.data.task_data)
against the stand-in hub (tests/hub.py), as a user meets it: OpenCALM's layouts load by branch, pull-request ref and
commit hash and equal transformers' own reading of the files; a second run offline reads the cache and asks the hub
nothing; and each of the five failures (no such repo, revision or file, the hub unreachable, offline and not cached)
is one line that says which, naming the repo, the revision and the file."""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import torch

from conftest import REVIEWS, ROOT, assert_close_to_scale
from hub import use_hub
from minicalm import load_model, load_tokenizer
from minicalm.tasks.data import read_jsonl, task_data
from minicalm.io.hub import HubError
from minicalm.tasks.task import JNLI, MARC_JA, Task
from minicalm.io.weights import resolve

SEVEN_B = "cyberagent/open-calm-7b"
X = torch.randint(2, 50_000, (2, 12), generator=torch.Generator().manual_seed(0))


def fetched(hub) -> list[str]:
    """The files the stand-in was asked for (HEAD or GET on resolve), as "<revision>/<path>"."""
    return [r.path.split("/resolve/", 1)[1] for r in hub.log if "/resolve/" in r.path]


def test_opencalm_layouts_by_branch_ref_and_commit(standin_hub, hub_env, tmp_path, monkeypatch):
    from transformers import GPTNeoXForCausalLM

    main = load_model(SEVEN_B)                                    # main: two pickled .bin shards and their index
    assert any(f.endswith("pytorch_model-00002-of-00002.bin") for f in fetched(standin_hub))
    standin_hub.log.clear()
    pr = load_model(SEVEN_B, revision="refs/pr/5")                # the pull-request ref's safetensors
    assert any(f.endswith(".safetensors") for f in fetched(standin_hub))
    assert not any(f.endswith(".bin") for f in fetched(standin_hub))   # the pickles the user chose to avoid
    oracle = GPTNeoXForCausalLM.from_pretrained(resolve(SEVEN_B, "refs/pr/5"), dtype=torch.float32).eval()
    with torch.no_grad():
        want = oracle(X).logits
        assert_close_to_scale(pr(X), want)
        assert torch.equal(main(X), pr(X))   # the same fp16 weights, two file formats
    commit = standin_hub.revision(SEVEN_B, "refs/pr/5").commit
    assert resolve(SEVEN_B, commit) == resolve(SEVEN_B, "refs/pr/5")
    tok = load_tokenizer(SEVEN_B, revision="refs/pr/5")
    assert (tok.eos_token_id, tok.pad_token_id) == (0, 1)

    use_hub(monkeypatch, standin_hub, tmp_path / "hf_home", offline=True)   # the same cache, offline
    standin_hub.log.clear()
    with torch.no_grad():
        assert torch.equal(load_model(SEVEN_B, revision="refs/pr/5")(X), pr(X))
        assert torch.equal(load_model(SEVEN_B)(X), main(X))
    assert load_tokenizer(SEVEN_B).eos_token_id == 0 and standin_hub.log == []


def test_task_data_downloads_converts_and_caches(standin_hub, hub_env, tmp_path):
    with pytest.warns(UserWarning, match=r"'rows': 32, 'positive': \d+.*'rows': 5654, 'positive': 4832.*5,734"):
        path = task_data(MARC_JA, "validation", cache_dir=tmp_path / "cache")
    assert fetched(standin_hub) == ["refs%2Fconvert%2Fparquet/MARC-ja/jglue-validation.parquet"]   # then the CDN
    rows = read_jsonl(path)
    shared = read_jsonl(REVIEWS / "valid.jsonl", limit=32)   # what the stand-in's Parquet was made of
    assert [(r.fields, r.label, r.id) for r in rows] == [(r.fields, r.label, r.id) for r in shared]
    standin_hub.log.clear()
    assert task_data(MARC_JA, "valid", cache_dir=tmp_path / "cache") == path and standin_hub.log == []   # cached
    sample = task_data(MARC_JA, "validation", cache_dir=tmp_path / "cache", subset=5, seed=0)   # a fixed sample
    assert len(read_jsonl(sample)) == 5 and all(r in rows for r in read_jsonl(sample))
    jnli = read_jsonl(task_data(JNLI, "train", cache_dir=tmp_path / "jnli"), JNLI)
    assert len(jnli) == 96 and {r.label for r in jnli} == set(JNLI.labels)
    with pytest.raises(ValueError, match="test"):
        task_data(MARC_JA, "test", cache_dir=tmp_path / "cache")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def failing(case: str, standin_hub, monkeypatch, tmp_path):
    """Make the hub fail as `case` says; returns (what to call, the one-line message it must raise, regex)."""
    from huggingface_hub import constants, hf_api

    missing_file = Task("marc-ja", MARC_JA.prompt, MARC_JA.labels,   # and no validation/ folder beside it
                        hub=MARC_JA.hub | {"files": {"validation": "MARC-ja/jglue-valid-v9.parquet"}})
    if case == "unreachable":
        dead = f"http://127.0.0.1:{closed_port()}"
        for obj, name in ((constants, "ENDPOINT"), (hf_api.api, "endpoint")):
            monkeypatch.setattr(obj, name, dead)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", dead + "/{repo_id}/resolve/{revision}/{filename}")
    if case == "offline":
        use_hub(monkeypatch, standin_hub, tmp_path / "empty_home", offline=True)
    return {
        "no repo": (lambda: load_model("cyberagent/open-calm-8b"),
                    r"^no repo cyberagent/open-calm-8b on the hub \(http://127\.0\.0\.1:\d+\): check the id"),
        "no revision": (lambda: load_model(SEVEN_B, revision="refs/pr/99"),
                        r"^cyberagent/open-calm-7b has no revision 'refs/pr/99' on the hub"),
        "no file": (lambda: task_data(missing_file, "valid", cache_dir=tmp_path / "c", instead="--data"),
                    r"^dataset shunk031/JGLUE \(revision refs/convert/parquet\) has neither "
                    r"MARC-ja/jglue-valid-v9\.parquet nor MARC-ja/validation/\*\.parquet: MARC-ja/ holds "
                    r"jglue-train\.parquet, jglue-validation\.parquet, train/0000\.parquet$"),
        "unreachable": (lambda: load_tokenizer(SEVEN_B, revision="refs/pr/5"),
                        r"^the hub \(http://127\.0\.0\.1:\d+\) could not be reached and cyberagent/open-calm-7b "
                        r"\(revision refs/pr/5\) is not in the hub cache .*, or hf download cyberagent/open-calm-7b "
                        r"--revision refs/pr/5 --local-dir open-calm-7b where the hub is reachable, then pass that "
                        r"folder instead$"),
        "offline": (lambda: task_data(MARC_JA, "train", cache_dir=tmp_path / "c", instead="--train-file"),
                    r"^HF_HUB_OFFLINE is set and dataset shunk031/JGLUE \(revision refs/convert/parquet\) file "
                    r"MARC-ja/jglue-train\.parquet is not in the hub cache .*: run once with the hub reachable, or "
                    r"pass --train-file \(JSON lines with sentence, label\)$"),
    }[case]


@pytest.mark.parametrize("case", ["no repo", "no revision", "no file", "unreachable", "offline"])
def test_each_hub_failure_is_one_line_that_says_which(case, standin_hub, hub_env, monkeypatch, tmp_path):
    call, message = failing(case, standin_hub, monkeypatch, tmp_path)
    with pytest.raises(HubError, match=message) as e:
        call()
    assert "\n" not in str(e.value) and isinstance(e.value, FileNotFoundError)
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())   # nothing half-written


def test_a_script_prints_a_hub_failure_as_one_line(hub_env):
    done = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--model", SEVEN_B, "--revision", "v2.0",
                           "--data", str(REVIEWS / "valid.jsonl"), "--limit", "2"], env=hub_env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == "eval.py: error: cyberagent/open-calm-7b has no revision 'v2.0' on the hub (a branch, tag, " \
                          "commit or refs/pr/N)\n"
