"""The `lecture3` command line: subcommands whose flags come from the frozen config dataclasses.

`add_dataclass_flags(parser, "data", DataConfig)` turns every field into a dotted flag
(`--data.seq-len`, `--data.tfds-data-dir`), with the field's comment as its help, and
`dataclass_from_args(args, "data", DataConfig)` builds the config from the flags the user gave.
A subcommand is one entry of `COMMANDS`: name -> (help, add_arguments, run).

Bad input (`DataError`, or a config that fails validation) prints one line `error: ...` and exits 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
import time
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, Literal

from lecture3.data import DataConfig, DataError, corpus_stats
from lecture3.errors import Lecture3Error


class UsageError(Lecture3Error):
    """A flag value that the config rejected; reported like any other bad input."""


# User errors: printed as one line with exit status 2. A subsystem with its own error type adds it here.
USER_ERRORS: tuple[type[Exception], ...] = (UsageError, DataError)
_NONE = "none"
_FIELD_COMMENT = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.+)$")


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _field_comments(cls: type) -> dict[str, str]:
    """The `# comment` after each field in the class source: the fields' one-line documentation."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return {m[1]: m[2].strip() for line in source.splitlines() if (m := _FIELD_COMMENT.match(line))}


def _parse_dataclass(cls: type, text: str):
    """`default` -> cls(); `k=v,k=v` -> cls(k=v, ...) with each value parsed by its field's type."""
    if text.strip().lower() == "default":
        return cls()
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in hints:
            raise argparse.ArgumentTypeError(
                f"expected default or k=v pairs with k in {sorted(hints)}, got {item!r}")
        kwargs[key] = hints[key](value)
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _flag_spec(tp: Any, where: str) -> dict[str, Any]:
    """argparse keywords (type, choices, metavar, nargs) for a field annotation."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"{where}: only `X | None` unions have flags, not {tp}")
        inner = _flag_spec(rest[0], where)
        parse = inner.get("type", str)
        spec = {**inner, "type": lambda s: None if s.strip().lower() == _NONE else parse(s)}
        if "choices" in inner:
            spec["choices"] = [*inner["choices"], None]
            spec["metavar"] = "{" + ",".join([*map(str, inner["choices"]), _NONE]) + "}"
        else:
            spec["metavar"] = f"{getattr(rest[0], '__name__', 'VALUE').upper()}|{_NONE}"
        return spec
    if typing.get_origin(tp) is Literal:
        kinds = {type(a) for a in args}
        parse = kinds.pop() if len(kinds) == 1 and kinds <= {str, int, float} else str
        return {"type": parse, "choices": list(args), "metavar": "{" + ",".join(map(str, args)) + "}"}
    if tp is bool:
        return {"type": _parse_bool, "metavar": "{true,false}"}
    if dataclasses.is_dataclass(tp):
        return {"type": lambda text: _parse_dataclass(tp, text),
                "metavar": ",".join(f"{f.name}=V" for f in dataclasses.fields(tp)) + "|default"}
    if tp in (int, float, str):
        return {"type": tp, "metavar": tp.__name__.upper()}
    if typing.get_origin(tp) is tuple:
        item = args[0] if args else str
        if args and not (len(args) == 2 and args[1] is Ellipsis) and len(set(args)) != 1:
            raise TypeError(f"{where}: tuples need one item type, not {tp}")
        parse = _flag_spec(item, where).get("type", str)
        return {"type": lambda s: tuple(parse(x) for x in s.split(",") if x.strip()),
                "metavar": f"{getattr(item, '__name__', 'X').upper()},..."}
    raise TypeError(f"{where}: no flag parser for type {tp}; add one to _flag_spec in lecture3/cli.py")


def add_dataclass_flags(parser: argparse.ArgumentParser, prefix: str, cls: type,
                        aliases: dict[str, Sequence[str]] | None = None) -> None:
    """Adds `--PREFIX.FIELD-NAME` for every field of the dataclass `cls` (plus optional `aliases`)."""
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    group = parser.add_argument_group(f"{prefix} ({cls.__name__})")
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        spec = _flag_spec(hints[field.name], f"{cls.__name__}.{field.name}")
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = "required"
        doc = field.metadata.get("help") or comments.get(field.name, "")
        default_text = _NONE if default is None else str(default)
        names = [f"--{prefix}.{field.name.replace('_', '-')}", *(aliases or {}).get(field.name, ())]
        # SUPPRESS: a flag the user did not give leaves no attribute, so the base config keeps its value.
        group.add_argument(*names, dest=f"{prefix}.{field.name}", default=argparse.SUPPRESS,
                           help=f"{doc} (default: {default_text})".replace("%", "%%"),
                           **spec)


def dataclass_from_args(args: argparse.Namespace, prefix: str, cls: type, base: Any = None) -> Any:
    """`cls` built from `base` (or its defaults) with the `--PREFIX.*` flags that were given."""
    changes = {f.name: getattr(args, f"{prefix}.{f.name}") for f in dataclasses.fields(cls)
               if f.init and hasattr(args, f"{prefix}.{f.name}")}
    try:
        return dataclasses.replace(base, **changes) if base is not None else cls(**changes)
    except ValueError as e:
        raise UsageError(str(e)) from None


# --- lecture3 data -------------------------------------------------------------------------------


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    aliases = {"source": ["--source"], "tokenizer": ["--tokenizer"]}
    add_dataclass_flags(parser, "data", DataConfig, aliases=aliases)
    parser.add_argument("--max-documents", type=int, default=None,
                        help="count only the first N documents of each split of a large tfds dataset "
                        "(one not read through the token cache)")


def _run_data(args: argparse.Namespace) -> int:
    cfg = dataclass_from_args(args, "data", DataConfig)
    start = time.perf_counter()
    stats = corpus_stats(cfg, max_documents=args.max_documents, progress=True)
    rows = [("source", stats["source"]), ("tokenizer", stats["tokenizer"]),
            ("vocab size", stats["vocab_size"])]
    for role in ("train", "validation"):
        s = stats[role]
        rows += [(f"{role} documents", f"{s['documents']:,}"), (f"{role} bytes", f"{s['bytes']:,}"),
                 (f"{role} tokens", f"{s['tokens']:,}"),
                 (f"{role} bytes/token", f"{s['bytes_per_token']:.3f}"),
                 (f"{role} invalid UTF-8", f"{s['invalid_utf8_replaced']:,} replaced")]
    rows.append(("validation sequences", f"{stats['validation_sequences']} of {cfg.seq_len + 1} tokens"))
    rows.append(("time", f"{time.perf_counter() - start:.1f} s"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print(f"sample ({stats['sample_tokens']} tokens, decoded):")
    print(stats["sample"])
    return 0


Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: dict[str, Command] = {
    "data": ("build a corpus and tokenizer and print their statistics", _add_data_args, _run_data),
}


def _register_model_commands() -> None:
    """train and generate import the model stack (jax, flax, optax, orbax): only add them here."""
    from lecture3.checkpoint import CheckpointError
    from lecture3.generate_cli import add_generate_args, run_generate
    from lecture3.sharding import MeshError
    from lecture3.train_cli import command as train_command

    global USER_ERRORS
    COMMANDS["train"] = train_command()
    COMMANDS["generate"] = ("continue prompts with a trained or Hugging Face model, using the KV cache",
                            add_generate_args, run_generate)
    USER_ERRORS = (*USER_ERRORS, CheckpointError, MeshError)


_register_model_commands()


def build_parser() -> argparse.ArgumentParser:
    """The `lecture3` parser with one subparser per entry of `COMMANDS`."""
    parser = argparse.ArgumentParser(prog="lecture3", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `lecture3 COMMAND ...`; returns the exit status (2 for bad input)."""
    _xla_cpu_defaults()
    args = build_parser().parse_args(argv)
    from lecture3.trainer import TrainingError

    try:
        return COMMANDS[args.command][2](args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _xla_cpu_defaults() -> None:
    """On CPU, let XLA fuse matmuls through YNNPACK (measured ~0.8x step time, same losses; see
    benchmarks/train_step_vs_torch.py). Flags are read when the backend starts, so this must run before
    any computation; LECTURE3_XLA_DEFAULTS=0 or a user's own setting of the flag turns it off."""
    import os

    flag = "--xla_cpu_experimental_ynn_fusion_type"
    current = os.environ.get("XLA_FLAGS", "")
    if os.environ.get("LECTURE3_XLA_DEFAULTS", "1") != "0" and flag not in current:
        os.environ["XLA_FLAGS"] = f"{current} {flag}=dot".strip()


if __name__ == "__main__":
    sys.exit(main())
