"""The small commands of `python -m minicalm`: generate, merge and convert; each
a config dataclass (its flags, tools/cli.py) and a function.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..config import DEVICE, Dtype, check_choices, check_positions, refuse, resolve_dtype
from ..generate import decode_n_tokens, greedy, prefill, sampler
from ..io.adapter import base_for, load_adapter, save_merged
from ..io.files import atomic_folder, check_writable, write_text
from ..io.tokenizer import load_tokenizer
from ..io.weights import convert_bin_to_safetensors, load_model, resolve, stored_dtype
from ..model import eval_mode
from ..tasks.data import PromptEncoder, asked_row
from ..tasks.task import find_task
from .cli import command
from .evaluate import Answers

# ----------------------------------------------------------------------------- generate

@dataclass
class GenerateConfig:
    text: list[str]                          # texts (default: one per non-blank line of stdin, read as UTF-8); a
                                             # task with several fields takes them tab-separated (jnli: premise,
                                             # hypothesis; alpaca: instruction and, if any, input)
    model: str | None = None                 # hub id or folder (also a merged checkpoint); default: the --adapter's
                                             # base, else cyberagent/open-calm-7b
    revision: str | None = None              # hub revision; default: the --adapter's, for its base
    adapter: str | None = None               # LoRA adapter folder (PEFT format, e.g. RUN/adapter)
    task: str | None = None                  # built-in task or task file; default: the task.json beside --adapter
                                             # (or in --model's folder), else marc-ja
    raw: bool = False                        # let the model continue the text itself, no prompt
    max_new_tokens: int | None = None        # new tokens at most; default: 8 for a label word, the task's budget
                                             # for a free-form answer, 100 with --raw; a prompt
                                             # plus these must fit the model's positions (max_position_embeddings)
    temperature: float = 0.0                 # --raw: 0 is greedy, above 0 samples
    top_k: int | None = None                 # --raw: sample among the k likeliest tokens; default: among all
    seed: int = 0                            # --raw: the sampling seed
    max_len: int = 256                       # answers: tokens of the prompt with the answer word and eos; a longer
                                             # text is cut. --raw cuts nothing: a text too long for the model is
                                             # refused
    device: str = DEVICE                     # cuda if this torch has it, else cpu
    dtype: Dtype = "auto"                    # the base's (config.resolve_dtype)

    def __post_init__(self):
        check_choices(self)
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise refuse(self, "max_new_tokens", "at least 1")
        if not 0 <= self.temperature < math.inf:
            raise refuse(self, "temperature", "finite and >= 0 (0: greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise refuse(self, "top_k", "at least 1")
        if self.max_len < 1:
            raise refuse(self, "max_len", "at least 1 token")
        # a task's answer is greedy, as evaluation's: sampling settings without --raw would be silently ignored
        if not self.raw and self.temperature != 0:
            raise refuse(self, "temperature", "0 without --raw (a task's answers are greedy)")
        if not self.raw and self.top_k is not None:
            raise refuse(self, "top_k", "unset without --raw (a task's answers are greedy)")


def stdin_lines() -> list[str]:
    """The non-blank lines of stdin, decoded as UTF-8 whatever the locale says; a line that is not names itself."""
    if sys.stdin is None:   # started with stdin closed (<&-)
        raise ValueError("no texts: give them as arguments, or as lines on stdin (which is closed)")
    lines = []
    for n, raw in enumerate(sys.stdin.buffer, 1):
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            raise ValueError(f"stdin:{n}: not UTF-8 text ({e.reason} at byte {e.start + 1} of the line)") from None
        if line.strip():
            lines.append(line)
    return lines


def check_fits(model, prompt: list[int], more: int, text: str, fix: str) -> None:
    """Refuse a prompt that, with `more` tokens after it, would run past the model's positions (and a huge count would
    first allocate a cache for all of them)."""
    check_positions(model.config, len(prompt) + more, ("GenerateConfig", "max_new_tokens"),
                    f"the prompt's {len(prompt)} tokens (text {shown(text)}) plus {more} more", fix)


def shown(text: str) -> str:
    """A text as messages show it: its first 30 characters."""
    return repr(text[:30]) + ("..." if len(text) > 30 else "")


def answer_texts(model, tok, task, texts: list[str], max_len: int, max_new_tokens: int) -> Iterator[str]:
    """One line per text: the task's greedy answer (or `invalid`), what the model wrote, each label word's
    probability after the prompt, the text; for a free-form task the answer (newlines as \\n) and the text. A task
    with several fields takes them tab-separated, in its order (Alpaca's input may be left out).
    Every text is checked before the first answer, so a bad one stops the command before it prints."""
    enc = PromptEncoder(tok, max_len, task)
    answers = Answers(model, tok, enc, max_new_tokens, likelihood=not task.free_form)
    more = max([max_new_tokens, *map(len, enc.answer_ids.values())])   # the answer written, or a label word scored
    prompts, choices = [], []
    for text in texts:
        row = asked_row(task, task.fields_of(text))
        ids, cut = enc.encode_prompt(row)
        if cut:   # the answer is to what the model saw: say so
            print(f"{shown(text)}: cut to --max-len {max_len} tokens with the prompt (raise --max-len to answer all "
                  f"of it)", file=sys.stderr)
        prompts.append(ids)
        choices.append(row.choices or None)
        check_fits(model, ids, more, text, "lower --max-len (a longer text is cut to it) or --max-new-tokens")
    for prompt, text, offered in zip(prompts, texts, choices):
        (p,) = answers([prompt], offered and [offered])
        if task.free_form:
            yield f"{p['answer']}\t{text}".replace("\n", "\\n")
            continue
        if offered:   # the greedy answer's choice (or invalid), what was written, each choice's probability
            probs = " ".join(f"p({k})={math.exp(x):.3f}" for k, x in enumerate(p["logprobs"]))
            pick = p["generated_answer"]
            yield f"{'invalid' if pick is None else pick}\t{p['continuation']!r}\t{probs}\t{text}"
            continue
        probs = " ".join(f"p({label})={torch.tensor(p[f'logprob_{label}']).exp():.3f}" for label in task.labels)
        yield f"{p['answer'] or 'invalid'}\t{p['continuation']!r}\t{probs}\t{text}"


@torch.inference_mode()
def continue_text(model, tok, ids: list[int], max_new_tokens: int, pick: Callable) -> Iterator[str]:
    """The model's own continuation of a text's ids (until EOS), as pieces of text to print as they come."""
    device = model.gpt_neox.embed_in.weight.device
    logits, state = prefill(model, torch.tensor([ids], device=device), extra=max_new_tokens)
    new, shown = [], ""
    for token in decode_n_tokens(model, logits, state, max_new_tokens, pick=pick, stop_ids={tok.eos_token_id},
                                 pad_id=tok.pad_token_id):
        if int(token) == tok.eos_token_id:
            break
        new.append(int(token))
        text = tok.decode(new).rstrip("\ufffd")   # hold back a character whose bytes are not all there yet
        yield text[len(shown):]
        shown = text


def generate(a: GenerateConfig) -> None:
    texts = a.text or stdin_lines()
    if not texts:
        raise ValueError("no texts: give them as arguments, or as lines on stdin")
    model_id, revision = base_for(a.adapter, a.model, a.revision)
    tok = load_tokenizer(model_id, revision=revision)
    task = None if a.raw else find_task(a.task, a.adapter, model_id)
    model = load_model(model_id, dtype=a.dtype, device=a.device, revision=revision)
    if a.adapter:
        load_adapter(model, a.adapter, base=model_id)
    n = a.max_new_tokens or (100 if a.raw else task.answer_budget)   # None: the default (0 is refused)
    if not a.raw:
        with eval_mode(model), torch.inference_mode():
            for line in answer_texts(model, tok, task, texts, a.max_len, n):
                print(line, flush=True)
        return
    ids = [tok.encode(text) or [tok.eos_token_id] for text in texts]   # an empty text starts after EOS, a new document
    for prompt, text in zip(ids, texts):   # all before the first is continued
        check_fits(model, prompt, n, text, "--raw cuts nothing: shorten the text or lower --max-new-tokens")
    g = torch.Generator(a.device).manual_seed(a.seed)
    pick = greedy if a.temperature <= 0 else sampler(a.temperature, a.top_k, g)
    for prompt, text in zip(ids, texts):
        print(text, end="", flush=True)
        for piece in continue_text(model, tok, prompt, n, pick):
            print(piece, end="", flush=True)
        print()


GENERATE = ("Answer each text (or each non-blank line of stdin) with a task's prompt: the greedy answer, whether it is "
            "a valid one, and each label word's probability; for a free-form task (alpaca, jsquad, a free-form "
            "adapter's) the answer it writes. With --raw the model continues the text itself, greedy or sampled, "
            "streaming tokens as they come.")


# ----------------------------------------------------------------------------- merge, convert

@dataclass
class MergeConfig:
    adapter: str                             # adapter folder (adapter_config.json + adapter_model.safetensors)
    out: str = "runs/merged"                 # output folder for the merged checkpoint: new or empty (never the base's)
    model: str | None = None                 # base checkpoint; default: the one the adapter records
    revision: str | None = None              # hub revision; default: the one the adapter records
    dtype: Dtype = "auto"                    # the merged weights' dtype; auto: the base checkpoint's own
                                             # (W + s B A is computed in fp32, rounded once)
    force: bool = False                      # replace a checkpoint already in --out (never the base or the adapter)


def check_out(out: str, keep: dict[str, Path], force: bool) -> None:
    """Refuse an --out for a new checkpoint that would overwrite what must be kept (`keep`: {what: folder}; resolved,
    symlinks too) or an existing checkpoint (unless `force`), or that holds other files; and one that cannot be
    written. Before any work."""
    out_path = Path(out)
    where = out_path.resolve()
    for what, folder in keep.items():
        if where == folder.resolve() or where in folder.resolve().parents:
            raise FileExistsError(f"--out {out} is the folder of {what} ({folder.resolve()}) or holds it: writing "
                                  f"there would overwrite it; choose another --out")
    held = sorted(p.name for p in out_path.iterdir()) if out_path.is_dir() else []
    if held and not any(n == "config.json" or n.endswith((".safetensors", ".bin")) for n in held):
        raise FileExistsError(f"--out {out} holds other files ({', '.join(held[:3])}...): choose a new or empty folder")
    if held and not force:
        raise FileExistsError(f"--out {out} already holds a checkpoint: pass --force to replace it, or choose another "
                              f"--out")
    check_writable(out_path, "--out")
    check_writable(out_path.parent, "--out's parent folder")   # the new checkpoint is written beside it first


def merge(a: MergeConfig) -> None:
    model_id, revision = base_for(a.adapter, a.model, a.revision)
    folder = resolve(model_id, revision)
    check_out(a.out, {"the adapter's base": folder, "the adapter": Path(a.adapter)}, a.force)
    model = load_model(model_id, dtype=resolve_dtype(a.dtype, "cpu", stored=stored_dtype(folder)), revision=revision)
    load_adapter(model, a.adapter, base=model_id)
    with atomic_folder(a.out, replace=a.force) as tmp:   # whole or not at all: tokenizer and task.json included
        save_merged(model, tmp, tokenizer_dir=folder)
        if (Path(a.adapter) / "task.json").is_file():   # the question the adapter was trained to answer
            write_text(tmp / "task.json", (Path(a.adapter) / "task.json").read_text(encoding="utf-8"))
    print(f"wrote {a.out}")


@dataclass
class ConvertConfig:
    src: str                                 # checkpoint folder or hub id with pytorch_model*.bin weights
    out: str                                 # output folder for sharded safetensors: new or empty (never src)
    revision: str | None = None              # hub revision of src
    dtype: Dtype = "auto"                    # auto: the checkpoint's own
    force: bool = False                      # replace a checkpoint already in --out (never src)


def convert(a: ConvertConfig) -> None:
    folder = resolve(a.src, a.revision)
    check_out(a.out, {"the checkpoint converted": folder}, a.force)
    print(f"wrote {convert_bin_to_safetensors(folder, a.out, a.dtype, replace=a.force)}")


COMMANDS = {   # name: (config, function, what it does)
    "generate": (GenerateConfig, generate, GENERATE),
    "merge": (MergeConfig, merge, "Merge a LoRA adapter into its base model and write a plain GPT-NeoX checkpoint "
                                  "(safetensors, with the tokenizer and the run's task.json)."),
    "convert": (ConvertConfig, convert, "Convert a pytorch_model*.bin GPT-NeoX checkpoint to sharded safetensors."),
}


def main(argv: list[str] | None = None) -> None:
    """python -m minicalm COMMAND [flags]."""
    from . import plan as planner
    from .adapter_stats import StatsConfig, stats
    from .plot import PlotConfig, plot
    from .serve import SERVE, ServeConfig, serve
    table = COMMANDS | {
        "plan": (planner.PlanConfig, planner.show, planner.__doc__),
        "plot": (PlotConfig, plot, "Draw a run's metrics.jsonl (loss, lr, gradient norm, tokens/s) into "
                                   "RUN_DIR/plots/*.png; works while the run is still going."),
        "stats": (StatsConfig, stats, "What a LoRA adapter changed: update norms, spectra, amplification, and "
                                      "subspace similarity with another adapter (adapter_stats.json + PNGs)."),
        "serve": (ServeConfig, serve, SERVE),
    }
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in table:
        names = "\n".join(f"  {name:9} {what.splitlines()[0][:100]}" for name, (_, _, what) in table.items())
        sys.exit(f"usage: python -m minicalm COMMAND [--help | flags]\ncommands:\n{names}")
    cls, fn, what = table[argv[0]]
    command(cls, fn, f"python -m minicalm {argv[0]}", what, argv[1:])
