"""A local stand-in for the Hugging Face Hub, so that tests run huggingface_hub's own download code
(snapshot_download, hf_hub_download, the cache, offline mode, the errors) on OpenCALM- and JGLUE-shaped repos
without a network.

StandInHub serves what `publish` gave it on 127.0.0.1 and answers the requests huggingface_hub 2.4 makes as the hub
does (routes and headers read from its hf_api.py, file_download.py and utils/_http.py):

  GET      /api/{models|datasets}/{repo_id}/revision/{rev}     {"id", "sha": the commit, "siblings": [...]}
  GET      /api/{models|datasets}/{repo_id}/tree/{rev}?recursive=true&cursor=N
                                                               files and folders, paged by a Link: rel="next" header
  HEAD|GET /[datasets/]{repo_id}/resolve/{rev}/{path}          git file: 200, ETag "<git blob sha1>", X-Repo-Commit
                                                               LFS file: 302 to the CDN, X-Linked-Etag "<sha256>",
                                                               X-Linked-Size, X-Repo-Commit
  GET      http://localhost:PORT/cdn/{sha256}                  the LFS file's bytes (Range: bytes=N- answers 206)

{rev} is a branch or ref name URL-encoded as one segment (refs%2Fpr%2F5) or a revision's 40-hex commit hash.
Errors carry X-Error-Code, which huggingface_hub turns into its exceptions: an unknown repo answers 401 RepoNotFound
(what the hub tells an anonymous client, so private and missing repos look alike), an unknown revision 404
RevisionNotFound, a missing file 404 EntryNotFound with X-Repo-Commit. The CDN is another origin (localhost, not
127.0.0.1) as on the hub: huggingface_hub follows a redirect only within the hub's origin, so it must read the file's
metadata off the 302 itself, and fetches the bytes from the CDN without the hub's authorization header.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple
from urllib.parse import parse_qs, unquote, urlencode

import torch

from conftest import NEOX_TOKENIZER, REVIEWS

LFS_SUFFIXES = (".bin", ".safetensors", ".parquet", ".duckdb")   # what these repos' .gitattributes send to LFS


class Request(NamedTuple):
    method: str
    path: str     # as sent: URL-encoded, query included
    status: int


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class File:
    data: bytes
    oid: str              # git blob sha1 of what git stores: the bytes, or for an LFS file its pointer
    sha256: str | None    # LFS files only: the CDN's key, and the ETag huggingface_hub names the cached blob by
    pointer_size: int = 0

    @classmethod
    def of(cls, path: str, data: bytes) -> File:
        if not path.endswith(LFS_SUFFIXES):
            return cls(data, git_oid(data), None)
        sha = hashlib.sha256(data).hexdigest()
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()
        return cls(data, git_oid(pointer), sha, len(pointer))


@dataclass(frozen=True)
class Revision:
    commit: str
    files: dict[str, File]

    def tree(self, recursive: bool) -> list[dict]:
        """The tree listing: files, and the folders above them (top level only unless recursive)."""
        folders = {p.rsplit("/", i)[0] for p in self.files for i in range(1, p.count("/") + 1)}
        entries = [{"type": "directory", "path": d, "size": 0, "oid": hashlib.sha1(
            "".join(p + f.oid for p, f in self.files.items() if p.startswith(d + "/")).encode()).hexdigest()}
            for d in folders]
        for p, f in self.files.items():
            lfs = {"lfs": {"oid": f.sha256, "size": len(f.data), "pointerSize": f.pointer_size}} if f.sha256 else {}
            entries.append({"type": "file", "oid": f.oid, "size": len(f.data), "path": p} | lfs)
        return sorted((e for e in entries if recursive or "/" not in e["path"]), key=lambda e: e["path"])


class StandInHub:
    """The published repos, the server answering for them, and `log`: every request it answered, in order."""

    def __init__(self, page_size: int = 1000):
        self.repos: dict[tuple[str, str], dict[str, Revision]] = {}   # (repo_type, repo_id) -> revision name -> ..
        self.cdn_files: dict[str, bytes] = {}   # sha256 -> an LFS file's bytes
        self.log: list[Request] = []
        self.page_size = page_size   # tree entries per page; the hub's is 1000

    def publish(self, repo_id: str, revision: str, files: dict[str, bytes | Path], repo_type: str = "model") -> str:
        """Make `files` (path in repo -> bytes or a file to read) a branch or ref of the repo. Returns its commit
        hash: the sha1 of the repo, the revision's name and its files, so the same build gets the same hashes and
        no two revisions share one."""
        content = {p: File.of(p, f.read_bytes() if isinstance(f, Path) else f) for p, f in sorted(files.items())}
        h = hashlib.sha1(f"{repo_type}s/{repo_id}@{revision}".encode())
        for path, f in content.items():
            h.update(f"\0{path}\0{f.oid}".encode())
            if f.sha256:
                self.cdn_files[f.sha256] = f.data
        self.repos.setdefault((repo_type, repo_id), {})[revision] = Revision(h.hexdigest(), content)
        return h.hexdigest()

    def revision(self, repo_id: str, rev: str, repo_type: str = "model") -> Revision | None:
        """A revision by name or by commit hash, as the hub resolves {rev}."""
        return next((r for name, r in self.repos.get((repo_type, repo_id), {}).items() if rev in (name, r.commit)),
                    None)

    def start(self) -> StandInHub:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)   # port 0: a free one
        self._server.hub = self
        port = self._server.server_address[1]
        self.endpoint, self.cdn = f"http://127.0.0.1:{port}", f"http://localhost:{port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    REPO = r"(?P<repo>[^/]+(?:/[^/]+)?)/"
    API = re.compile(r"/api/(?P<kind>model|dataset)s/" + REPO + r"(?P<route>revision|tree)/(?P<rev>[^/]+)")
    RESOLVE = re.compile(r"/(?:(?P<kind>dataset)s/)?" + REPO + r"resolve/(?P<rev>[^/]+)/(?P<file>.+)")
    CDN = re.compile(r"/cdn/(?P<sha256>[0-9a-f]{64})")

    def do_GET(self) -> None:
        hub: StandInHub = self.server.hub
        path, _, query = self.path.partition("?")
        if m := self.CDN.fullmatch(path):
            data = hub.cdn_files.get(m["sha256"])
            return self._send(404, {}) if data is None else self._bytes(data)
        m = self.API.fullmatch(path) or self.RESOLVE.fullmatch(path)
        if m is None:
            return self._send(404, {})
        rev = self._revision(hub, m["kind"] or "model", m["repo"], unquote(m["rev"]))
        if rev is None:
            return
        if m.re is self.RESOLVE:
            return self._resolve(hub, rev, unquote(m["file"]))
        if m["route"] == "revision":
            return self._json({"id": m["repo"], "sha": rev.commit, "private": False,
                               "siblings": [{"rfilename": p} for p in rev.files]})
        params = {k: v[0] for k, v in parse_qs(query).items()}
        entries, start = rev.tree(params.get("recursive") == "true"), int(params.pop("cursor", 0))
        end, link = start + hub.page_size, {}
        if end < len(entries):   # huggingface_hub follows rel="next" until a page comes without it
            next_page = f'http://{self.headers["Host"]}{path}?{urlencode(params | {"cursor": end})}'
            link = {"Link": f'<{next_page}>; rel="next"'}
        self._json(entries[start:end], link)

    do_HEAD = do_GET   # _send leaves the body out of HEAD answers

    def _revision(self, hub: StandInHub, kind: str, repo_id: str, rev: str) -> Revision | None:
        """The revision asked for, or None once the hub's error is sent."""
        if (kind, repo_id) not in hub.repos:
            return self._error(401, "RepoNotFound", "Repository not found")
        if (found := hub.revision(repo_id, rev, kind)) is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return found

    def _resolve(self, hub: StandInHub, rev: Revision, file: str) -> None:
        f = rev.files.get(file)
        if f is None:   # X-Repo-Commit lets huggingface_hub note the absence in its cache (.no_exist/<commit>/)
            return self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": rev.commit})
        headers = {"X-Repo-Commit": rev.commit, "ETag": f'"{f.oid}"'}
        if f.sha256 is None:
            return self._bytes(f.data, headers)
        self._send(302, headers | {"Location": f"{hub.cdn}/cdn/{f.sha256}", "X-Linked-Etag": f'"{f.sha256}"',
                                   "X-Linked-Size": str(len(f.data))})

    def _bytes(self, data: bytes, headers: dict | None = None) -> None:
        """A file's bytes, from an offset when asked (http_get resumes an interrupted download with Range)."""
        headers = (headers or {}) | {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if m is None:
            return self._send(200, headers, data)
        start = int(m[1])
        self._send(206, headers | {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}, data[start:])

    def _json(self, obj, headers: dict | None = None) -> None:
        self._send(200, (headers or {}) | {"Content-Type": "application/json"}, json.dumps(obj).encode())

    def _error(self, status: int, code: str, message: str, headers: dict | None = None) -> None:
        headers = (headers or {}) | {"X-Error-Code": code, "X-Error-Message": message}
        self._send(status, headers | {"Content-Type": "application/json"}, json.dumps({"error": message}).encode())

    def _send(self, status: int, headers: dict, body: bytes = b"") -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_request(self, code="-", size="-") -> None:   # send_response calls it: the log the tests read
        self.server.hub.log.append(Request(self.command, self.path, int(code)))

    def log_message(self, *args) -> None:   # nothing on stderr
        pass


# ----------------------------------------------------------------------------- pointing huggingface_hub at it

def use_hub(monkeypatch, hub: StandInHub, home: Path, offline: bool = False) -> dict[str, str]:
    """Point huggingface_hub at `hub` with its cache under `home`, in this process and in the subprocesses given the
    environment this returns. huggingface_hub read the variables into `constants` when it was imported, so in this
    process the constants its download code reads at call time are patched as well."""
    from huggingface_hub import constants, hf_api

    # HF_HUB_CACHE would win over HF_HOME, and either offline variable would hold in a subprocess.
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    env = {"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"} | ({"HF_HUB_OFFLINE": "1"} if offline else {})
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)   # read by each new HfApi: repo info, tree listing
    monkeypatch.setattr(hf_api.api, "endpoint", hub.endpoint)   # the one behind huggingface_hub.model_info & co.
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/"
                                                                                 "{filename}")   # hf_hub_url's
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    # Telemetry also means asking {ENDPOINT}/api/agent-harnesses before the first request of a process.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    return dict(os.environ)


# ----------------------------------------------------------------------------- the repos, laid out like the real ones

def write_legacy(folder: Path, hf, *, shards: int = 1, dtype=torch.float32, drop_rotary_pct=False) -> Path:
    """Write hf's weights as OpenCALM's `main` holds them: pickled pytorch_model.bin (or shards + index) with the
    head named embed_out.weight and three legacy buffers per layer, and a 2023-style config.json."""
    c = hf.config
    folder.mkdir(parents=True)
    sd = {("embed_out.weight" if k == "lm_head.weight" else k): v.to(dtype) for k, v in hf.state_dict().items()}
    P = c.max_position_embeddings
    rd = int(c.hidden_size // c.num_attention_heads * c.rope_parameters["partial_rotary_factor"])
    legacy = {}
    for i in range(c.num_hidden_layers):
        pre = f"gpt_neox.layers.{i}.attention."
        mask_dtype = torch.uint8 if shards == 1 else torch.bool   # older files: uint8; later GPT-NeoX: bool
        legacy[pre + "bias"] = torch.tril(torch.ones(P, P, dtype=mask_dtype)).view(1, 1, P, P)
        legacy[pre + "masked_bias"] = torch.tensor(-1e9)
        legacy[pre + "rotary_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, rd, 2).float() / rd)
    sd = sd | legacy
    if shards == 1:
        torch.save(sd, folder / "pytorch_model.bin")
    else:
        names = list(sd)
        parts = [names[i::shards] for i in range(shards)]
        files = [f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin" for i in range(shards)]
        for file, part in zip(files, parts):
            torch.save({k: sd[k] for k in part}, folder / file)
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
                 "weight_map": {k: f for f, part in zip(files, parts) for k in part}}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    cfg = {"architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu",
           "hidden_size": c.hidden_size, "initializer_range": 0.02, "intermediate_size": c.intermediate_size,
           "layer_norm_eps": 1e-05, "max_position_embeddings": P, "model_type": "gpt_neox",
           "num_attention_heads": c.num_attention_heads, "num_hidden_layers": c.num_hidden_layers,
           "rotary_emb_base": 10000, "rotary_pct": c.rope_parameters["partial_rotary_factor"],
           "tie_word_embeddings": False, "torch_dtype": str(dtype).removeprefix("torch."),
           "transformers_version": "4.27.0.dev0", "use_cache": True,
           "use_parallel_residual": c.use_parallel_residual, "vocab_size": c.vocab_size}
    if drop_rotary_pct:
        del cfg["rotary_pct"]
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


# OpenCALM's two layouts (the hub's file lists of cyberagent/open-calm-*): `main` holds pickles; a pull-request ref
# (main plus the conversion bot's commit) adds the same weights as safetensors.
OPEN_CALM = {"cyberagent/open-calm-7b": {"seed": 7, "shards": 2, "pr": "refs/pr/5"},
             "cyberagent/open-calm-small": {"seed": 1, "shards": 1, "pr": "refs/pr/1"}}
SPECIAL_TOKENS = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
TOKENIZER_CONFIG = SPECIAL_TOKENS | {"add_prefix_space": False, "model_max_length": 2048,
                                    "tokenizer_class": "GPTNeoXTokenizer"}
MODEL_CARD = "---\nlicense: cc-by-sa-4.0\nlanguage:\n- ja\n---\n# {}\n\nA random tiny stand-in for the tests.\n"
JGLUE_SCRIPT = ('"""A stand-in for the loading script: clients read the Parquet files."""\nimport datasets\n\n\n'
                "class JGLUE(datasets.GeneratorBasedBuilder):\n    pass\n")
JGLUE_CARD = "---\nlanguage:\n- ja\nlicense: cc-by-4.0\n---\n# JGLUE\n\nA stand-in made of real Amazon reviews.\n"
PARQUET_REF = "refs/convert/parquet"   # where the hub's Parquet conversion of a dataset lives
MARC_LABELS = {"positive": 0, "negative": 1}   # JGLUE's ClassLabel order


def build_open_calm(folder: Path, repo_id: str, seed: int, shards: int, pr: str, tokenizer: Path) -> dict:
    """A random tiny OpenCALM-shaped model (vocab 50304 covers the GPT-NeoX tokenizer) as its repo's revisions."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    hf = GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=50304, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        rotary_pct=1.0, rotary_emb_base=10000, use_parallel_residual=False, max_position_embeddings=512,
        bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)).eval()
    main = write_legacy(folder / "main", hf, shards=shards, dtype=torch.float16)
    shutil.copyfile(tokenizer, main / "tokenizer.json")
    (main / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS, indent=2))
    (main / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))
    (main / "README.md").write_text(MODEL_CARD.format(repo_id))
    ref = shutil.copytree(main, folder / pr)
    # Two 3.2 MB embeddings: a 4 MB limit puts them in two shards.
    hf.half().save_pretrained(folder / "written", max_shard_size="4MB" if shards == 2 else "1GB")
    for f in (folder / "written").glob("model*.safetensors*"):
        shutil.copyfile(f, ref / f.name)
    return {("model", repo_id, "main"): main, ("model", repo_id, pr): ref}


def first_sentence(text: str) -> str:
    return text[: text.index("。") + 1] if "。" in text else text


def write_parquet(file: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    file.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), file)   # str -> string, int -> int64, a dict of lists -> struct


def jsquad_row(r: dict, i: int) -> dict:
    """A JSQuAD row (the loading script's flat features) from a review: the context is "title [SEP] review" with the
    review id as title, and the question asks for a span of it, by turns the review's first sentence (two golds: with
    and without its 。, as SQuAD's several annotators give), its last sentence, or the title."""
    title, review = r["review_id"], r["sentence"]
    head = f"{title} [SEP] "
    sentences = [s.strip() for s in re.findall(r"[^。]+。?", review) if s.strip()]
    question, golds, start = [
        ("このレビューの最初の文は何ですか?", [sentences[0], sentences[0].removesuffix("。")],
         len(head) + review.index(sentences[0])),
        ("このレビューの最後の文は何ですか?", [sentences[-1]], len(head) + review.rindex(sentences[-1])),
        ("このレビューのタイトルは何ですか?", [title], 0)][i % 3]
    golds = list(dict.fromkeys(golds))   # one gold where the first sentence has no 。
    return {"id": f"{title}-q{i}", "title": title, "context": head + review, "question": question,
            "answers": {"text": golds, "answer_start": [start] * len(golds)}, "is_impossible": False}


def jcommonsenseqa_row(rows: list[dict], i: int) -> dict:
    """A JCommonsenseQA row (q_id int, question, choice0..choice4, label int) from reviews: which of five words is in
    this review's opening sentence? The right one is a word of it, the others words of the next four reviews; the
    right one's place cycles through the five."""
    def word(r: dict) -> str:   # a run of 2-4 characters from the middle of the review's first sentence
        s = first_sentence(r["sentence"]).strip("。 ")
        return s[len(s) // 2:len(s) // 2 + 2 + len(s) % 3] or s[:2]
    others = [word(r) for r in rows[i + 1:i + 5]]
    label = i % 5
    choices = others[:label] + [word(rows[i])] + others[label:]
    return {"q_id": 8000 + i, "question": f"「{first_sentence(rows[i]['sentence'])}」に出てくる言葉はどれ?",
            **{f"choice{k}": c for k, c in enumerate(choices)}, "label": label}


def jsts_rows(rows: list[dict], n: int) -> "pa.Table":
    """JSTS rows (sentence_pair_id, yjcaptions_id, sentence1, sentence2, label float32, as the loading script's
    Value("float32") is stored) from reviews: a sentence with itself (5.0), with another of the same sentiment (2.4) or
    of the other one (0.6)."""
    import pyarrow as pa

    out = []
    for i in range(n):
        a, b = rows[i], rows[i + 1 + i % 2]
        same = i % 3 == 0
        label = 5.0 if same else 2.4 if a["label"] == b["label"] else 0.6
        out.append({"sentence_pair_id": str(i), "yjcaptions_id": f"{a['review_id']}-{b['review_id']}",
                    "sentence1": first_sentence(a["sentence"]),
                    "sentence2": first_sentence((a if same else b)["sentence"]), "label": label})
    schema = pa.schema([(k, pa.string()) for k in ("sentence_pair_id", "yjcaptions_id", "sentence1", "sentence2")]
                       + [("label", pa.float32())])
    return pa.Table.from_pylist(out, schema=schema)


def build_jglue(folder: Path, reviews: Path, marc_rows=(128, 32), jnli_rows=(96, 24),
                jsquad_rows=(48, 16), jcqa_rows=(60, 15), jsts_n=(60, 18)) -> dict:
    """shunk031/JGLUE: a loading script on `main`, Parquet files on refs/convert/parquet, in the two layouts its
    listings have shown. MARC-ja is real reviews, as jglue-{split}.parquet with a train/ folder beside them (the same
    rows); JNLI pairs the first sentences of two reviews, labels cycling 0 entailment, 1 contradiction, 2 neutral;
    JSQuAD asks for spans of reviews (jsquad_row), as {split}/NNNN.parquet beside an index.duckdb, train in two
    shards; JCommonsenseQA (jcommonsenseqa_row) as {split}/0000.parquet, JSTS (jsts_rows) as jglue-{split}.parquet."""
    import pyarrow.parquet as pq

    main, parquet = folder / "main", folder / PARQUET_REF
    main.mkdir(parents=True)
    (main / "JGLUE.py").write_text(JGLUE_SCRIPT)
    (main / "README.md").write_text(JGLUE_CARD)
    for split, file, n_marc, n_jnli, n_jsquad in zip(("train", "validation"), ("train.jsonl", "valid.jsonl"),
                                                     marc_rows, jnli_rows, jsquad_rows):
        with open(reviews / file, encoding="utf-8") as f:
            rows = [json.loads(line) for line, _ in zip(f, range(max(n_marc, 2 * n_jnli, n_jsquad, 200)))]
        marc = [{"sentence": r["sentence"], "label": MARC_LABELS[r["label"]], "review_id": r["review_id"]}
                for r in rows[:n_marc]]
        write_parquet(parquet / f"MARC-ja/jglue-{split}.parquet", marc)
        if split == "train":
            write_parquet(parquet / "MARC-ja/train/0000.parquet", marc)
        jsquad = [jsquad_row(r, i) for i, r in enumerate(rows[:n_jsquad])]
        shards = (jsquad[: n_jsquad // 2], jsquad[n_jsquad // 2:]) if split == "train" else (jsquad,)
        for n, shard in enumerate(shards):
            write_parquet(parquet / f"JSQuAD/{split}/{n:04d}.parquet", shard)
        (parquet / f"JSQuAD/{split}/index.duckdb").write_bytes(b"DUCK")   # a placeholder: not read
        write_parquet(parquet / f"JNLI/jglue-{split}.parquet", [
            {"sentence_pair_id": str(i), "yjcaptions_id": f"{a['review_id']}-{b['review_id']}",
             "sentence1": first_sentence(a["sentence"]), "sentence2": first_sentence(b["sentence"]), "label": i % 3}
            for i, (a, b) in enumerate(zip(rows[0:2 * n_jnli:2], rows[1:2 * n_jnli:2]))])
        n_jcqa, n_jsts = jcqa_rows[split == "validation"], jsts_n[split == "validation"]
        write_parquet(parquet / f"JCommonsenseQA/{split}/0000.parquet", [jcommonsenseqa_row(rows, i)
                                                                         for i in range(n_jcqa)])
        (parquet / "JSTS").mkdir(exist_ok=True)
        pq.write_table(jsts_rows(rows, n_jsts), parquet / f"JSTS/jglue-{split}.parquet")
    return {("dataset", "shunk031/JGLUE", "main"): main, ("dataset", "shunk031/JGLUE", PARQUET_REF): parquet}


def build_standin_repos(root: Path, tokenizer: Path = NEOX_TOKENIZER, reviews: Path = REVIEWS) -> dict:
    """Write the repos under root; returns {(repo_type, repo_id, revision): {path in repo: file}} to publish."""
    folders = build_jglue(root / "datasets/shunk031/JGLUE", reviews)
    for repo_id, layout in OPEN_CALM.items():
        folders |= build_open_calm(root / "models" / repo_id, repo_id, tokenizer=tokenizer, **layout)
    return {key: {p.relative_to(d).as_posix(): p for p in sorted(d.rglob("*")) if p.is_file()}
            for key, d in folders.items()}


def serve(root: Path) -> StandInHub:
    """Build the repos under root, publish them and start serving them."""
    hub = StandInHub()
    for (repo_type, repo_id, revision), files in build_standin_repos(root).items():
        hub.publish(repo_id, revision, files, repo_type=repo_type)
    return hub.start()
