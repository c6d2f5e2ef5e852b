"""`lecture3 experiment`: resumable grids (a killed grid finishes without redoing finished runs), records
whose command reproduces them, the quick path of every claim, listing and bad input."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

from lecture3 import cli
from lecture3.experiment import records, runner

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _cmd(*args):
    return [sys.executable, "-m", "lecture3", "experiment", *args]


@pytest.mark.slow
def test_a_killed_grid_finishes_without_redoing_finished_runs_and_a_record_reproduces(tmp_path):
    root = tmp_path / "results"
    folder = runner.results_dir(runner.load("c04"), "cpu", True, root) / "runs"
    proc = subprocess.Popen(_cmd("c04", "--quick", "--jobs", "1", "--results-dir", str(root)), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(folder.glob("*.json")) and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-grid: the first record is written, the second run is not done
    proc.wait()
    first = list(folder.glob("*.json"))
    assert len(first) == 1, proc.stdout.read().decode()[-2000:]
    before = first[0].read_text()
    assert not list(folder.glob("*.tmp"))

    out = subprocess.run(_cmd("c04", "--quick", "--jobs", "1", "--results-dir", str(root)), env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "1/2 runs done; 1 to run" in out.stdout
    assert first[0].read_text() == before  # not redone
    recs = records.read_all(folder)
    assert len(recs) == 2
    report = (folder.parent / "report.md").read_text().strip().splitlines()
    assert report[-1].startswith("Verdict: none (quick mode")

    rec = json.loads(before)
    for key in ("config", "commit", "machine", "command", "wall_s", "result"):
        assert key in rec
    assert rec["machine"]["jax"] and rec["result"]["history"] and rec["result"]["final_val_loss"] is not None
    argv = shlex.split(rec["command"])
    assert argv[:2] == ["lecture3", "experiment"] and "--check" in argv
    again = subprocess.run([sys.executable, "-m", "lecture3", *argv[1:]], env=ENV, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr[-2000:]
    assert "within 1e-4" in again.stdout


@pytest.mark.slow
@pytest.mark.usefixtures("little_xla_optimisation")  # a smoke run of the code path: compiles, barely computes
@pytest.mark.parametrize("name", [p.stem for p in runner.claim_files()])
def test_every_claims_quick_path_runs_and_writes_a_report_without_a_verdict(name, tmp_path):
    claim = runner.load(name)
    res = runner.run_claim(claim, quick=True, root=tmp_path, jobs=1, echo=lambda *a: None)
    assert res.complete and res.rows
    folder = runner.results_dir(claim, "cpu", True, tmp_path)
    lines = (folder / "report.md").read_text().strip().splitlines()
    assert lines[0].startswith(f"# Claim {claim.number}:")
    assert lines[-1] == "Verdict: none (quick mode: a smoke run of the code path, not evidence)"
    assert "## Criteria (fixed before any run)" in lines
    for spec, rec in res.rows:  # every run produced its numbers
        if spec.measure == "train":
            assert rec["result"]["history"] and (rec["result"]["diverged"] or rec["result"]["final_val_loss"] > 0)


def test_list_shows_every_claim(capsys, tmp_path):
    assert cli.main(["experiment", "--list", "--results-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(runner.claim_files()) == 15
    assert all(" 0/" in line and "incomplete (0/" in line for line in lines)


@pytest.mark.parametrize("argv, message", [
    (["experiment", "c99"], "unknown claim 'c99'"),
    (["experiment", "c04", "--jobs", "0"], "--jobs 0 is invalid"),
    (["experiment", "c04", "--check"], "--check needs --run"),
    (["experiment"], "name a claim"),
    (["experiment", "c04", "--run", "nosuchkey"], "no run 'nosuchkey'"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_corrupt_record_is_an_error_naming_it(tmp_path):
    folder = tmp_path / "runs"
    folder.mkdir()
    (folder / "abc.json").write_text("{not json")
    with pytest.raises(records.RecordError, match="abc.json is not a valid run record"):
        records.read_all(folder)


def test_records_must_come_from_committed_code(monkeypatch):
    monkeypatch.setattr(records, "uncommitted", lambda *a, **k: ["lecture3/model.py"])
    with pytest.raises(runner.ExperimentError, match="uncommitted code"):
        runner._check_clean(quick=False, root=None, allow_dirty=False)
    assert runner._check_clean(quick=True, root=None, allow_dirty=False) == ["lecture3/model.py"]


def test_the_readme_table_is_the_recorded_verdicts():
    from lecture3.cli_experiment import README_MARKERS, markdown_table

    text = (records.REPO / "README.md").read_text()
    start, end = README_MARKERS
    table = text.split(start, 1)[1].split(end, 1)[0].strip()
    assert table == markdown_table(), "README's claims table is stale: run `lecture3 experiment --update-readme`"
    assert len(table.splitlines()) == 2 + len(runner.claim_files())
    # every row has the header's 7 cells: a `|` inside a cell (claim 10's "|log Z|") is escaped
    cells = [len(re.split(r"(?<!\\)\|", row.strip())[1:-1]) for row in table.splitlines()]
    assert cells == [7] * len(cells), cells


def test_results_and_reports_do_not_count_as_uncommitted_code(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "experiments" / "results" / "c01" / "runs").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "experiments" / "results" / "c01" / "runs" / "k.json").write_text("{}")
    (repo / "experiments" / "results" / "c01" / "report.md").write_text("x")
    monkeypatch.setattr(records, "REPO", repo)
    assert records.uncommitted() == []
    (repo / "experiments" / "c99_new.py").write_text("")
    assert records.uncommitted() == ["experiments/c99_new.py"]


@pytest.mark.slow
def test_the_population_engine_records_what_solo_runs_record(tmp_path):
    claim = runner.load("c09")  # quick: three weight decays, one seed -> one population of three members
    specs = runner.grid(claim, quick=True)
    assert len({runner.program_key(s) for s in specs}) == 1 and len(specs) == 3
    pop = runner.run_claim(claim, quick=True, root=tmp_path / "pop", engine="population", echo=lambda *a: None)
    solo = runner.run_claim(claim, quick=True, root=tmp_path / "solo", engine="inline", echo=lambda *a: None)
    for (_, a), (_, b) in zip(pop.rows, solo.rows, strict=True):
        assert a["result"]["engine"] == "population of 3"
        assert a["result"]["final_val_loss"] == pytest.approx(b["result"]["final_val_loss"], abs=1e-5)
        assert a["result"]["train_loss_tail"] == pytest.approx(b["result"]["train_loss_tail"], abs=1e-5)


def test_a_worker_is_pinned_by_its_environment_before_jax_starts(monkeypatch):
    env = runner._worker_env(1)
    assert env[runner.PIN_ENV] == "1" and "--xla_cpu_multi_thread_eigen=false" in env["XLA_FLAGS"]
    assert runner.PIN_ENV not in runner._worker_env(None)
    code = ("import os, sys; os.environ['LECTURE3_PIN_CORE'] = '0'; from lecture3.experiment import runner; "
            "runner.pin_from_env(); print(sorted(os.sched_getaffinity(0)), 'jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["[0]", "False"], out.stderr


@pytest.mark.slow
def test_worker_processes_record_each_run_with_its_own_command(tmp_path):
    claim = runner.load("c04")
    res = runner.run_claim(claim, quick=True, root=tmp_path, jobs=2, engine="processes", echo=lambda *a: None)
    assert res.complete and len(res.rows) == 2
    for spec, rec in res.rows:
        assert shlex.split(rec["command"])[:5] == ["lecture3", *runner.run_args(claim, spec, "cpu", True, tmp_path)[:4]]
        assert rec["result"]["final_val_loss"] is not None


def test_every_committed_record_is_a_run_of_its_claims_grid():
    """A config field added since (spec.ADDED_FIELDS, at its original value) keeps the records' keys: a
    committed record whose key its claim no longer computes would be silently orphaned and rerun."""
    for path in runner.claim_files():
        claim = runner.load(path.stem)
        folder = records.REPO / "experiments" / "results" / claim.name / "runs"
        keys = {spec.key for spec in runner.grid(claim, "cpu")}
        on_disk = {f.stem for f in folder.glob("*.json")} if folder.is_dir() else set()
        assert on_disk <= keys, f"{claim.name}: records no run of the grid computes: {sorted(on_disk - keys)}"


def test_an_added_field_at_its_original_value_leaves_the_key_alone():
    from lecture3.experiment import protocol, spec

    run = spec.RunSpec(protocol.config(protocol.model_s(), lr=1e-3, seed=0), tags={})
    d = run.config.to_dict()
    assert spec.key_config(run.config) == {**d, "model": {k: v for k, v in d["model"].items()
                                                          if k not in ("attention_impl", "attention_chunk")}}
    chunked = spec.RunSpec(run.config.replace(**{"model.attention_impl": "chunked"}), tags={})
    assert chunked.key != run.key and "attention_impl" in spec.key_config(chunked.config)["model"]
