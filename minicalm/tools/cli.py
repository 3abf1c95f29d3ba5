"""Command-line plumbing: each command's flags derived from its config dataclass, and one way to report errors.

A field of the dataclass is a flag (`micro_batch_size` -> `--micro-batch-size`): its comment in the class is the
help, its default the default, its type the parsing (a Literal gives the choices; a bool a switch with both forms,
`--x` and `--no-x`; a tuple comma-separated values). A field without a default is a positional argument (a list: any
number of them). A nested config adds its own fields, prefixed by the field's name (`lora.r` -> `--lora-r`), except
switches named `use_*`, which read as they are (`--use-dora`). `--config FILE` takes the settings from a JSON file:
the command's own (a run's train_config.json for train_lora.py), or, for the other commands, a training run's
train_config.json, of which they take what names the model and the question (RUN_SETTINGS); flags given with it
override. A bad setting or input ends the command with one line that
names the flag or the file, and exit status 1 (argparse's own usage errors: 2). A list with a default is a flag given
once per value (`--adapter a=x --adapter b=y`).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import sys
import textwrap
import tokenize
import types
import typing

from ..config import SettingError
from ..io.files import read_json

ERRORS = (ValueError, OSError, ImportError, MemoryError, FloatingPointError)   # bad input or a stopped run
# What a command other than training takes from a training run's train_config.json (`--config RUN/train_config.json`):
# the model it was trained on and the question. Not where it writes (out), nor lengths and batch sizes, which are
# each command's own (evaluation fits the prompts to the model's positions, not to the training cut).
RUN_SETTINGS = ("model", "revision", "task", "dtype", "quantize", "device")
NOT_FROM_FILE = ("resume",)   # how a run was started, not a setting: a rerun from its file starts anew


def field_comments(cls) -> dict[str, str]:
    """Each field's comment in the class's source: the comment on its line(s) and the comment-only lines below it."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments = {t.start[0]: t.string.lstrip("#").strip()
                for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT}
    lines, helps = source.splitlines(), {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            n, text = node.end_lineno + 1, [comments[i] for i in range(node.lineno, node.end_lineno + 1) if i in comments]
            while n in comments and lines[n - 1].lstrip().startswith("#"):
                text.append(comments[n])
                n += 1
            helps[node.target.id] = " ".join(text)
    return helps


def flag_name(prefix: str, name: str) -> str:
    return "--" + (name if not prefix or name.startswith("use_") else f"{prefix}_{name}").replace("_", "-")


class Flags:
    """An argparse parser for a config dataclass, and the way back from parsed values to the config."""

    def __init__(self, cls, prog: str, description: str = ""):
        self.cls, self.parser = cls, argparse.ArgumentParser(prog=prog, description=description,
                                                             formatter_class=argparse.RawDescriptionHelpFormatter)
        self.flags: dict[tuple[str, str], str] = {}   # (config class, field) -> its flag, for error messages
        own = "a run's train_config.json, " if cls.__name__ == "TrainConfig" else ""
        self.parser.add_argument("--config", metavar="FILE", help=f"take the settings from a JSON file: {own}this "
                                 f"command's settings (any of them), or a training run's train_config.json, of which "
                                 f"it takes {', '.join(RUN_SETTINGS)} (those it has); flags given with it override")
        self.add(cls, "")

    def add(self, cls, prefix: str) -> None:
        hints, helps = typing.get_type_hints(cls), field_comments(cls)
        for f in dataclasses.fields(cls):
            kind = hints[f.name]
            if dataclasses.is_dataclass(kind):
                self.add(kind, f.name)
                continue
            dest = f"{prefix}.{f.name}" if prefix else f.name
            self.flags[(cls.__name__, f.name)] = flag = flag_name(prefix, f.name)
            self.argument(flag, dest, kind, f, helps.get(f.name, ""))

    def argument(self, flag: str, dest: str, kind, f: dataclasses.Field, help: str) -> None:
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        args = typing.get_args(kind)
        inner = next((a for a in args if a is not type(None)), kind) if is_optional(kind) else kind
        if default is dataclasses.MISSING:   # a positional argument
            many = typing.get_origin(inner) is list
            self.parser.add_argument(dest, nargs="*" if many else None, help=help, metavar=f.name.upper())
            self.flags[(self.cls.__name__, f.name)] = f.name.upper()
        elif typing.get_origin(inner) is list:   # a flag given once per value: --adapter a=x --adapter b=y
            self.parser.add_argument(flag, dest=dest, action="append", default=list(default), help=help + " (repeat "
                                     "the flag for more)", metavar=flag[2:].replace("-", "_").upper())
        elif inner is bool:   # --x and --no-x: a setting taken from --config can be turned either way
            self.parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=default,
                                     help=help + f" (default: {'on' if default else 'off'})")
        else:
            choices = typing.get_args(inner) if typing.get_origin(inner) is typing.Literal else None
            convert = comma_list if typing.get_origin(inner) is tuple else (type(choices[0]) if choices else inner)
            shown = ",".join(default) if isinstance(default, tuple) else default
            self.parser.add_argument(flag, dest=dest, type=convert, default=default, choices=choices,
                                     metavar=None if choices else flag[2:].replace("-", "_").upper(),
                                     help=help + ("" if default is None else f" (default: {shown})"))

    def parse(self, argv: list[str] | None = None):
        """The config the command line asks for."""
        path = self.parser.parse_known_args(argv)[0].config
        if path:   # the file's settings become the defaults, so that the flags given override them
            self.parser.set_defaults(**flatten(read_settings(path, self.cls)))
        values = vars(self.parser.parse_args(argv))
        values.pop("config")
        return self.build(values)

    def build(self, values: dict):
        """The config from the parser's values: "lora.r" and its siblings become the nested LoraConfig."""
        settings: dict = {}
        for key, v in values.items():
            head, _, rest = key.partition(".")
            if rest:
                settings.setdefault(head, {})[rest] = v
            else:
                settings[key] = v
        hints = typing.get_type_hints(self.cls)
        return self.cls(**{k: hints[k](**v) if isinstance(v, dict) else v for k, v in settings.items()})

    def flag(self, e: SettingError) -> str:
        return self.flags.get((e.owner, e.name), e.name)

    def main(self, fn, argv: list[str] | None = None):
        """Parse the flags and call fn(config): a bad setting or input is one line (naming the flag) and exit 1;
        Ctrl-C is one line and exit 130, as shells expect (every file is written whole or not at all)."""
        try:
            return fn(self.parse(argv))
        except SettingError as e:
            self.parser.exit(1, f"{self.parser.prog}: error: {self.flag(e)}: {e.message}\n")
        except ERRORS as e:
            self.parser.exit(1, f"{self.parser.prog}: error: {e}\n")
        except KeyboardInterrupt:
            self.parser.exit(130, f"\n{self.parser.prog}: stopped (Ctrl-C) before it was done; no file was left half-written\n")


def is_optional(kind) -> bool:
    return typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in typing.get_args(kind)


def comma_list(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def flatten(d: dict, prefix: str = "") -> dict:
    """{"lora": {"r": 8}} -> {"lora.r": 8}: the parser's names for a nested config's fields."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[prefix + k] = tuple(v) if isinstance(v, list) else v
    return out


def read_settings(path: str, cls) -> dict:
    """A config's settings from a JSON file: the config's own (a key it does not have is named), or a training run's
    train_config.json, of which a command other than training takes RUN_SETTINGS."""
    d = read_json(path, f"--config: {cls.__name__}'s settings as JSON")
    d = {k: v for k, v in d.items() if k not in NOT_FROM_FILE}
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown and {"lora", "epochs", "train_file"} <= d.keys():   # a training run's train_config.json
        return {k: d[k] for k in RUN_SETTINGS if k in d and k in fields}
    if unknown:
        raise ValueError(f"--config {path}: {', '.join(unknown)} not among {cls.__name__}'s settings (nor a "
                         f"training run's train_config.json, of which {', '.join(RUN_SETTINGS)} would be taken)")
    return d


def command(cls, fn, prog: str, description: str = "", argv: list[str] | None = None):
    """The whole of a command's main: its flags from `cls`, then fn(config), errors as one line."""
    return Flags(cls, prog, description).main(fn, sys.argv[1:] if argv is None else argv)
