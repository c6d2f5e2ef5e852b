"""Dotted command-line flags from the frozen config dataclasses; stdlib only, shared by every subcommand.

`add_dataclass_flags(parser, "data", DataConfig)` turns every field into a dotted flag
(`--data.seq-len`, `--data.tfds-data-dir`), its choices from the field's `Literal` type and its help from the
field's description (config.py's `arch` / `impl` / `training`: `metadata["help"]`, an implementation-only
field marked so), or else from the `# comment` after the field, and
`dataclass_from_args(args, "data", DataConfig)` builds the config from the flags the user gave.
A bad flag prints one line and a pointer to `--help`, not the whole usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import re
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal

from lecture3.errors import Lecture3Error


class UsageError(Lecture3Error):
    """A flag value that the config rejected; reported like any other bad input."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag prints one line and where the list is, not the whole usage (66 lines).

    No abbreviations (`--train.step` is not taken for `--train.steps`), and a flag no parser knows is
    reported by the subcommand's parser (`lecture3 train --help`, where the flags are), with close matches.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # subparsers are made by this class too
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} --help` lists the flags and values)\n")

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = self.chosen(parsed)
            known = [s for a in parser._actions for s in a.option_strings]
            close = {f: difflib.get_close_matches(f.partition("=")[0], known, n=1) for f in extras
                     if f.startswith("-")}
            hints = "; ".join(f"{f}: did you mean {m[0]}?" for f, m in close.items() if m)
            parser.error(f"unrecognized arguments: {' '.join(extras)}" + (f" ({hints})" if hints else ""))
        return parsed

    def chosen(self, args: argparse.Namespace) -> argparse.ArgumentParser:
        """The innermost subcommand's parser that `args` went through (self without subcommands)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                sub = action.choices.get(getattr(args, action.dest, None))
                if sub is not None:
                    return sub.chosen(args) if isinstance(sub, ArgumentParser) else sub
        return self


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
        if field.metadata.get("kind") == "implementation":
            doc += " [implementation only: same maths]"
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
