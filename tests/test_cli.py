"""The `lecture3` entry point: what --help says runs, bad flags in one line, which errors are caught, the
CPU-only XLA default."""

import argparse
import dataclasses
import importlib.machinery
import importlib.util
import os
import sys

import pytest

from lecture3 import cli, cli_data, cli_generate, cli_train, presets, runtime
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


@pytest.mark.parametrize("argv,message,help_", [
    (["train", "--model.norm", "batchnorm"], "invalid choice: 'batchnorm'", "lecture3 train --help"),
    (["train", "--train.stepz", "3"], "unrecognized arguments: --train.stepz", "lecture3 train --help"),
    (["data", "--data.seq-len", "8", "--nope"], "unrecognized arguments: --nope", "lecture3 data --help"),
    (["generate", "--hf", "x", "--max-new-tokens", "many"], "invalid int value: 'many'", "lecture3 generate --help"),
    (["trian"], "invalid choice: 'trian'", "lecture3 --help"),
])
def test_a_bad_flag_is_one_line_and_a_hint_to_the_help_that_lists_the_flags(argv, message, help_, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 2, err
    first, hint = err.strip().splitlines()
    assert first.startswith("lecture3") and message in first and f"`{help_}`" in hint


def parsers(parser: argparse.ArgumentParser):
    """`parser` and every subcommand's parser below it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from parsers(sub)


def test_no_parser_takes_an_abbreviation(capsys):
    """`--train.step 20` is not silently `--train.steps 20`: an error naming the flag it resembles."""
    assert all(not p.allow_abbrev for p in parsers(cli.build_parser()))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--train.step", "20"])
    first = capsys.readouterr().err.splitlines()[0]
    assert exit_.value.code == 2
    assert first == ("lecture3 train: error: unrecognized arguments: --train.step 20 "
                     "(--train.step: did you mean --train.steps?)")


@pytest.mark.parametrize("preset", ["llama3", "llama3:"])
def test_a_preset_without_its_size_is_an_error_listing_the_sizes(preset, capsys):
    assert cli.main(["train", "--preset", preset]) == 2  # before anything is built or trained
    err = capsys.readouterr().err
    assert err == (f"error: --preset {preset!r}: name a size: one of "
                   + ", ".join(f"llama3:{s}" for s in presets.sizes("llama3")) + "\n")


@pytest.mark.parametrize("argv,line", [
    ([], "training: model custom (the default model, no --preset); data stdlib, tokenizer bytes; "
         "16 rows x 128 = 2,048 tokens per step x 600 steps = 1,228,800 tokens"),
    (["--preset", "llama3:tiny", "--model.n-kv-heads", "1", "--data.source", "files:*.txt", "--data.tokenizer",
      "bpe:512", "--train.batch-size", "8", "--train.steps", "20"],
     "training: model llama3:tiny with n_kv_heads=1; data files:*.txt, tokenizer bpe:512; "
     "8 rows x 128 = 1,024 tokens per step x 20 steps = 20,480 tokens"),
    (["--preset", "gpt2:tiny"], "training: model gpt2:tiny; data stdlib"),
    (["--model.n-layers", "2"], "training: model custom (n_layers=2); data stdlib"),
])
def test_the_header_names_the_model_the_data_and_the_tokens(argv, line):
    args = cli.build_parser().parse_args(["train", *argv])
    assert cli_train.header(cli_train.config_from_args(args), args.preset).startswith(line)


def test_the_header_comes_before_the_parameter_table(monkeypatch, tmp_path, capsys):
    from lecture3 import loop

    monkeypatch.setattr(loop, "train", lambda cfg, workdir: loop.Run(cfg, loop.History()))
    argv = ["train", "--preset", "llama3:tiny", "--train.sample-tokens", "0", "--workdir", str(tmp_path / "wd")]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("training: model llama3:tiny; data stdlib, tokenizer bytes; 16 rows x ")
    assert out[1].split() == ["component", "params", "share"]


def test_generate_help_shows_every_default():
    """Every flag that takes a value and has a default says it (not the model source, one of which is required)."""
    parser = subparser("generate")
    required = {a for g in parser._mutually_exclusive_groups if g.required for a in g._group_actions}
    for action in parser._actions:
        if (action.option_strings and action.nargs != 0 and action not in required
                and not isinstance(action, argparse._AppendAction)):
            assert "(default: " in action.help, action.option_strings


def test_generate_draws_a_fresh_seed_unless_one_is_given():
    assert cli_generate.sampling_seed(7) == 7 and cli_generate.sampling_seed(0) == 0
    assert len({cli_generate.sampling_seed(None) for _ in range(5)}) > 1


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


@pytest.mark.slow  # compiles a tiny model's prefill and decode twice
def test_generate_prints_the_seed_it_drew_and_that_seed_repeats_the_sample(monkeypatch, capsys):
    import lecture3

    cfg = presets.get("llama3", "tiny")
    monkeypatch.setattr(cli_generate, "_load", lambda args: (cfg, lecture3.init_params(cfg, 0), None))
    argv = ["generate", "--hf", "unused", "--tokens", "1,2,3", "--max-new-tokens", "4", "--temperature", "2"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    seed = int(err.split("[seed ")[1].split(":")[0])
    assert f"--seed {seed} repeats this sample" in err
    assert cli.main([*argv, "--seed", str(seed)]) == 0
    assert capsys.readouterr().out == out


def test_the_tensorboard_the_readme_tells_users_to_run_is_an_extra():
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert [r for r in extras["tb"] if r.startswith("tensorboard")]
    assert '`pip install -e ".[tb]"` and `tensorboard --logdir DIR/tb`' in (root / "README.md").read_text()


def test_output_piped_into_head_ends_quietly(monkeypatch, tmp_path):
    """`lecture3 experiment --csv | head`: the reader leaving is not an error (no BrokenPipeError trace)."""
    def closed_pipe(args):
        raise BrokenPipeError(32, "Broken pipe")

    help_text, add_args, _ = cli.COMMANDS["data"]
    monkeypatch.setitem(cli.COMMANDS, "data", (help_text, add_args, closed_pipe))
    with open(tmp_path / "out", "w") as f:
        monkeypatch.setattr(sys, "stdout", f)
        assert cli.main(["data"]) == 0
