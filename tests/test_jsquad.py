"""JSQuAD from the hub: the stand-in (tests/hub.py) publishes it as the hub's later conversion does
(JSQuAD/{split}/NNNN.parquet beside an index.duckdb, answers a struct of two lists), MARC-ja as jglue-{split}.parquet
with a train/ folder beside them. task_data lists the revision's tree and takes either layout (shards in name order),
says in one line what the folder holds when neither is there, and keeps the golds and their offsets; eval.py answers
JSQuAD from the hub end to end."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from conftest import ROOT
from hub import PARQUET_REF, use_hub
from minicalm.io.hub import HubError
from minicalm.tasks.data import parquet_to_jsonl, read_jsonl, split_layout, task_data
from minicalm.tasks.task import JSQUAD, MARC_JA, Task

JGLUE = "shunk031/JGLUE"
WHERE = r"dataset shunk031/JGLUE \(revision refs/convert/parquet\)"


def published(hub, path: str) -> list[dict]:
    """The rows of a Parquet file as the stand-in publishes it."""
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(hub.revision(JGLUE, PARQUET_REF, "dataset").files[path].data)).to_pylist()


def fetched(hub) -> list[str]:
    return [r.path.split("/resolve/", 1)[1] for r in hub.log if "/resolve/" in r.path]


def test_standin_jsquad_has_the_real_columns_and_offsets(standin_hub):
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = standin_hub.revision(JGLUE, PARQUET_REF, "dataset").files
    shards = sorted(p for p in files if p.startswith("JSQuAD/"))
    assert shards == ["JSQuAD/train/0000.parquet", "JSQuAD/train/0001.parquet", "JSQuAD/train/index.duckdb",
                      "JSQuAD/validation/0000.parquet", "JSQuAD/validation/index.duckdb"]
    schema = pq.read_schema(io.BytesIO(files["JSQuAD/validation/0000.parquet"].data))
    assert schema.names == ["id", "title", "context", "question", "answers", "is_impossible"]
    assert schema.field("answers").type == pa.struct([("text", pa.list_(pa.string())),
                                                      ("answer_start", pa.list_(pa.int64()))])
    rows = [r for p in shards if p.endswith(".parquet") for r in published(standin_hub, p)]
    assert len(rows) == 64 and len({r["id"] for r in rows}) == 64
    for r in rows:   # each gold is the span of the context its answer_start (in characters) points at
        a = r["answers"]
        assert r["context"].startswith(r["title"] + " [SEP] ") and not r["is_impossible"]
        assert len(a["text"]) == len(a["answer_start"]) >= 1
        assert all(r["context"][s:s + len(t)] == t for t, s in zip(a["text"], a["answer_start"]))
    assert sum(len(r["answers"]["text"]) == 2 for r in rows) > 5   # several golds, as SQuAD's dev has


def test_task_data_lists_the_tree_and_keeps_the_golds(standin_hub, hub_env, tmp_path):
    path = task_data(JSQUAD, "validation", cache_dir=tmp_path / "cache")
    commit = standin_hub.revision(JGLUE, PARQUET_REF, "dataset").commit
    api = [r.path for r in standin_hub.log if r.path.startswith("/api/")]
    assert api == [f"/api/datasets/{JGLUE}/revision/refs%2Fconvert%2Fparquet",
                   f"/api/datasets/{JGLUE}/tree/{commit}?recursive=true&expand=false"]
    assert fetched(standin_hub) == ["refs%2Fconvert%2Fparquet/JSQuAD/validation/0000.parquet"]   # not index.duckdb
    want = published(standin_hub, "JSQuAD/validation/0000.parquet")
    rows = read_jsonl(path, JSQUAD)
    assert [(r.id, r.fields, r.references, r.label) for r in rows] == [
        (w["id"], {"context": w["context"], "question": w["question"]}, tuple(w["answers"]["text"]),
         w["answers"]["text"][0]) for w in want]
    assert any(len(r.references) == 2 for r in rows)
    standin_hub.log.clear()
    assert task_data(JSQUAD, "valid", cache_dir=tmp_path / "cache") == path and standin_hub.log == []   # cached

    train = read_jsonl(task_data(JSQUAD, "train", cache_dir=tmp_path / "cache"), JSQUAD)   # two shards, in order
    shards = ["JSQuAD/train/0000.parquet", "JSQuAD/train/0001.parquet"]
    assert fetched(standin_hub) == [f"refs%2Fconvert%2Fparquet/{s}" for s in shards]
    assert [r.id for r in train] == [w["id"] for s in shards for w in published(standin_hub, s)]


def test_the_jglue_file_is_taken_beside_a_split_folder(standin_hub, hub_env, tmp_path):
    rows = read_jsonl(task_data(MARC_JA, "train", cache_dir=tmp_path / "cache"))
    assert fetched(standin_hub) == ["refs%2Fconvert%2Fparquet/MARC-ja/jglue-train.parquet"]   # not train/0000
    assert len(rows) == 128


def test_split_layout_either_and_neither():
    jglue = ["JSQuAD/jglue-train.parquet", "JSQuAD/jglue-validation.parquet"]
    shards = ["JSQuAD/train/0000.parquet", "JSQuAD/validation/0001.parquet", "JSQuAD/validation/0000.parquet",
              "JSQuAD/validation/index.duckdb"]
    layout = lambda paths: split_layout(paths, "JSQuAD/jglue-validation.parquet", "validation", "repo")  # noqa: E731
    assert layout(jglue) == ["JSQuAD/jglue-validation.parquet"]
    assert layout(shards) == ["JSQuAD/validation/0000.parquet", "JSQuAD/validation/0001.parquet"]
    assert layout(shards + jglue) == ["JSQuAD/jglue-validation.parquet"]
    assert split_layout(["train/0000.parquet"], "train.parquet", "train", "repo") == ["train/0000.parquet"]
    with pytest.raises(HubError, match=r"^repo has neither JSQuAD/jglue-validation\.parquet nor "
                                       r"JSQuAD/validation/\*\.parquet: JSQuAD/ holds jglue-train\.parquet, "
                                       r"train/0000\.parquet$"):
        layout(["JSQuAD/jglue-train.parquet", "JSQuAD/train/0000.parquet", "JNLI/jglue-validation.parquet"])
    many = [f"JSQuAD/part-{n:02d}.json" for n in range(12)]
    with pytest.raises(HubError, match=r": JSQuAD/ holds part-00\.json, .*, part-07\.json, \.\.\. \(12 in all\)$"):
        layout(many)


def test_neither_layout_on_the_hub_is_one_line(standin_hub, hub_env, tmp_path):
    task = Task("jsquad", JSQUAD.prompt, answer_field="answers", id_field="id",
                hub=JSQUAD.hub | {"files": {"validation": "JSQuAD-v2/jglue-validation.parquet"}})
    message = (rf"^{WHERE} has neither JSQuAD-v2/jglue-validation\.parquet nor JSQuAD-v2/validation/\*\.parquet: "
               r"there is no folder JSQuAD-v2/; the top level holds JCommonsenseQA/, JNLI/, JSQuAD/, JSTS/, MARC-ja/$")
    with pytest.raises(HubError, match=message):
        task_data(task, "validation", cache_dir=tmp_path / "cache")
    assert fetched(standin_hub) == [] and not (tmp_path / "cache").exists()


def test_offline_and_not_cached_is_the_same_line_as_before(standin_hub, hub_env, tmp_path, monkeypatch):
    use_hub(monkeypatch, standin_hub, tmp_path / "empty_home", offline=True)
    message = (rf"^HF_HUB_OFFLINE is set and {WHERE} file JSQuAD/jglue-validation\.parquet is not in the hub cache "
               r".*: run once with the hub reachable, or pass --valid-file \(JSON lines with context, question, "
               r"answers\)$")
    with pytest.raises(HubError, match=message):
        task_data(JSQUAD, "validation", cache_dir=tmp_path / "cache", instead="--valid-file")
    assert standin_hub.log == []


def test_unexpected_columns_are_named_beside_those_found(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    nested = [{"title": "t", "paragraphs": [{"context": "t [SEP] 本文", "qas": [
        {"id": "q0", "question": "何?", "answers": [{"text": "本文", "answer_start": 8}]}]}]}]   # the older script's
    pq.write_table(pa.Table.from_pylist(nested), tmp_path / "old.parquet")
    with pytest.raises(ValueError) as e:
        parquet_to_jsonl(tmp_path / "old.parquet", tmp_path / "out.jsonl", JSQUAD)
    assert str(e.value) == (f"{tmp_path / 'old.parquet'}: no column context, question, answers, id for task jsquad; "
                            f"the file has title, paragraphs")
    assert not (tmp_path / "out.jsonl").exists()


def test_eval_py_answers_jsquad_from_the_hub(base, hub_env, standin_hub, tmp_path):
    out = tmp_path / "out"
    env = hub_env | {"HOME": str(tmp_path / "home")}   # ~/.cache/minicalm/jsquad, where the split is converted
    done = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--model", str(base[0]), "--task", "jsquad",
                           "--limit", "4", "--max-len", "128", "--out", str(out), "--device", "cpu"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert fetched(standin_hub) == ["refs%2Fconvert%2Fparquet/JSQuAD/validation/0000.parquet"]
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    m = metrics["base"]
    assert metrics["task"]["name"] == "jsquad" and m["n"] == 4 and 0 <= m["exact_match"] <= m["char_f1"] <= 1
    preds = [json.loads(ln) for ln in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    golds = published(standin_hub, "JSQuAD/validation/0000.parquet")[:4]
    assert [p["gold"] for p in preds] == [g["answers"]["text"] for g in golds]
    assert (tmp_path / "home/.cache/minicalm/jsquad/validation.jsonl").is_file()
