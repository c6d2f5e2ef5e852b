"""The `lecture3` command line: subcommands whose flags come from the frozen config dataclasses.

`add_dataclass_flags(parser, "data", DataConfig)` turns every field into a dotted flag
(`--data.seq-len`, `--data.tfds-data-dir`), with the field's comment as its help, and
`dataclass_from_args(args, "data", DataConfig)` builds the config from the flags the user gave.
A subcommand is one entry of `COMMANDS`: name -> (help, add_arguments, run).

The project's own errors (`Lecture3Error`: bad input, a config that fails validation, a missing
extra) print one line `error: ...` and exit 2, a failed run (`TrainingError`) exits 1; anything else
is a bug and keeps its traceback. A bad flag prints one line and a pointer to `--help`, not the usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import re
import sys
import time
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, Literal

from lecture3.config import Config
from lecture3.data import DataConfig, corpus_stats
from lecture3.errors import Lecture3Error


class UsageError(Lecture3Error):
    """A flag value that the config rejected; reported like any other bad input."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag prints one line and where the list is, not the whole usage (66 lines)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} --help` lists the flags and values)\n")


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
                        aliases: dict[str, Sequence[str]] | None = None, *, defaults: Any = None) -> None:
    """Adds `--PREFIX.FIELD-NAME` for every field of the dataclass `cls` (plus optional `aliases`).

    The help shows each field's value in `defaults` (an instance of `cls`: the config a run starts from,
    e.g. `Config().model`), or the field's own default without one. Pass the same instance as `base` to
    `dataclass_from_args`, so that what --help says is what runs.
    """
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    group = parser.add_argument_group(f"{prefix} ({cls.__name__})")
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        spec = _flag_spec(hints[field.name], f"{cls.__name__}.{field.name}")
        if defaults is not None:
            default = getattr(defaults, field.name)
        elif field.default is not dataclasses.MISSING:
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
    add_dataclass_flags(parser, "data", DataConfig, aliases=aliases, defaults=Config().data)
    parser.add_argument("--max-documents", type=int, default=None,
                        help="count only the first N documents of each split of a large tfds dataset "
                        "(one not read through the token cache)")


def _run_data(args: argparse.Namespace) -> int:
    cfg = dataclass_from_args(args, "data", DataConfig, Config().data)  # the data `lecture3 train` reads
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
    from lecture3.generate_cli import add_generate_args, run_generate
    from lecture3.train_cli import command as train_command

    COMMANDS["train"] = train_command()
    COMMANDS["generate"] = ("continue prompts with a trained or Hugging Face model, using the KV cache",
                            add_generate_args, run_generate)


_register_model_commands()


def build_parser() -> argparse.ArgumentParser:
    """The `lecture3` parser with one subparser per entry of `COMMANDS`."""
    parser = ArgumentParser(prog="lecture3", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `lecture3 COMMAND ...`; returns the exit status (2 for bad input, 1 for a failed run)."""
    _xla_cpu_defaults()
    args = build_parser().parse_args(argv)
    from lecture3.trainer import TrainingError

    try:
        return COMMANDS[args.command][2](args)
    except Lecture3Error as e:  # the project's own errors only: a bug keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, TrainingError) else 2


_YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"


def _xla_cpu_defaults() -> None:
    """On CPU, let XLA fuse matmuls through YNNPACK (measured ~0.8x step time, same losses; see
    benchmarks/train_step_vs_torch.py). Flags are read when the backend starts, so this must run before
    any computation; LECTURE3_XLA_DEFAULTS=0 or a user's own setting of the flag turns it off.

    Only when the run will be on CPU (`_runs_on_cpu`) and the installed jaxlib knows the flag: XLA
    aborts at backend start on a flag it does not know, and an accelerator has no use for it.
    """
    import os

    current = os.environ.get("XLA_FLAGS", "")
    if (os.environ.get("LECTURE3_XLA_DEFAULTS", "1") != "0" and _YNN_FLAG not in current
            and _runs_on_cpu(os.environ) and _jaxlib_knows(_YNN_FLAG)):
        os.environ["XLA_FLAGS"] = f"{current} --{_YNN_FLAG}=dot".strip()


def _runs_on_cpu(environ: typing.Mapping[str, str]) -> bool:
    """Whether jax's default backend will be the CPU, decided without starting a backend: JAX_PLATFORMS
    names cpu first, or it is unset and no accelerator (a `jax_plugins` module or entry point, as
    jax[cuda] and jax[rocm] install, or libtpu) is installed. In doubt, not CPU: then nothing is set."""
    import importlib.metadata
    import importlib.util
    import pkgutil

    platforms = environ.get("JAX_PLATFORMS", environ.get("JAX_PLATFORM_NAME", "")).strip().lower()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    if importlib.util.find_spec("libtpu") is not None or importlib.metadata.entry_points(group="jax_plugins"):
        return False
    spec = importlib.util.find_spec("jax_plugins")
    return spec is None or not any(pkgutil.iter_modules(spec.submodule_search_locations or []))


@functools.cache
def _jaxlib_knows(flag: str) -> bool:
    """Whether the installed jaxlib's XLA defines `flag`: its name is in one of jaxlib's shared libraries
    (~10 ms when present, a full scan of ~350 MB, ~0.5 s, only when absent; once per process)."""
    import importlib.util
    import mmap
    import pathlib

    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        return False
    needle = flag.encode()
    for root in spec.submodule_search_locations:
        libs = [p for p in pathlib.Path(root).iterdir() if p.suffix in (".so", ".dylib", ".pyd", ".dll")]
        for lib in sorted(libs, key=lambda p: -p.stat().st_size):  # the big one holds XLA
            with open(lib, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                if data.find(needle) >= 0:
                    return True
    return False


if __name__ == "__main__":
    sys.exit(main())
