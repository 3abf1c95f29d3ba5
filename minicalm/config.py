"""The settings, each in one typed home: CalmConfig (the model, from a checkpoint's config.json), LoraConfig (the
adapter), the dtype rule, and TrainConfig (the training run's, which train.py's loop takes). Each checks itself when
it is built, in plain statements, so a bad value fails where it is made, naming the field (a command names its flag).
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from .io.files import read_json   # the border: a config is read from a file

POST_MODEL = "cyberagent/open-calm-7b"   # the blog post's model, the scripts' default
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"   # the commands' default device

# hidden_act spellings we accept, mapped to torch's GELU `approximate` argument.
GELUS = {"gelu": "none", "gelu_new": "tanh", "gelu_fast": "tanh", "gelu_pytorch_tanh": "tanh"}


@dataclass
class CalmConfig:
    vocab_size: int = 52096            # rows of embed_in / embed_out
    hidden_size: int = 768             # C
    num_hidden_layers: int = 12
    num_attention_heads: int = 12      # nh; head size hs = C / nh
    intermediate_size: int = 3072      # MLP width
    rotary_pct: float = 1.0            # share of each head's dims that get RoPE (Pythia: 0.25)
    rotary_emb_base: float = 10000.0   # RoPE theta
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = False  # OpenCALM: sequential; Pythia: parallel
    hidden_act: str = "gelu"           # exact erf GELU; tanh variants also accepted
    attention_bias: bool = True        # biases on query_key_value and attention.dense
    tie_word_embeddings: bool = False  # embed_out shares embed_in's weight
    bos_token_id: int = 0
    eos_token_id: int = 0

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.hidden_act not in GELUS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not a GELU; GPT-NeoX here supports {sorted(GELUS)}")

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_ndims(self) -> int:
        return int(self.head_size * self.rotary_pct)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "CalmConfig":
        if d.get("model_type") != "gpt_neox":
            raise ValueError(f"{source}: model_type is {d.get('model_type')!r}, minicalm only runs 'gpt_neox'")
        rope = d.get("rope_parameters") or {}  # transformers 5.x spelling
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"{source}: rope_type {rope['rope_type']!r} is not supported (only 'default')")
        # a missing rotary_pct means 0.25 in transformers (its GPT-NeoX default), never assume OpenCALM's 1.0
        pct = rope.get("partial_rotary_factor", d.get("rotary_pct", 0.25))
        base = rope.get("rope_theta", d.get("rotary_emb_base", 10000.0))
        eos = d.get("eos_token_id", 0)
        try:
            return cls(
                vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_hidden_layers=d["num_hidden_layers"],
                num_attention_heads=d["num_attention_heads"], intermediate_size=d["intermediate_size"],
                rotary_pct=float(pct), rotary_emb_base=float(base),
                max_position_embeddings=d.get("max_position_embeddings", 2048),
                layer_norm_eps=d.get("layer_norm_eps", 1e-5),
                use_parallel_residual=d.get("use_parallel_residual", True),
                hidden_act=d.get("hidden_act", "gelu"), attention_bias=d.get("attention_bias", True),
                tie_word_embeddings=d.get("tie_word_embeddings", False),
                bos_token_id=d.get("bos_token_id", 0) or 0, eos_token_id=(eos[0] if isinstance(eos, list) else eos) or 0,
            )
        except KeyError as e:
            raise ValueError(f"{source}: missing required field {e.args[0]!r}") from None
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "CalmConfig":
        return cls.from_dict(read_json(path, "a checkpoint's config.json"), source=str(path))

    def to_dict(self) -> dict:
        """config.json contents in the 2023 OpenCALM spelling plus transformers 5.x's rope_parameters."""
        d = asdict(self)
        d.update(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"],
                 rope_parameters={"rope_type": "default", "rope_theta": self.rotary_emb_base,
                                  "partial_rotary_factor": self.rotary_pct})
        return d


def check_positions(config: CalmConfig, tokens: int, setting: tuple[str, str], what: str, fix: str) -> None:
    """The one check that a sequence fits the model's positions (setting: the (settings class, field) to name). Past
    max_position_embeddings the model runs at positions it never saw in training and writes garbage without a word."""
    positions = config.max_position_embeddings
    if tokens > positions:
        raise SettingError(*setting, f"{what + ': ' if what else ''}{tokens} tokens, past the model's {positions} "
                                     f"positions (max_position_embeddings); {fix}")


def _calm(hidden: int, layers: int, heads: int, vocab: int) -> CalmConfig:
    return CalmConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=4 * hidden)


# The six OpenCALM sizes (their config.json files on the hub, cyberagent/open-calm-*) and a tiny one for tests.
PRESETS: dict[str, CalmConfig] = {
    "open-calm-small": _calm(768, 12, 12, 52096),
    "open-calm-medium": _calm(1024, 24, 16, 52096),
    "open-calm-large": _calm(1536, 24, 16, 52096),
    "open-calm-1b": _calm(2048, 24, 16, 52096),
    "open-calm-3b": _calm(2560, 32, 32, 52224),
    "open-calm-7b": _calm(4096, 32, 32, 52224),
    "tiny": CalmConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=256, max_position_embeddings=256),
}


def get_preset(name: str) -> CalmConfig:
    """A preset by name; `cyberagent/open-calm-7b` and `open-calm-7b` both work."""
    key = name.split("/")[-1]
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[key]


# ----------------------------------------------------------------------------- settings that check themselves

class SettingError(ValueError):
    """A setting that cannot be used; `name` is the parameter, so a command can name its flag instead."""

    def __init__(self, owner: str, name: str, message: str):
        super().__init__(f"{owner}.{name}: {message}")
        self.owner, self.name, self.message = owner, name, message


def refuse(settings, name: str, rule: str) -> SettingError:
    """The error for a settings dataclass's bad value: the field, what it must be and what it is."""
    return SettingError(type(settings).__name__, name, f"must be {rule}, got {getattr(settings, name)!r}")


def check_choices(settings) -> None:
    """Refuse a Literal field (a dtype, a mode) outside its choices; None where the field is Optional."""
    hints = typing.get_type_hints(type(settings))
    for f in dataclasses.fields(settings):
        kind = hints[f.name]
        choices = [c for a in (kind, *typing.get_args(kind)) if typing.get_origin(a) is typing.Literal
                   for c in typing.get_args(a)]
        if choices and getattr(settings, f.name) not in choices + [None] * (type(None) in typing.get_args(kind)):
            raise refuse(settings, f.name, f"one of {', '.join(map(str, choices))}")


# ----------------------------------------------------------------------------- LoRA's settings

BLOCK_LINEARS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")   # a block's linear layers, in order
INITS = ("default", "gaussian", "pissa", "pissa_niter_K", "olora")   # K: a number of subspace iterations


@dataclass(frozen=True)
class LoraConfig:
    """LoRA's settings (Hu et al. 2021) and its variants' (variants.py), under PEFT's meanings."""
    r: int = 8                                   # rank of the update B A
    alpha: float = 16.0                          # the update is scaled by alpha / r
    dropout: float = 0.05                        # on the LoRA path's input only
    targets: tuple[str, ...] = ("query_key_value",)   # which linear layers of every block get an adapter
    use_dora: bool = False                       # DoRA: a learned magnitude per output row, LoRA for the direction
    use_rslora: bool = False                     # rsLoRA: scale by alpha / sqrt(r) instead of alpha / r
    init: str = "default"                        # A and B from: default (Kaiming A, zero B), gaussian, pissa (the
                                                 # weight's top singular directions), pissa_niter_K, olora (its QR)

    def __post_init__(self):
        bad = lambda name, why: SettingError("LoraConfig", name, why)   # noqa: E731
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise bad("r", f"the rank must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise bad("alpha", f"must be a positive number (the update's scale is alpha / r), got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise bad("dropout", f"must be in [0, 1), got {self.dropout!r}")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets or ())
        unknown = [t for t in targets if t not in BLOCK_LINEARS]
        if unknown or not targets:
            raise bad("targets", f"unknown {unknown or 'none given'}; the block's linear layers are "
                                 f"{', '.join(BLOCK_LINEARS)}")
        init = self.init
        if not (init in INITS[:3] + INITS[4:] or isinstance(init, str) and re.fullmatch(r"pissa_niter_\d+", init)):
            raise bad("init", f"{init!r}: expected one of {', '.join(INITS)} (K a number of iterations)")
        if self.use_dora and self.residual:
            raise bad("init", f"{init} with use_dora: an adapter on a residual base cannot be saved for the original "
                              f"base (the conversion to a plain LoRA does not hold for DoRA's norms)")
        object.__setattr__(self, "targets", tuple(t for t in BLOCK_LINEARS if t in targets))   # the block's order

    @property
    def scaling(self) -> float:
        """s in h = W x + s B A x: alpha / r (the paper), or rsLoRA's alpha / sqrt(r)."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def residual(self) -> bool:
        """Whether the init moves part of W into the adapter (PiSSA, OLoRA), leaving a residual base."""
        return self.init.startswith(("pissa", "olora"))


# ----------------------------------------------------------------------------- the dtype rule

Dtype = Literal["auto", "bfloat16", "float16", "float32"]   # every command's --dtype: resolve_dtype's names
DTYPES = typing.get_args(Dtype)


def resolve_dtype(dtype: str | torch.dtype | None, device, stored: torch.dtype | None = None,
                  bf16: bool | None = None) -> torch.dtype:
    """The one dtype rule. A dtype or its name as given; "auto" (or None): the checkpoint's own dtype (`stored`) where
    a checkpoint is written (merging, converting), else bf16 on a GPU that supports it (`bf16`; None: ask this
    machine's) and fp32 elsewhere (CPU matmuls in bf16 are slow, and fp32 is what the tests compare against). What
    stays fp32 whatever this says: train.py."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, *DTYPES):
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if dtype not in (None, "auto"):
        return getattr(torch, dtype)
    if stored is not None:
        return stored
    if torch.device(device).type != "cuda":
        return torch.float32
    if bf16 is None:
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16 else torch.float32


# ----------------------------------------------------------------------------- the training run's settings

@dataclass
class TrainConfig:
    """train()'s settings (train.py), each a flag of train_lora.py: its comment is the help."""
    model: str = POST_MODEL                  # hub id (cyberagent/open-calm-small ... -7b) or local checkpoint folder
    revision: str | None = None              # hub branch, tag or commit (refs/pr/5: 7b's safetensors); recorded in
                                             # the adapter, so evaluation loads the same one
    task: str = "marc-ja"                    # built-in task (marc-ja, jnli, jsts, jcommonsenseqa, alpaca, jsquad), a
                                             # task JSON file (label words, choices per row, a free-form answer or a
                                             # number) or an llm-jp-eval file
    train_file: str | None = None            # JSON lines (or a JSON array) of the task's rows; default: the task
                                             # file's samples, else its train split from the hub
    valid_file: str | None = None            # JSON lines; default: the task's validation split; "none" skips it
    out: str = "runs/open-calm-7b-lora"      # run folder: adapter/, state.pt, metrics.jsonl, train_config.json
    epochs: float = 3.0                      # passes over the training set
    lr: float = 3e-4                         # peak learning rate
    batch_size: int = 64                     # examples per optimizer step, all processes together
    micro_batch_size: int = 16               # examples per forward/backward on one process
    max_len: int = 256                       # tokens per example; a longer row's text is cut to fit
    lora: LoraConfig = field(default_factory=LoraConfig)   # the adapter: rank, alpha, dropout, targets, variant
    loraplus_lr_ratio: float | None = None   # LoRA+: B (and DoRA's m) learn at lr x this ratio, A at lr (e.g. 16)
    quantize: Literal["nf4"] | None = None   # QLoRA: the base's block weights in 4-bit NormalFloat (nf4.py)
    warmup_steps: int = 100                  # steps of linear warmup to lr
    schedule: Literal["cosine", "linear"] = "cosine"   # the decay after warmup, to zero
    weight_decay: float = 0.0                # AdamW's
    grad_clip: float = 1.0                   # largest gradient norm (0: no clipping)
    eval_every: int = 500                    # steps between validation losses (0: only at the end)
    eval_limit: int = 500                    # validation rows for the loss
    eval_accuracy: int = 0                   # validation rows answered greedily: accuracy, or exact match and
                                             # char F1 for free-form answers (0: none)
    save_every: int = 500                    # steps between checkpoints (0: only at the end)
    max_steps: int | None = None             # stop after this many steps (instead of epochs)
    max_time: float | None = None            # seconds; stop and save once exceeded
    limit_train: int | None = None           # use only the first N training rows
    seed: int = 1337                         # data order, LoRA's A, dropout
    device: str = DEVICE                     # cuda if this torch has it, else cpu
    dtype: Dtype = "auto"                    # the base's (resolve_dtype); float16 (GPUs without bf16: T4, V100)
                                             # trains with a dynamic loss scale
    resume: bool = False                     # continue the run checkpointed in out
    train_on_inputs: bool = False            # loss on the whole prompt (the post's way), not on the answer only
    grad_checkpoint: bool = False            # recompute activations in backward to save memory
    share_prefix: bool = True                # compute the prompt prefix the rows share once per micro-batch (the same
                                             # loss and gradients; LoRA dropout's masks in it are then shared too)
    compile: bool = False                    # torch.compile each block (GPU runs; slow to start)
    full: bool = False                       # train every parameter (fp32) instead of LoRA: pretraining
    text: bool = False                       # raw-text language modelling (packed blocks of max_len), no prompt
    log: bool = True                         # progress bar and messages on stderr

    def __post_init__(self):
        if isinstance(self.lora, dict):      # as train_config.json holds it
            self.lora = LoraConfig(**self.lora)
        for name in ("model", "task", "train_file", "valid_file"):   # local paths recorded whole: the adapter names
            if getattr(self, name) and Path(getattr(self, name)).exists():   # its base, found from any folder
                setattr(self, name, str(Path(getattr(self, name)).resolve()))
        check_choices(self)
        for name in ("epochs", "lr", "max_time", "loraplus_lr_ratio"):   # None: unset
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise refuse(self, name, "positive (B's lr is lr x it)" if name == "loraplus_lr_ratio" else "positive")
        if self.micro_batch_size < 1:
            raise refuse(self, "micro_batch_size", "at least 1")
        if self.batch_size < 1 or self.batch_size % self.micro_batch_size:
            raise refuse(self, "batch_size", f"a positive multiple of micro_batch_size {self.micro_batch_size}")
        if self.max_len < 2:
            raise refuse(self, "max_len", "at least 2 tokens")
        if self.full and self.quantize:
            raise refuse(self, "quantize", "unset with full: a 4-bit base is frozen")
        for name in ("warmup_steps", "weight_decay", "grad_clip", "eval_every", "eval_limit", "eval_accuracy",
                     "save_every"):
            if getattr(self, name) < 0:
                raise refuse(self, name, ">= 0 (0: off)")
        for name in ("max_steps", "limit_train"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise refuse(self, name, "at least 1")
