"""`lecture3 experiment`: resumable grids (a killed grid finishes without redoing finished runs), one pool
of records shared by the claims, grids that grow once the baseline's best LR is known, records whose
command reproduces them (and the tolerance a rerun is held to), workers whose output never blocks them,
the quick path of every claim, listing and bad input."""

import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import types

import pytest

from lecture3 import cli, cli_experiment
from lecture3.experiment import judge, protocol, records, runner, runs
from lecture3.experiment.spec import Claim, RunSpec

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _cmd(*args):
    return [sys.executable, "-m", "lecture3", "experiment", *args]


@pytest.mark.slow
def test_a_killed_grid_finishes_without_redoing_finished_runs_and_a_record_reproduces(tmp_path):
    root = tmp_path / "results"
    claim = runner.load("c04")
    folder = runner.pool_dir(True, root)
    n = len(runner.grid(claim, quick=True, root=root))
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
    assert f"1/{n} runs done; {n - 1} to run" in out.stdout
    assert first[0].read_text() == before  # not redone
    recs = records.read_all(folder)
    assert len(recs) == n
    report = (runner.results_dir(claim, "cpu", True, root) / "report.md").read_text().strip().splitlines()
    assert report[-1].startswith("Verdict: none (quick mode")

    rec = json.loads(before)
    for key in ("config", "commit", "machine", "environment", "command", "wall_s", "result"):
        assert key in rec
    assert rec["machine"]["jax"] and rec["result"]["history"] and rec["result"]["final_val_loss"] is not None
    argv = shlex.split(rec["command"])
    assert argv[:2] == ["lecture3", "experiment"] and "--check" in argv
    again = subprocess.run([sys.executable, "-m", "lecture3", *argv[1:]], env=ENV, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr[-2000:]
    assert "within 1e-4, the same environment" in again.stdout


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
    assert all(line.endswith(": not judged: quick") for line in lines if line.startswith("- ("))
    for spec, rec in res.rows:  # every run produced its numbers
        if spec.measure == "train":
            assert rec["result"]["history"] and (rec["result"]["diverged"] or rec["result"]["final_val_loss"] > 0)


def test_list_shows_every_claim(capsys, tmp_path):
    assert cli.main(["experiment", "--list", "--results-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[1] for line in lines] == [p.stem for p in runner.claim_files()]
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
    # each row the README shows is the claim's row now, in the table's order (a claim file added to
    # experiments/ since is absent until `--update-readme` adds it: no other edit is needed to pass)
    fresh = markdown_table().splitlines()
    shown = table.splitlines()
    assert shown[:2] == fresh[:2] and len(shown) > 2
    assert shown[2:] == [row for row in fresh[2:] if row in shown[2:]], \
        "README's claims table is stale: run `lecture3 experiment --update-readme`"
    # every row has the header's 7 cells: a `|` inside a cell (claim 10's "|log Z|") is escaped
    cells = [len(re.split(r"(?<!\\)\|", row.strip())[1:-1]) for row in table.splitlines()]
    assert cells == [7] * len(cells), cells


def test_results_and_reports_do_not_count_as_uncommitted_code(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "experiments" / "results" / "runs").mkdir(parents=True)
    (repo / "experiments" / "results" / "c01").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "experiments" / "results" / "runs" / "k.json").write_text("{}")
    (repo / "experiments" / "results" / "c01" / "report.md").write_text("x")
    monkeypatch.setattr(records, "REPO", repo)
    assert records.uncommitted() == []
    (repo / "experiments" / "c99_new.py").write_text("")
    assert records.uncommitted() == ["experiments/c99_new.py"]


@pytest.mark.slow
def test_the_population_engine_records_what_solo_runs_record(tmp_path):
    claim = runner.load("c09")  # quick: three weight decays at two seeds -> one population
    specs = runner.grid(claim, quick=True)
    assert len({runner.program_key(s) for s in specs}) == 1 and len(specs) == 3 * runner.QUICK_SEEDS
    pop = runner.run_claim(claim, quick=True, root=tmp_path / "pop", engine="population", echo=lambda *a: None)
    solo = runner.run_claim(claim, quick=True, root=tmp_path / "solo", engine="inline", echo=lambda *a: None)
    for (_, a), (_, b) in zip(pop.rows, solo.rows, strict=True):
        assert a["result"]["engine"] == f"population of {len(specs)}"
        assert a["result"]["final_val_loss"] == pytest.approx(b["result"]["final_val_loss"], abs=1e-5)
        assert a["result"]["train_loss_tail"] == pytest.approx(b["result"]["train_loss_tail"], abs=1e-5)


def test_a_worker_is_pinned_by_its_environment_before_jax_starts(monkeypatch):
    env = runner._worker_env(1)
    assert env[runner.PIN_ENV] == "1" and "--xla_cpu_multi_thread_eigen=false" in env["XLA_FLAGS"]
    assert runner.PIN_ENV not in runner._worker_env(None, {})
    # a run typed in a shell becomes such a worker before jax starts (the record's command reruns it as it ran)
    code = ("import os; from lecture3.experiment import runner; runner.become_worker(); runner.pin_from_env(); "
            "print(sorted(os.sched_getaffinity(0)), os.environ['XLA_FLAGS'])")
    env = {k: v for k, v in os.environ.items() if k not in (runner.WORKER_ENV, runner.PIN_ENV, "XLA_FLAGS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**env, "JAX_PLATFORMS": "cpu"})
    assert out.stdout.split() == [f"[{min(os.sched_getaffinity(0))}]", runner.PINNED_XLA_FLAG], out.stderr
    code = ("import os, sys; os.environ['LECTURE3_PIN_CORE'] = '0'; from lecture3.experiment import runner; "
            "runner.pin_from_env(); print(sorted(os.sched_getaffinity(0)), 'jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["[0]", "False"], out.stderr


@pytest.mark.slow
def test_worker_processes_record_each_run_with_its_own_command(tmp_path):
    claim = runner.load("c04")
    res = runner.run_claim(claim, quick=True, root=tmp_path, jobs=2, engine="processes", echo=lambda *a: None)
    assert res.complete and len(res.rows) == len(runner.grid(claim, quick=True, root=tmp_path))
    for spec, rec in res.rows:
        assert shlex.split(rec["command"])[:5] == ["lecture3", *runner.run_args(claim, spec, "cpu", True, tmp_path)[:4]]
        assert rec["result"]["final_val_loss"] is not None


def test_every_pooled_record_is_a_run_of_some_claims_grid():
    """A config field added since the keys were defined (at its default) keeps the records' keys: a
    committed record whose key no claim computes any more would be silently orphaned and rerun."""
    pool = runner.pool_dir()
    on_disk = {f.stem for f in pool.glob("*.json")} if pool.is_dir() else set()
    keys = {spec.key for path in runner.claim_files() for scale in ("cpu", "gpu")
            for spec in runner.grid(runner.load(path.stem), scale)}
    assert on_disk <= keys, f"records no claim's grid computes: {sorted(on_disk - keys)}"


def test_an_added_field_at_its_original_value_leaves_the_key_alone():
    from lecture3.experiment import protocol, spec
    from lecture3.experiment.key_fields import KEY_FIELDS

    run = spec.RunSpec(protocol.config(protocol.model_s(), lr=1e-3, seed=0), tags={})
    d, key = run.config.to_dict(), spec.key_config(run.config)
    assert {section: tuple(fields) for section, fields in key.items()} == KEY_FIELDS  # the fields of that day
    assert all(key[section][name] == d[section][name] for section, names in KEY_FIELDS.items() for name in names)
    assert not {"attention_impl", "attention_chunk"} & set(key["model"]) and "loss_chunk" not in key["train"]
    chunked = spec.RunSpec(run.config.replace(**{"model.attention_impl": "chunked"}), tags={})
    assert chunked.key != run.key and "attention_impl" in spec.key_config(chunked.config)["model"]


# ---------------------------------------------------------------- synthetic claims (no training)

REFS = {"bigram_loss": 3.9, "unigram_entropy": 6.1, "bigram": "synthetic", "validation_tokens": 1,
        "train_tokens": 1, "tokenizer": "bpe:2048", "seq_len": 128}
LOSS_AT = {1e-3: 3.8, 3e-3: 3.5, 1e-2: 4.0}  # S's best LR is 3e-3


@pytest.fixture
def fake_training(monkeypatch):
    """`train` runs return a loss that depends on the LR and seed, instantly; the calls are counted."""
    calls = []

    def train_run(config, args):
        calls.append(config)
        loss = LOSS_AT[config.train.lr] + 0.01 * config.train.seed + (0.02 if config.model.norm == "layernorm" else 0)
        return {"final_loss": loss, "final_val_loss": loss, "diverged": False, "initial_loss": math.log(2048),
                "history": [], "tokens": 1}

    monkeypatch.setattr(runs, "train_run", train_run)
    monkeypatch.setattr(runner, "_prepare_data", lambda specs: None)
    monkeypatch.setattr(runner, "claim_references", lambda claim, specs: REFS)
    return calls


def _claim(name: str, runs_fn, baseline=None) -> Claim:
    def criteria(res):
        return [judge.criterion("(a)", "a deterministic check", judge.check(bool(res.rows), "ran"))]

    return Claim(number=90, name=name, title=name, lecture="", references="", runs=runs_fn, criteria=criteria,
                 baseline=baseline or {"arm": "baseline"})


def _at_best_lr(scale):
    best = protocol.baseline_best_lr(scale)
    if best is None:
        return []
    model = protocol.model_s(norm="layernorm")
    return [RunSpec(protocol.config(model, lr=best, seed=s, scale=scale), {"arm": "new", "lr": best, "seed": s})
            for s in protocol.SEEDS]


def _run(claim, root, echo=None):
    return runner.run_claim(claim, root=root, jobs=1, engine="inline", echo=echo or (lambda *a: None))


def test_a_grid_at_the_baselines_best_lr_grows_once_the_baseline_is_recorded(tmp_path, fake_training):
    claim = _claim("c90_grows", lambda scale: protocol.baseline_specs(scale) + _at_best_lr(scale))
    assert runner.grid(claim, root=tmp_path) == protocol.baseline_specs()  # the best LR is not known yet
    said = []
    res = _run(claim, tmp_path, said.append)
    assert [line.split(" (")[0] for line in said if "runs done" in line] == [
        "c90_grows: 0/12 runs done; 12 to run", "c90_grows: 12/16 runs done; 4 to run",
        "c90_grows: 16/16 runs done; 0 to run"]
    assert res.complete and len(res.rows) == 16 and len(fake_training) == 16
    with protocol.building(runner.pool_dir(root=tmp_path)):
        assert protocol.baseline_best_lr() == 3e-3
    assert {s.config.train.lr for s, _ in res.select(arm="new")} == {3e-3}
    assert (runner.results_dir(claim, "cpu", False, tmp_path) / "report.md").read_text().endswith(
        "Verdict: reproduced\n")


def test_claims_share_the_records_of_the_same_runs(tmp_path, fake_training):
    first = _claim("c91_first", protocol.baseline_specs)
    retagged = [RunSpec(s.config, {**s.tags, "arm": "rmsnorm"}) for s in protocol.baseline_specs()]
    second = _claim("c92_second", lambda scale: retagged + _at_best_lr(scale), baseline={"arm": "rmsnorm"})
    _run(first, tmp_path)
    assert len(fake_training) == 12
    said = []
    res = _run(second, tmp_path, said.append)
    assert said[0].startswith("c92_second: 12/16 runs done; 4 to run")
    assert len(fake_training) == 16 and res.complete  # the 12 shared runs were not run again
    pool = runner.pool_dir(root=tmp_path)
    assert len(list(pool.glob("*.json"))) == 16
    rec = json.loads((pool / f"{retagged[0].key}.json").read_text())
    assert rec["claim"] == "c91_first" and rec["environment"]["jax"]  # recorded once, by the first claim
    assert (runner.results_dir(first, "cpu", False, tmp_path) / "report.md").is_file()
    assert (runner.results_dir(second, "cpu", False, tmp_path) / "report.md").is_file()


def test_a_quick_grid_keeps_the_first_configuration_of_each_arm_at_two_seeds(tmp_path):
    claim = _claim("c93_quick", lambda scale: protocol.baseline_specs(scale) + _at_best_lr(scale))
    with protocol.building(quick=True):
        assert protocol.baseline_best_lr() == protocol.LRS[0]  # a quick grid never waits for the baseline
    specs = runner.grid(claim, quick=True, root=tmp_path)
    assert [(s.tags["arm"], s.tags["lr"], s.tags["seed"]) for s in specs] == [
        ("baseline", 1e-3, 0), ("baseline", 1e-3, 1), ("new", 1e-3, 0), ("new", 1e-3, 1)]
    assert all(s.args["quick"] and s.config.train.steps == 3 for s in specs)


def test_all_runs_the_claims_holding_the_baselines_lr_grid_first():
    names = cli_experiment.all_names()
    assert [n.split("_")[0] for n in names[:2]] == list(runner.BASELINE_CLAIMS)
    assert sorted(names) == sorted(p.stem for p in runner.claim_files())


def _until(target, timeout: float):
    """Run `target` in a thread; a hang fails the test instead of hanging it."""
    out = []
    thread = threading.Thread(target=lambda: out.append(target()), daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "hung"
    return out[0]


def test_a_worker_that_prints_more_than_a_pipe_holds_does_not_block():
    big = [sys.executable, "-c", "print('x' * 200_000)"]  # > 64 KiB: a pipe read only after exit blocks it
    failing = [sys.executable, "-c", "import sys; print('y' * 100_000); sys.exit(3)"]
    said = []
    failures = _until(lambda: runner.run_processes([("big", big), ("failing", failing)], 2, said.append), 120)
    assert [label for label, _ in failures] == ["failing"]
    assert failures[0][1].strip() == "y" * 100_000
    assert any("big" in line and "FAILED" not in line for line in said)
    assert any("failing: FAILED (rc 3)" in line for line in said)


ENVIRONMENT = {k: f"value of {k}" for k in records.ENVIRONMENT_KEYS}


def _recorded(loss: float, environment=ENVIRONMENT) -> dict:
    return {"result": {"final_val_loss": loss}, "environment": environment, "machine": {"cpu": "a CPU"},
            "commit": "0123456789abcdef"}


@pytest.mark.parametrize("lr, drift, rc, says", [
    (1e-3, 5e-5, 0, "within 1e-4, the same environment"),
    (1e-2, 5e-4, 1, "OUTSIDE 1e-4, the same environment"),
])
def test_a_rerun_in_the_records_environment_is_held_to_1e_4(lr, drift, rc, says):
    lines, code = cli_experiment.check_rerun(_recorded(3.5), {"final_val_loss": 3.5 + drift}, ENVIRONMENT, lr)
    assert code == rc and len(lines) == 1 and says in lines[0]


@pytest.mark.parametrize("lr, drift, rc, says", [
    (1e-3, 5e-4, 0, "within 1e-3 at LR 0.001"),
    (3e-3, 5e-3, 1, "OUTSIDE 1e-3 at LR 0.003"),
    (1e-2, 0.2, 0, "LR 0.01 > 3e-3: not held to a tolerance, only statistically"),
])
def test_a_rerun_in_another_environment_says_what_differs_and_is_held_to_1e_3_up_to_lr_3e_3(lr, drift, rc, says):
    doctored = _recorded(3.5, {**ENVIRONMENT, "cpu": "another CPU", "xla_flags": "--other"})
    lines, code = cli_experiment.check_rerun(doctored, {"final_val_loss": 3.5 + drift}, ENVIRONMENT, lr)
    assert code == rc and says in lines[-1]
    assert "the numerical environment differs" in lines[0]
    assert "  cpu: 'another CPU' -> 'value of cpu'" in lines
    assert "  xla_flags: '--other' -> 'value of xla_flags'" in lines
    assert any("to 1e-3 at LR <= 3e-3, and above that only statistically" in line for line in lines)
    lines, _ = cli_experiment.check_rerun(_recorded(3.5, None), {"final_val_loss": 3.5}, ENVIRONMENT, lr)
    assert "  the record states no environment" in lines  # a v1 record


def test_the_v1_verdict_is_its_reports_last_verdict_line(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "V1_RESULTS", tmp_path)
    (tmp_path / "c90_x").mkdir()
    (tmp_path / "c90_x" / "report.md").write_text("# Claim\nVerdict: none\n...\nVerdict: partly reproduced\n")
    assert cli_experiment.v1_verdict(types.SimpleNamespace(name="c90_x")) == "partly reproduced"
    assert cli_experiment.v1_verdict(types.SimpleNamespace(name="c91_y")) == "–"


def test_the_cli_turns_on_the_compilation_cache_for_itself_and_its_workers(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("JAX_PERSISTENT") and k != "JAX_COMPILATION_CACHE_DIR"}
    code = ("import os, jax; from lecture3 import cli_experiment as c; print(c.compilation_cache()); "
            "print(jax.config.jax_compilation_cache_dir == os.environ['JAX_COMPILATION_CACHE_DIR'], "
            "jax.config.jax_persistent_cache_min_compile_time_secs)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**env, "LECTURE3_DATA_DIR": str(tmp_path)})
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith(f"XLA compilation cache on: {tmp_path / 'xla-cache'}"), out.stderr
    assert lines[1] == f"True {cli_experiment.MIN_COMPILE_S}"
