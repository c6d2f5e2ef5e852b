"""Claims of your own: found in any folder (by name or file path) and in an installed package, written from
the template by `lecture3 experiment new`, recorded with what produced them (lecture3's version and commit,
the claim file's sha256, its folder's git state) and a command that reruns them from any folder; and the
catalogue of runs (`runs_frame`, `--csv`) on the committed records and on synthetic ones."""

import io
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lecture3 import cli
from lecture3.experiment import catalogue, protocol, records, runner, runs

ROOT = Path(__file__).resolve().parent.parent
REFS = {"bigram_loss": 3.9, "unigram_entropy": 6.1, "bigram": "synthetic", "validation_tokens": 1,
        "train_tokens": 1, "tokenizer": "bytes", "seq_len": 64}


@pytest.fixture
def fake_training(monkeypatch):
    """Training runs return at once (untied 0.01-0.016 lower at every LR, seed noise); the calls are counted."""
    calls = []

    def train_run(config, args):
        calls.append(config)
        loss = 3.5 + 0.2 * abs(math.log10(config.train.lr / 3e-3)) + 0.003 * config.train.seed ** 2
        loss -= 0.0 if config.model.tie_embeddings else 0.01 + 0.002 * config.train.seed
        return {"final_loss": loss, "final_val_loss": loss, "diverged": False, "initial_loss": math.log(259),
                "history": [{"step": 10, "loss": loss + 1}, {"step": 20, "loss": loss, "val_loss": loss}],
                "tokens": 1, "probe": {"max_attn_logit": 2.0, "log_z_abs": 1.0}}

    monkeypatch.setattr(runs, "train_run", train_run)
    monkeypatch.setattr(runner, "_prepare_data", lambda specs: None)
    monkeypatch.setattr(runner, "claim_references", lambda claim, specs: REFS)
    monkeypatch.setattr(records, "uncommitted", lambda *a, **k: [])  # this checkout's others' edits aside
    return calls


def _git(folder, *args):
    return subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=folder, check=True,
                          capture_output=True, text=True).stdout.strip()


# ---------------------------------------------------------------- claims anywhere


def test_a_claim_file_anywhere_is_found_by_name_or_by_path(tmp_path):
    path = runner.new("tied", tmp_path)
    (tmp_path / "notes.py").write_text("print('not a claim')\n")
    assert runner.claim_files(tmp_path) == [path]
    by_name = runner.load("tied", tmp_path)
    assert by_name is runner.load(str(path)) and by_name.name == "tied" and by_name.number is None
    assert by_name.short == "tied" and by_name.heading == "Claim tied"
    assert runner.source_path(by_name) == path.resolve()
    assert runner.load("c04", tmp_path).number == 4  # then the lecture's, by number
    with pytest.raises(runner.ExperimentError, match="unknown claim 'tie'.*--claims DIR"):
        runner.load("tie", tmp_path)
    (tmp_path / "copy.py").write_text(path.read_text().replace("name=Path(__file__).stem", "name='tied'"))
    with pytest.raises(runner.ExperimentError, match="declares Claim\\(name='tied'\\): name it 'copy'"):
        runner.load("copy", tmp_path)


def test_new_writes_the_template_once_and_says_how_to_run_it(tmp_path, capsys):
    assert cli.main(["experiment", "new", "tied", "--claims", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "tied.py").read_text() == runner.TEMPLATE.read_text()
    assert f"lecture3 experiment tied --claims {tmp_path} --quick" in out
    assert cli.main(["experiment", "new", "tied", "--claims", str(tmp_path)]) == 2
    assert "exists: pick another name" in capsys.readouterr().err
    for bad in ("2x", "all", "a-b"):
        assert cli.main(["experiment", "new", bad, "--claims", str(tmp_path)]) == 2
        assert "cannot name a claim" in capsys.readouterr().err
    assert cli.main(["experiment", "new"]) == 2
    assert "name the claim to write" in capsys.readouterr().err


def test_the_templates_grid_its_quick_grid_and_its_criteria_kinds(tmp_path):
    claim = runner.load_file(runner.new("tied", tmp_path))
    specs = runner.grid(claim)
    module = runner.module_of(claim)
    assert len(specs) == len(module.ARMS) * len(module.LRS) * len(protocol.SEEDS)
    assert {s.config.model.tie_embeddings for s in specs} == {True, False}
    assert all(s.config.train.steps == module.STEPS and s.config.data.tokenizer == "bytes" for s in specs)
    quick = runner.grid(claim, quick=True)
    assert len(quick) == len(module.ARMS) * runner.QUICK_SEEDS and all(s.config.train.steps == 3 for s in quick)
    source = runner.TEMPLATE.read_text()
    assert all(f'"{kind}"' in source for kind in ("better", "equivalent", "not_worse"))


def test_the_templates_grid_gives_a_report_with_a_verdict_and_records_that_rerun_from_anywhere(
        tmp_path, fake_training, monkeypatch):
    claim = runner.load_file(runner.new("tied", tmp_path / "mine"))
    res = runner.run_claim(claim, jobs=1, engine="inline", echo=lambda *a: None)
    assert res.complete and len(fake_training) == len(res.specs)
    report = (tmp_path / "mine" / "results" / "tied" / "report.md").read_text()
    assert report.strip().splitlines()[-1] == "Verdict: reproduced"  # untied better by less than 1%: all pass
    assert "![final val loss vs peak LR, per arm](loss_vs_lr.png)" in report
    rec = json.loads(next((tmp_path / "mine" / "results" / "runs").glob("*.json")).read_text())
    assert rec["claim_file"] == {"path": str((tmp_path / "mine" / "tied.py").resolve()), "git": None,
                                 "sha256": records.sha256(tmp_path / "mine" / "tied.py")}
    assert rec["lecture3"]["version"] and rec["lecture3"]["installed"] == "checkout"
    assert rec["lecture3"]["commit"] == rec["commit"] == records.commit()
    argv = shlex.split(rec["command"])
    assert argv[argv.index("--claims") + 1] == str((tmp_path / "mine").resolve()) and "--results" not in argv
    # from another folder the command names the same claim, run and pool
    monkeypatch.chdir(tmp_path)
    args = cli.build_parser().parse_args(argv[1:])
    again = runner.load(args.name, args.claims)
    assert runner.find(again, args.run, args.scale, args.quick, args.results_dir).key == rec["key"]
    assert runner.claim_pool(again, args.quick, args.results_dir) == tmp_path / "mine" / "results" / "runs"


def test_a_claims_records_and_reports_go_beside_it_unless_results_says(tmp_path):
    claim = runner.load_file(runner.new("tied", tmp_path))
    assert runner.default_root(claim) == tmp_path.resolve() / "results"
    assert runner.default_root(claim, quick=True) == tmp_path.resolve() / "results-quick"
    elsewhere = (tmp_path / "elsewhere").resolve()
    assert runner.results_dir(claim, "cpu", False, elsewhere) == elsewhere / "tied"
    spec = runner.grid(claim)[0]
    argv = runner.run_args(claim, spec, "cpu", False, tmp_path / "elsewhere")
    assert argv[argv.index("--results") + 1] == str((tmp_path / "elsewhere").resolve())
    # the lecture's claims keep their layout and their commands
    c04 = runner.load("c04")
    assert runner.claim_pool(c04) == runner.RESULTS / "runs" and runner.results_dir(c04, "cpu", False) == \
        runner.RESULTS / "c04_bias_terms"
    s = runner.grid(c04)[0]
    assert runner.command(c04, s, "cpu", False, None) == \
        f"lecture3 experiment c04_bias_terms --run {s.key} --scale cpu --check"


def test_uncommitted_claim_code_in_a_git_folder_is_refused_unless_allow_dirty(tmp_path, fake_training):
    folder = tmp_path / "repo"
    claim_path = runner.new("tied", folder)
    _git(folder, "init", "-q")
    _git(folder, "add", "tied.py")
    _git(folder, "commit", "-q", "-m", "claim")
    head = _git(folder, "rev-parse", "HEAD")
    claim = runner.load_file(claim_path)
    prov = runner.provenance(claim, False, None, False)
    assert prov["claim_file"]["git"] == {"commit": head, "clean": True, "uncommitted": []}
    (folder / "helper.py").write_text("X = 1\n")
    with pytest.raises(runner.ExperimentError, match="uncommitted code \\(helper.py\\).*--allow-dirty"):
        runner.provenance(claim, False, None, False)
    assert runner.provenance(claim, True, None, False)["uncommitted"] == ["helper.py"]  # quick: recorded only
    prov = runner.provenance(claim, False, None, True)
    assert prov["allow_dirty"] and prov["uncommitted"] == ["helper.py"]
    assert prov["claim_file"]["git"] == {"commit": head, "clean": False, "uncommitted": ["helper.py"]}


def test_an_installed_package_finds_the_lectures_claims_in_its_copy(tmp_path, monkeypatch):
    packaged = tmp_path / "site-packages" / "lecture3" / "claims"
    packaged.mkdir(parents=True)
    checkout = runner.claim_files()
    for path in checkout:
        shutil.copyfile(path, packaged / path.name)
    monkeypatch.setattr(runner, "EXPERIMENTS", tmp_path / "no-checkout" / "experiments")
    monkeypatch.setattr(runner, "PACKAGED", packaged)
    monkeypatch.chdir(tmp_path)
    assert runner.lecture_dir() == packaged and [p.name for p in runner.claim_files()] == [p.name for p in checkout]
    claim = runner.load("c04")
    assert runner.source_path(claim).parent == packaged.resolve() and claim.number == 4
    assert runner.default_root(claim) == tmp_path.resolve() / "results"  # the current folder's
    argv = runner.run_args(claim, runner.grid(claim)[0], "cpu", False, None)
    assert "--claims" not in argv and argv[argv.index("--results") + 1] == str(tmp_path.resolve() / "results")
    monkeypatch.setattr(runner, "PACKAGED", tmp_path / "empty")
    with pytest.raises(runner.ExperimentError, match="the lecture's claims are neither in a checkout"):
        runner.lecture_dir()


def test_list_names_the_claims_of_a_folder_and_never_prints_nothing(tmp_path, capsys):
    assert cli.main(["experiment", "--list", "--claims", str(tmp_path)]) == 2
    assert f"lecture3 experiment new NAME --claims {tmp_path}" in capsys.readouterr().err
    runner.new("tied", tmp_path)
    assert cli.main(["experiment", "--list", "--claims", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].split()[:3] == ["tied", "tied", "0/16"]


# ---------------------------------------------------------------- the catalogue of runs


def test_runs_frame_reads_every_committed_v1_record_and_answers_the_readmes_query():
    folder = runner.V1_RESULTS
    df = catalogue.runs_frame(folder)
    assert len(df) == len(list(folder.rglob("*.json"))) > 0
    for col in ("key", "claim", "arm", "lr", "seed", "train.lr", "model.qk_norm", "final_val_loss", "loss_curve",
                "machine.cpu", "commit", "command", "path"):
        assert col in df.columns, col
    assert "model.d_model" in df.columns and "model.vocab_size" not in df.columns  # only what differs from S
    row = df[df.key == "0ecff1ed50b1f21e"].iloc[0]
    rec = json.loads(Path(row.path).read_text())
    assert row.final_val_loss == rec["result"]["final_val_loss"] and row["train.lr"] == rec["config"]["train"]["lr"]
    assert row.loss_curve[10] == rec["result"]["history"][0]["loss"]
    # the README's query, as written there
    readme = (ROOT / "README.md").read_text()
    query = re.search(r"^by_lr = (runs\[.*)$", readme, re.M)[1]
    answer = eval(query, {"runs": df})
    recs = [json.loads(p.read_text()) for p in folder.rglob("*.json")]
    lrs = {r["config"]["train"]["lr"] for r in recs if r["config"]["model"].get("qk_norm")}
    assert sorted(answer.index) == sorted(lrs) and len(lrs) > 1 and answer["count"].sum() == \
        sum(1 for r in recs if r["config"]["model"].get("qk_norm"))


def _record(key: str, claim: str, tags: dict, qk_norm=None, lr=1e-3, loss=3.5, **extra) -> dict:
    cfg = protocol.config(protocol.model_s(qk_norm=qk_norm), lr=lr, seed=tags.get("seed", 0))
    return {"key": key, "claim": claim, "tags": tags, "measure": "train", "args": {}, "scale": "cpu", "quick": False,
            "config": cfg.to_dict(), "commit": "abc", "uncommitted": [], "machine": {"cpu": "a CPU"},
            "environment": {"jax": "0.x"}, "lecture3": {"version": "0.1.0", "commit": "abc"},
            "claim_file": {"path": "/x/c.py", "sha256": "f00", "git": None}, "command": "lecture3 ...",
            "wall_s": 1.0, "finished": "now",
            "result": {"final_val_loss": loss, "final_loss": loss, "diverged": False, "probe": {"max_attn_logit": 9.0},
                       "history": [{"step": 10, "loss": loss + 1}, {"step": 20, "loss": loss, "val_loss": loss}],
                       **extra}}


def test_runs_frame_on_v2_records_flattens_what_differs_and_reads_any_folder_recursively(tmp_path):
    pool = tmp_path / "results" / "runs"
    pool.mkdir(parents=True)
    recs = [_record("k1", "c11", {"arm": "off", "seed": 0}), _record("k2", "c11", {"arm": "on", "seed": 0},
                                                                     qk_norm="per_head", lr=3e-3, seed=7)]
    for rec in recs:
        records.write(pool, rec)
    (tmp_path / "results" / "summary.json").write_text('{"not": "a record"}')
    (tmp_path / "results" / "c11").mkdir()
    (tmp_path / "results" / "c11" / "report.md").write_text("# report")
    df = catalogue.runs_frame(tmp_path)
    assert list(df.key) == ["k1", "k2"]
    changed = [c for c in df.columns if c.split(".")[0] in ("model", "train", "data")]
    assert sorted(changed) == ["model.qk_norm", "train.final_lr", "train.lr"]
    assert df["model.qk_norm"].isna().tolist() == [True, False] and df.loc[1, "model.qk_norm"] == "per_head"
    assert df.loc[1, "result.seed"] == 7 and df.seed.tolist() == [0, 0]  # a result named like a tag
    assert df.loc[1, "probe.max_attn_logit"] == 9.0 and df.loc[1, "val_curve"] == {20: 3.5}
    assert df.loc[0, "claim_file.sha256"] == "f00" and df.loc[0, "lecture3.version"] == "0.1.0"
    assert df.loc[0, "environment.jax"] == "0.x" and df.loc[0, "machine.cpu"] == "a CPU"
    (pool / "bad.json").write_text("{not json")
    with pytest.raises(records.RecordError, match="bad.json is not a valid run record"):
        catalogue.runs_frame(tmp_path)
    with pytest.raises(records.RecordError, match="is not a folder"):
        catalogue.runs_frame(tmp_path / "nowhere")


def test_csv_prints_the_frame_of_a_folder_or_of_a_claim(tmp_path, capsys):
    import pandas as pd

    assert cli.main(["experiment", "--csv", "--results", str(runner.V1_RESULTS)]) == 0
    printed = pd.read_csv(io.StringIO(capsys.readouterr().out))
    df = catalogue.runs_frame(runner.V1_RESULTS)
    assert list(printed.columns) == list(df.columns) and len(printed) == len(df)
    assert printed.final_val_loss.tolist() == pytest.approx(df.final_val_loss.tolist(), nan_ok=True)
    # a claim's CSV: the records of its grid, tagged as it tags them
    claim = runner.load_file(runner.new("tied", tmp_path))
    specs = runner.grid(claim)[:2]
    for s in specs:
        rec = {**_record(s.key, "another", {"arm": "x"}), "config": s.config.to_dict()}
        records.write(runner.claim_pool(claim), rec)
    assert cli.main(["experiment", "--csv", "tied", "--claims", str(tmp_path)]) == 0
    printed = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert printed.key.tolist() == [s.key for s in specs] and printed.arm.tolist() == [s.tags["arm"] for s in specs]
    assert cli.main(["experiment", "--csv", "--results", str(tmp_path / "empty")]) == 2
    assert "no run records" in capsys.readouterr().err


# ---------------------------------------------------------------- experiments/README.md's example


def test_the_readmes_own_claim_example_is_a_complete_claim_sharing_model_ss_runs(tmp_path, fake_training):
    text = (ROOT / "experiments" / "README.md").read_text()
    section = text.split("## Write your own claim", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)[1]
    assert len(code.splitlines()) <= 50
    (tmp_path / "tied_s.py").write_text(code)
    claim = runner.load("tied_s", tmp_path)
    specs = runner.grid(claim)
    assert len(specs) == 2 * len(protocol.LRS) * len(protocol.SEEDS)
    assert {s.key for s in specs if s.tags["arm"] == "tied"} == {s.key for s in protocol.baseline_specs()}
    res = runner.run_claim(claim, jobs=1, engine="inline", echo=lambda *a: None)
    assert res.complete and (tmp_path / "results" / "tied_s" / "report.md").read_text().strip().splitlines()[-1] \
        .startswith("Verdict: ")


# ---------------------------------------------------------------- a new user's install


@pytest.mark.slow
def test_a_claim_of_your_own_from_a_non_editable_install(tmp_path):
    """A fresh venv with lecture3 installed from this tree (not editable), in a folder outside the repository:
    new, quick, the full grid with a verdict, a record's command rerun from another folder, and --list."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)  # a new user's shell: lecture3 comes from the venv, never from a checkout on the path
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "").strip()
    work, other = tmp_path / "work", tmp_path / "other"
    work.mkdir()
    other.mkdir()

    def lecture3(*args, cwd=work, timeout=900):
        out = subprocess.run(["lecture3", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, f"{args}: {out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out.stdout

    where = subprocess.run([str(py), "-c", "import lecture3; print(lecture3.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True).stdout
    assert where.startswith(str(venv)), where
    lecture3("experiment", "new", "tied", "--claims", ".")
    lecture3("experiment", "tied", "--claims", ".", "--quick", "--jobs", "1")
    assert (work / "results-quick" / "tied" / "report.md").read_text().strip().endswith("not evidence)")
    out = lecture3("experiment", "tied", "--claims", ".", "--jobs", "1")
    report = (work / "results" / "tied" / "report.md").read_text().strip().splitlines()
    verdict = report[-1].removeprefix("Verdict: ")
    assert verdict in ("reproduced", "partly reproduced", "not reproduced", "inconclusive",
                       "inconclusive (under-trained)"), report[-1]
    assert f"Verdict: {verdict}" in out
    rec = json.loads(sorted((work / "results" / "runs").glob("*.json"))[0].read_text())
    assert rec["lecture3"]["installed"] == "package" and rec["lecture3"]["version"]
    assert re.fullmatch("[0-9a-f]{40}", rec["lecture3"]["commit"]) and rec["claim_file"]["git"] is None
    assert rec["claim_file"]["sha256"] == records.sha256(work / "tied.py")
    again = lecture3(*shlex.split(rec["command"])[1:], cwd=other)
    assert "within 1e-4, the same environment" in again, again
    listed = lecture3("experiment", "--list", cwd=other).strip().splitlines()
    assert [line.split()[1] for line in listed] == [p.stem for p in runner.claim_files()]
