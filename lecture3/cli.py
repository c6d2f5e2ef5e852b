"""The `lecture3` command line: the table of subcommands, each in its own module.

    lecture3 data ...       lecture3.cli_data      corpus and tokenizer statistics
    lecture3 train ...      lecture3.cli_train     train or resume a run
    lecture3 generate ...   lecture3.cli_generate  continue prompts with the KV cache
    lecture3 experiment ... lecture3.cli_experiment  the lecture's claims: runs, criteria, reports
    lecture3 plan ...       lecture3.cli_plan      compile the train step for a TPU slice: fits or not

The flags come from the config dataclasses (`lecture3.flags`). The project's own errors
(`Lecture3Error`: bad input, a config that fails validation, a missing extra) print one line
`error: ...` and exit 2, a failed run (`TrainingError`) exits 1; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from lecture3 import cli_data, cli_experiment, cli_generate, cli_plan, cli_train, runtime
from lecture3.errors import Lecture3Error
from lecture3.flags import ArgumentParser, UsageError  # noqa: F401 - UsageError is part of the CLI's API

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: dict[str, Command] = {
    "data": cli_data.command(),
    "train": cli_train.command(),
    "generate": cli_generate.command(),
    "experiment": cli_experiment.command(),
    "plan": cli_plan.command(),
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
    runtime.cpu_defaults()  # before anything starts jax's backend
    args = build_parser().parse_args(argv)
    from lecture3.loop import TrainingError

    try:
        return COMMANDS[args.command][2](args)
    except Lecture3Error as e:  # the project's own errors only: a bug keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, TrainingError) else 2
    except BrokenPipeError:  # `lecture3 ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0


if __name__ == "__main__":
    sys.exit(main())
