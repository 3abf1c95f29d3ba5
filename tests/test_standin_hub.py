"""The stand-in hub (tests/hub.py) against huggingface_hub itself: what snapshot_download and hf_hub_download fetch
from it and how (LFS through the CDN redirect), the errors and offline behaviour they show, the environment route for
subprocesses, and files real enough for transformers to load. No minicalm code runs here."""
from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (IncompleteSnapshotError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                    RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)
from huggingface_hub.file_download import http_get
from huggingface_hub.hf_api import RepoFile, RepoFolder

from hub import use_hub

SEVEN_B, SMALL, JGLUE = "cyberagent/open-calm-7b", "cyberagent/open-calm-small", "shunk031/JGLUE"
BIN = ["config.json", "tokenizer.json", "pytorch_model*.bin", "pytorch_model.bin.index.json"]
SAFETENSORS = ["config.json", "*.safetensors", "model.safetensors.index.json"]
DOWNLOADS = pytest.mark.parametrize("download", [snapshot_download, partial(hf_hub_download, filename="config.json")],
                                    ids=["snapshot_download", "hf_hub_download"])


def files_in(folder: str | Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


def test_snapshot_of_main_is_what_was_published_and_lfs_comes_from_the_cdn(standin_hub, hub_env):
    main = standin_hub.revision(SEVEN_B, "main")
    folder = Path(snapshot_download(SEVEN_B, allow_patterns=BIN))
    assert folder.name == main.commit and folder.parent.parent.name == "models--cyberagent--open-calm-7b"
    bins = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    assert files_in(folder) == {p: main.files[p].data for p in ["config.json", "tokenizer.json",
                                                                 "pytorch_model.bin.index.json", *bins]}
    # The cache names a blob by the ETag huggingface_hub chose: the sha256 for LFS files, the git oid otherwise.
    assert (folder / bins[0]).resolve().name == main.files[bins[0]].sha256
    assert (folder / "config.json").resolve().name == main.files["config.json"].oid

    # One repo-info call resolves `main`; everything after it asks for the commit hash.
    log = [(r.method, r.path.replace(main.commit, "<commit>"), r.status) for r in standin_hub.log]
    assert log[:2] == [("GET", f"/api/models/{SEVEN_B}/revision/main", 200),
                       ("GET", f"/api/models/{SEVEN_B}/tree/<commit>?recursive=true&expand=false", 200)]
    for b in bins:   # the HEAD is redirected and the bytes come from the CDN, never from resolve/
        assert ("HEAD", f"/{SEVEN_B}/resolve/<commit>/{b}", 302) in log
        assert ("GET", f"/cdn/{main.files[b].sha256}", 200) in log
        assert not any(m == "GET" and p.endswith(b) for m, p, _ in log)
    assert ("GET", f"/{SEVEN_B}/resolve/<commit>/config.json", 200) in log


def test_safetensors_only_on_the_pull_request_ref(standin_hub, hub_env):
    on_main = Path(snapshot_download(SEVEN_B, allow_patterns=SAFETENSORS))
    assert sorted(files_in(on_main)) == ["config.json"]   # no error: the patterns simply match nothing else

    pr = standin_hub.revision(SEVEN_B, "refs/pr/5")
    assert "pytorch_model-00001-of-00002.bin" in pr.files   # the ref is main plus the conversion's commit
    folder = Path(snapshot_download(SEVEN_B, revision="refs/pr/5", allow_patterns=SAFETENSORS))
    want = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
            "model.safetensors.index.json"]   # and the patterns keep its pickles out
    assert files_in(folder) == {p: pr.files[p].data for p in want}
    cache = folder.parent.parent
    assert (cache / "refs" / "refs/pr/5").read_text() == pr.commit   # the ref is kept as nested folders
    assert ("GET", f"/api/models/{SEVEN_B}/revision/refs%2Fpr%2F5", 200) in standin_hub.log


def test_parquet_from_the_dataset_conversion_ref(standin_hub, hub_env):
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = hf_hub_download(JGLUE, "MARC-ja/jglue-validation.parquet", repo_type="dataset",
                           revision="refs/convert/parquet")
    marc = pq.read_table(file)
    assert marc.schema == pa.schema([("sentence", pa.string()), ("label", pa.int64()), ("review_id", pa.string())])
    assert marc.num_rows == 32 and set(marc["label"].to_pylist()) == {0, 1}
    path = f"/datasets/{JGLUE}/resolve/refs%2Fconvert%2Fparquet/MARC-ja/jglue-validation.parquet"
    assert standin_hub.log[0] == ("HEAD", path, 302)

    jnli = pq.read_table(hf_hub_download(JGLUE, "JNLI/jglue-train.parquet", repo_type="dataset",
                                         revision="refs/convert/parquet"))
    assert jnli.column_names == ["sentence_pair_id", "yjcaptions_id", "sentence1", "sentence2", "label"]
    assert jnli.num_rows == 96 and jnli["label"].to_pylist()[:4] == [0, 1, 2, 0]
    assert all(s.endswith("。") or "。" not in s for s in jnli["sentence1"].to_pylist())
    assert sorted(files_in(snapshot_download(JGLUE, repo_type="dataset"))) == ["JGLUE.py", "README.md"]


def test_an_interrupted_download_resumes_from_the_cdn(standin_hub, hub_env):
    """http_get, which hf_hub_download calls, retries a broken download from where it stopped with a Range."""
    f = standin_hub.revision(SMALL, "main").files["pytorch_model.bin"]
    out = io.BytesIO(f.data[:1000])
    out.seek(1000)
    http_get(f"{standin_hub.cdn}/cdn/{f.sha256}", out, resume_size=1000, expected_size=len(f.data))
    assert out.getvalue() == f.data and standin_hub.log == [("GET", f"/cdn/{f.sha256}", 206)]


def test_tree_pages_and_folders(standin_hub, hub_env, monkeypatch):
    monkeypatch.setattr(standin_hub, "page_size", 6)
    parquet = standin_hub.revision(JGLUE, "refs/convert/parquet", "dataset")
    entries = list(HfApi().list_repo_tree(JGLUE, repo_type="dataset", revision="refs/convert/parquet",
                                          recursive=True))
    assert len(entries) == 24 and len(standin_hub.log) == 4   # 6 a page: huggingface_hub followed the Link 3 times
    assert [e.path for e in entries if isinstance(e, RepoFolder)] == [
        "JCommonsenseQA", "JCommonsenseQA/train", "JCommonsenseQA/validation", "JNLI", "JSQuAD", "JSQuAD/train",
        "JSQuAD/validation", "JSTS", "MARC-ja", "MARC-ja/train"]
    for e in (e for e in entries if isinstance(e, RepoFile)):
        data = parquet.files[e.path].data
        assert (e.size, e.lfs.size, e.lfs.sha256) == (len(data), len(data), hashlib.sha256(data).hexdigest())
    top = HfApi().list_repo_tree(JGLUE, repo_type="dataset", revision="refs/convert/parquet")
    assert [e.path for e in top] == ["JCommonsenseQA", "JNLI", "JSQuAD", "JSTS", "MARC-ja"]


@DOWNLOADS
def test_missing_repo_and_revision(hub_env, download):
    with pytest.raises(RepositoryNotFoundError):   # the hub's 401 for a repo an anonymous client cannot see
        download("cyberagent/open-calm-nope")
    with pytest.raises(RepositoryNotFoundError):   # a dataset asked for without repo_type="dataset"
        download(JGLUE)
    with pytest.raises(RevisionNotFoundError):
        download(SMALL, revision="refs/pr/99")


def test_missing_file(standin_hub, hub_env):
    with pytest.raises(RemoteEntryNotFoundError):   # its EntryNotFoundError base also covers LocalEntryNotFoundError
        hf_hub_download(SMALL, "model.safetensors")
    commit = standin_hub.revision(SMALL, "main").commit   # the 404's X-Repo-Commit lets the cache note the absence
    assert (Path(hub_env["HF_HOME"]) / f"hub/models--cyberagent--open-calm-small/.no_exist/{commit}/model.safetensors"
            ).is_file()


def test_offline_reads_the_cache_without_a_request(standin_hub, hub_env, monkeypatch):
    folder = snapshot_download(SMALL, allow_patterns=BIN)
    use_hub(monkeypatch, standin_hub, Path(hub_env["HF_HOME"]), offline=True)
    standin_hub.log.clear()
    assert snapshot_download(SMALL, allow_patterns=BIN) == folder
    assert hf_hub_download(SMALL, "pytorch_model.bin") == f"{folder}/pytorch_model.bin"
    with pytest.raises(IncompleteSnapshotError):   # the cached tree listing shows what the snapshot lacks
        snapshot_download(SMALL, allow_patterns=["README.md"])
    assert standin_hub.log == []


@DOWNLOADS
def test_offline_without_a_cache(standin_hub, hub_env, monkeypatch, tmp_path, download):
    use_hub(monkeypatch, standin_hub, tmp_path / "empty_home", offline=True)
    with pytest.raises(LocalEntryNotFoundError) as e:
        download(SMALL)
    assert isinstance(e.value.__cause__, OfflineModeIsEnabled) and standin_hub.log == []


def test_a_subprocess_reaches_the_stand_in_through_its_environment(standin_hub, hub_env):
    code = ("from huggingface_hub import snapshot_download; "
            "print(snapshot_download('cyberagent/open-calm-small', allow_patterns=['pytorch_model.bin']))")
    out = subprocess.run([sys.executable, "-c", code], env=hub_env, capture_output=True, text=True, check=True)
    folder = Path(out.stdout.strip())
    assert folder.is_relative_to(hub_env["HF_HOME"])
    sha = standin_hub.revision(SMALL, "main").files["pytorch_model.bin"].sha256
    assert hashlib.sha256((folder / "pytorch_model.bin").read_bytes()).hexdigest() == sha
    assert ("GET", f"/cdn/{sha}", 200) in standin_hub.log
    assert not any("agent-harnesses" in r.path for r in standin_hub.log)   # telemetry is off


def test_the_checkpoints_are_real(hub_env):
    """refs/pr/5's safetensors load into transformers as they are; main's pickles hold the same fp16 weights with
    OpenCALM's head name and legacy buffers."""
    from tokenizers import Tokenizer
    from transformers import GPTNeoXForCausalLM

    pr = snapshot_download(SEVEN_B, revision="refs/pr/5", allow_patterns=SAFETENSORS + ["tokenizer.json"])
    model, info = GPTNeoXForCausalLM.from_pretrained(pr, dtype=torch.float16, output_loading_info=True)
    assert not any(info.values()), info   # no missing, unexpected or mismatched tensors
    assert Tokenizer.from_file(f"{pr}/tokenizer.json").get_vocab_size() <= model.config.vocab_size

    main = Path(snapshot_download(SEVEN_B, allow_patterns=BIN))
    assert json.loads((main / "config.json").read_text())["rotary_pct"] == 1.0
    shards = json.loads((main / "pytorch_model.bin.index.json").read_text())["weight_map"].values()
    sd = {k: v for s in sorted(set(shards)) for k, v in torch.load(main / s, weights_only=True).items()}
    for i in range(model.config.num_hidden_layers):
        for buffer in ("attention.bias", "attention.masked_bias", "attention.rotary_emb.inv_freq"):
            assert f"gpt_neox.layers.{i}.{buffer}" in sd
    weights = {("embed_out.weight" if k == "lm_head.weight" else k): v for k, v in model.state_dict().items()}
    assert "embed_out.weight" in sd and all(torch.equal(sd[k], v) for k, v in weights.items())
    assert {v.dtype for v in weights.values()} == {torch.float16}
