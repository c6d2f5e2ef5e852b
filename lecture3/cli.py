"""The `lecture3` command line: the table of subcommands, each in its own module.

    lecture3 data ...       lecture3.cli_data      corpus and tokenizer statistics
    lecture3 train ...      lecture3.cli_train     train or resume a run
    lecture3 generate ...   lecture3.cli_generate  continue prompts with the KV cache
    lecture3 experiment ... lecture3.cli_experiment  the lecture's claims: runs, criteria, reports

The flags come from the config dataclasses (`lecture3.flags`). The project's own errors
(`Lecture3Error`: bad input, a config that fails validation, a missing extra) print one line
`error: ...` and exit 2, a failed run (`TrainingError`) exits 1; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import functools
import sys
import typing
from collections.abc import Callable, Sequence

from lecture3 import cli_data, cli_experiment, cli_generate, cli_train
from lecture3.errors import Lecture3Error
from lecture3.flags import ArgumentParser, UsageError  # noqa: F401 - UsageError is part of the CLI's API

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: dict[str, Command] = {
    "data": cli_data.command(),
    "train": cli_train.command(),
    "generate": cli_generate.command(),
    "experiment": cli_experiment.command(),
}


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
    from lecture3.loop import TrainingError

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
