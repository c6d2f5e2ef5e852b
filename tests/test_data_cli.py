"""`lecture3 data` and the generic dataclass -> flags mechanism of the CLI; bad input is one line, exit 2."""

import argparse
import dataclasses
import os
import subprocess
import sys
from typing import Literal

import pytest

from lecture3.cli import main
from lecture3.data import DataConfig
from lecture3.flags import add_dataclass_flags, dataclass_from_args


@dataclasses.dataclass(frozen=True)
class Toy:
    """A config with one field of each kind the flags support."""

    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"  # which norm (Zhang & Sennrich 2019)
    heads: Literal[1, 2, 4] = 4  # an int choice
    window: int | None = None  # None is off
    bias: bool = False  # learnable bias
    scale: float = 1.0  # a float, 100% plain
    mesh: tuple[int, ...] = (1, 1)  # a shape
    soft_cap: Literal["tanh", "clip"] | None = None  # an optional choice

    def __post_init__(self):
        if self.scale <= 0:
            raise ValueError(f"Toy.scale={self.scale!r} is invalid: expected a positive number")


def toy_parser():
    parser = argparse.ArgumentParser(prog="toy", exit_on_error=False)
    add_dataclass_flags(parser, "model", Toy)
    return parser


def test_dataclass_flags_parse_every_kind_and_keep_unset_fields():
    args = toy_parser().parse_args(["--model.norm", "layernorm", "--model.heads", "2", "--model.window",
                                    "128", "--model.bias", "true", "--model.mesh", "2,4",
                                    "--model.soft-cap", "tanh"])
    assert dataclass_from_args(args, "model", Toy) == Toy("layernorm", 2, 128, True, 1.0, (2, 4), "tanh")
    base = Toy(scale=3.0, window=7)
    args = toy_parser().parse_args(["--model.window", "none", "--model.bias", "False"])
    assert dataclass_from_args(args, "model", Toy, base) == dataclasses.replace(base, window=None)


def test_dataclass_flags_help_lists_choices_and_comments(capsys):
    with pytest.raises(SystemExit):
        toy_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--model.soft-cap {tanh,clip,none}" in out and "{rmsnorm,layernorm}" in out
    assert "which norm (Zhang & Sennrich 2019) (default: rmsnorm)" in out and "100% plain" in out


def test_dataclass_flags_reject_bad_values():
    with pytest.raises(argparse.ArgumentError, match="invalid choice"):
        toy_parser().parse_args(["--model.norm", "batchnorm"])
    with pytest.raises(argparse.ArgumentError, match="true or false"):
        toy_parser().parse_args(["--model.bias", "maybe"])
    with pytest.raises(ValueError, match=r"Toy\.scale=-1\.0"):
        dataclass_from_args(toy_parser().parse_args(["--model.scale", "-1"]), "model", Toy)


@pytest.fixture
def corpus(tmp_path):
    for i in range(6):
        (tmp_path / f"d{i}.txt").write_text(f"document number {i} " * 40)
    return tmp_path


def run_data(capsys, *argv):
    code = main(["data", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_data_prints_corpus_statistics(corpus, tmp_path, capsys):
    """On a fresh cache, building the local corpus says so in one line; tfds' "Downloading and preparing
    dataset" note is not shown (nothing is downloaded)."""
    code, out, err = run_data(capsys, "--source", f"files:{corpus}/*.txt", "--data.data-dir",
                              str(tmp_path / "c"), "--data.seq-len", "16", "--tokenizer", "bytes",
                              "--data.val-fraction", "0.3")
    assert code == 0
    assert f"building the corpus of files:{corpus}/*.txt from " in err and "(nothing is downloaded)" in err
    assert "ownload" not in err.replace("nothing is downloaded", "") and "prepared" not in err + out
    for key in ("train documents", "train bytes", "train tokens", "bytes/token", "vocab size", "259",
                "validation sequences", "sample", "document number"):
        assert key in out


def test_data_reports_the_seq_len_that_training_validates_at(corpus, tmp_path, capsys):
    """Without --data.seq-len, `lecture3 data` reads the data `lecture3 train` reads: Config().data."""
    from lecture3.config import Config

    code, out, _ = run_data(capsys, "--source", f"files:{corpus}/*.txt", "--data.data-dir",
                            str(tmp_path / "c"), "--data.val-fraction", "0.5")
    assert code == 0 and f"of {Config().data.seq_len + 1} tokens" in out, out


def bad_inputs(corpus, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_bytes(b"")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "bad.model").write_bytes(b"\x00garbage")
    files = f"files:{corpus}/*.txt"
    return {
        "missing path": (["--source", f"files:{tmp_path}/nope.txt"], "does not exist"),
        "glob matches nothing": (["--source", f"files:{tmp_path}/*.nomatch"], "matches no files"),
        "empty corpus": (["--source", f"files:{empty}/*.txt"], "is empty"),
        "seq_len longer than validation": ([
            "--source", files, "--data.seq-len", "100000"], "longer than the validation set"),
        "unknown tfds name": (["--source", "tfds:no_such_dataset_xyz", "--data.tfds-data-dir", str(tmp_path)],
                              "unknown tfds dataset"),
        "missing tfds data dir": (["--source", "tfds:lm1b", "--data.tfds-data-dir", str(tmp_path / "nope")],
                                  "tfds data dir"),
        "corrupt tokenizer.json": (["--source", files, "--tokenizer", f"{tmp_path}/bad.json"], "not a valid"),
        "corrupt .model": (["--source", files, "--tokenizer", f"{tmp_path}/bad.model"], "not a valid"),
        "missing tokenizer": (["--source", files, "--tokenizer", f"{tmp_path}/no.json"], "does not exist"),
        "invalid config": (["--source", files, "--data.val-fraction", "2"], "DataConfig.val_fraction=2.0"),
    }


BAD_INPUTS = ["missing path", "glob matches nothing", "empty corpus", "seq_len longer than validation",
              "unknown tfds name", "missing tfds data dir", "corrupt tokenizer.json", "corrupt .model",
              "missing tokenizer", "invalid config"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_and_leaves_nothing_half_built(case, corpus, tmp_path, capsys):
    argv, message = bad_inputs(corpus, tmp_path)[case]
    cache = tmp_path / "cache"
    code, out, err = run_data(capsys, *argv, "--data.data-dir", str(cache))
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("error: ") and message in lines[-1], err
    assert "Traceback" not in err
    leftovers = [n for _, dirs, files in os.walk(cache) for n in dirs + files if n.startswith(".tmp")]
    assert leftovers == []


@pytest.mark.slow
def test_python_dash_m_reports_bad_input_without_traceback(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "lecture3", "data", "--source", f"files:{tmp_path}/*.none"],
                          cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: glob") and "Traceback" not in proc.stderr


def test_data_config_flags_are_all_there():
    parser = argparse.ArgumentParser()
    add_dataclass_flags(parser, "data", DataConfig)
    flags = {a for action in parser._actions for a in action.option_strings}
    assert {f"--data.{f.name.replace('_', '-')}" for f in dataclasses.fields(DataConfig)} <= flags
