"""A thin wrapper over `tokenizers.Tokenizer` loaded from a checkpoint's tokenizer.json. No BOS is added."""
from __future__ import annotations

import functools
import os
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from .files import atomic_write
from .weights import resolve


class Tokenizer:
    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json here")
        try:
            self.tk = _HFTokenizer.from_file(str(path))
        except Exception as e:
            raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from None
        self.path = path
        self.eos_token_id = self._id("<|endoftext|>", 0)
        self.pad_token_id = self._id("<|padding|>", self.eos_token_id)

    def _id(self, token: str, default: int) -> int:
        i = self.tk.token_to_id(token)
        return default if i is None else i

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @functools.cached_property   # one scan of the vocabulary per tokenizer
    def texts(self) -> list[str]:
        """Each token's own text."""
        return [self.decode([i], False) for i in range(self.vocab_size)]

    @functools.cached_property
    def line_end_ids(self) -> tuple[set[int], set[int]]:
        """(stop ids, blank ids) for a one-line answer: EOS and every token whose text holds a newline end it;
        the whitespace-only ones among them (blank lines) end it only once it has started."""
        newline = self.ids_holding(["\n"])
        return {self.eos_token_id} | newline, {i for i in newline if not self.texts[i].strip()}

    def ids_holding(self, strings: list[str]) -> set[int]:
        """The tokens whose text holds one of `strings` (a stop string within one token)."""
        return {i for i, t in enumerate(self.texts) if any(s in t for s in strings)}


def load_tokenizer(name_or_path: str | os.PathLike, *, revision: str | None = None) -> Tokenizer:
    """From a folder holding tokenizer.json, a tokenizer.json path, or a hub id."""
    path = Path(name_or_path)
    if path.is_file():
        return Tokenizer(path)
    folder = resolve(name_or_path, revision, weights=False)
    if not (folder / "tokenizer.json").is_file() and not path.is_dir():
        raise FileNotFoundError(f"{name_or_path} (revision {revision or 'main'}) has no tokenizer.json on the hub")
    return Tokenizer(folder / "tokenizer.json")


def train_tokenizer(texts, path: str | os.PathLike, vocab_size: int = 4000) -> Tokenizer:
    """Train a byte-level BPE like OpenCALM's (`<|endoftext|>` = 0, `<|padding|>` = 1) and save tokenizer.json."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = _HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts, trainer)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: tk.save(str(p)))
    return Tokenizer(path)
