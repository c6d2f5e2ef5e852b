"""The `lecture3` entry point: what --help says runs, bad flags in one line, which errors are caught, the
CPU-only XLA default."""

import argparse
import dataclasses
import importlib.machinery
import importlib.util
import os

import pytest

from lecture3 import cli, cli_data, runtime
from lecture3.config import Config
from lecture3.loop import TrainingError


def subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("command,sections", [("train", ("model", "data", "train", "mesh", "dist")),
                                              ("data", ("data",))])
def test_help_shows_the_defaults_the_run_uses(command, sections):
    """Every `--SECTION.FIELD` says `(default: X)` with X the value of `Config()` that runs without it."""
    actions = {a.dest: a for a in subparser(command)._actions}
    run = Config()
    for section in sections:
        for field in dataclasses.fields(getattr(run, section)):
            value = getattr(getattr(run, section), field.name)
            text = "none" if value is None else str(value)
            assert actions[f"{section}.{field.name}"].help.endswith(f"(default: {text})".replace("%", "%%")), (
                section, field.name, actions[f"{section}.{field.name}"].help)


@pytest.mark.parametrize("argv,message", [
    (["train", "--model.norm", "batchnorm"], "invalid choice: 'batchnorm'"),
    (["train", "--train.stepz", "3"], "unrecognized arguments: --train.stepz"),
    (["generate", "--hf", "x", "--max-new-tokens", "many"], "invalid int value: 'many'"),
    (["trian"], "invalid choice: 'trian'"),
])
def test_a_bad_flag_is_one_line_and_a_hint_not_the_usage(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 2, err
    first, hint = err.strip().splitlines()
    assert first.startswith("lecture3") and message in first and "--help" in hint


def raising(exc: BaseException):
    def run(args):
        raise exc
    return run


@pytest.mark.parametrize("exc,code", [(cli.UsageError("bad flag"), 2), (TrainingError("loss is nan"), 1)])
def test_the_project_errors_are_one_line(exc, code, monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "data", ("", cli_data.add_data_args, raising(exc)))
    assert cli.main(["data"]) == code
    assert capsys.readouterr().err == f"error: {exc}\n"


@pytest.mark.parametrize("exc", [ValueError("a bug"), KeyError("a bug"), FileNotFoundError("a bug")])
def test_any_other_error_keeps_its_traceback(exc, monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "data", ("", cli_data.add_data_args, raising(exc)))
    with pytest.raises(type(exc), match="a bug"):
        cli.main(["data"])


@pytest.mark.parametrize("env,cpu", [({"JAX_PLATFORMS": "cpu"}, True), ({"JAX_PLATFORMS": "cuda"}, False),
                                     ({"JAX_PLATFORMS": "tpu,cpu"}, False), ({"JAX_PLATFORMS": "cpu,cuda"}, True),
                                     ({"JAX_PLATFORM_NAME": "gpu"}, False)])
def test_the_platform_is_read_from_jax_platforms(env, cpu):
    assert runtime.runs_on_cpu(env) is cpu


def test_an_installed_accelerator_plugin_means_not_cpu(monkeypatch):
    assert runtime.runs_on_cpu({})  # this test machine: jax without plugins
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
        importlib.machinery.ModuleSpec("libtpu", None) if name == "libtpu" else real(name, *a)))
    assert not runtime.runs_on_cpu({})


def test_the_xla_flag_only_where_jaxlib_knows_it():
    assert runtime.jaxlib_knows(runtime.YNN_FLAG)  # jaxlib 0.10 has YNNPACK fusions
    assert not runtime.jaxlib_knows("xla_cpu_no_such_flag_in_any_jaxlib")


@pytest.mark.parametrize("env,knows,set_", [
    ({"JAX_PLATFORMS": "cpu"}, True, True),
    ({"JAX_PLATFORMS": "cuda"}, True, False),  # an accelerator: the CPU flag has nothing to do there
    ({"JAX_PLATFORMS": "cpu"}, False, False),  # an older jaxlib would abort on an unknown flag
    ({"JAX_PLATFORMS": "cpu", "LECTURE3_XLA_DEFAULTS": "0"}, True, False),
    ({"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=none"}, True, False),
])
def test_xla_cpu_defaults_are_set_only_on_cpu_with_a_jaxlib_that_knows_them(env, knows, set_, monkeypatch):
    for name in ("JAX_PLATFORMS", "JAX_PLATFORM_NAME", "LECTURE3_XLA_DEFAULTS", "XLA_FLAGS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(runtime, "jaxlib_knows", lambda flag: knows)
    monkeypatch.setattr(runtime, "backend_started", lambda: False)
    monkeypatch.setattr(runtime, "keep_host_memory", lambda: False)
    runtime.cpu_defaults()
    flags = os.environ.get("XLA_FLAGS", "")
    assert ("--xla_cpu_experimental_ynn_fusion_type=dot" in flags) is set_
    assert flags.count("xla_cpu_experimental_ynn_fusion_type") == (1 if set_ or "XLA_FLAGS" in env else 0)
