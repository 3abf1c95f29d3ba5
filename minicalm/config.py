"""The settings, each in one typed home: CalmConfig (the model, from a checkpoint's config.json), LoraConfig (the
adapter), and the dtype rule. Each checks itself when it is built, so a bad value fails where it is made.
(TrainConfig, the training run's settings, opens train.py.)
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import asdict, dataclass
from pathlib import Path

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


# ----------------------------------------------------------------------------- LoRA's settings

class SettingError(ValueError):
    """A setting that cannot be used; `name` is the parameter, so a command can name its flag instead."""

    def __init__(self, owner: str, name: str, message: str):
        super().__init__(f"{owner}.{name}: {message}")
        self.owner, self.name, self.message = owner, name, message


def check(settings, rules: dict[str, tuple[bool, str]]) -> None:
    """Refuse a settings dataclass's first bad value: a Literal field outside its choices, or a rule that does not
    hold ({field: (holds, what it must be)}); one SettingError naming the field, what it must be and its value."""
    hints = typing.get_type_hints(type(settings))
    for f in dataclasses.fields(settings):
        kind = hints[f.name]
        choices = [c for a in (kind, *typing.get_args(kind)) if typing.get_origin(a) is typing.Literal
                   for c in typing.get_args(a)]
        if choices and getattr(settings, f.name) not in choices + [None] * (type(None) in typing.get_args(kind)):
            rules = {f.name: (False, f"one of {', '.join(map(str, choices))}")}   # this one first, alone
            break
    for name, (holds, rule) in rules.items():
        if not holds:
            raise SettingError(type(settings).__name__, name, f"must be {rule}, got {getattr(settings, name)!r}")


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
        init = "default" if self.init is True else self.init   # PEFT's init_lora_weights=True
        if not (init in INITS[:3] + INITS[4:] or isinstance(init, str) and re.fullmatch(r"pissa_niter_\d+", init)):
            raise bad("init", f"{init!r}: expected one of {', '.join(INITS)} (K a number of iterations)")
        object.__setattr__(self, "init", init)
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

DTYPES = ("auto", "bfloat16", "float16", "float32")


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
