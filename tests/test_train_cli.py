"""End to end: `lecture3 train` on a tiny real corpus, SIGKILL + resume, multi-process, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest
from train_helpers import cli_flags, tiny_config

from lecture3 import cli, loop

pytestmark = pytest.mark.slow  # compiles models or runs the trainer: the fast tier skips it

REPO = Path(__file__).resolve().parents[1]
NONDETERMINISTIC = {"tokens_per_s", "mfu"}


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["PYTHONPATH"] = str(REPO)
    return env


def _train_cmd(workdir, flags):
    return [sys.executable, "-m", "lecture3", "train", "--workdir", str(workdir), *flags]


def _metrics(workdir, complete_only=False):
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    if complete_only and lines and not lines[-1].endswith("}"):
        lines = lines[:-1]  # a SIGKILL can cut the last line
    return [json.loads(line) for line in lines]


def _assert_same_metrics(a, b):
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b, strict=True):
        assert set(x) == set(y)
        for k in x:
            if k not in NONDETERMINISTIC:
                assert x[k] == pytest.approx(y[k], rel=1e-6, abs=1e-7), (x["step"], k)


def test_sigkill_then_same_command_resumes_exactly(tmp_path):
    cfg = tiny_config(tmp_path, steps=150, checkpoint_every=25, eval_every=50)
    flags = cli_flags(cfg)
    full = subprocess.run(_train_cmd(tmp_path / "full", flags), env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert full.returncode == 0, full.stderr[-2000:]
    assert "validation loss" in full.stdout and "sample:" in full.stdout

    wd = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(wd, flags), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline:
        path = wd / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        steps = [json.loads(x)["step"] for x in lines[:-1]]  # the last line may be half written
        # kill once checkpoint 25 is committed (orbax renames it into place) and training has gone on
        if steps and steps[-1] >= 30 and (wd / "checkpoints" / "25").is_dir():
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _metrics(wd, complete_only=True)[-1]["step"]
    assert 30 <= killed_at < 150, "the run must be killed in the middle for this test to mean anything"

    resumed = subprocess.run(_train_cmd(wd, flags), env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from step" in resumed.stdout
    _assert_same_metrics(_metrics(wd), _metrics(tmp_path / "full"))
    assert (wd / "config.json").exists() and list((wd / "tb").iterdir())


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
    cfg = tiny_config(tmp_path, steps=6, checkpoint_every=3)
    loop.run(cfg, tmp_path / "wd", echo=print)
    ckpt = tmp_path / "wd" / "checkpoints"
    for f in (ckpt / "6").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    capsys.readouterr()
    out = loop.run(cfg, tmp_path / "wd", echo=print)
    printed = capsys.readouterr().out
    assert "checkpoint 6 is unreadable" in printed and "resuming from step 3" in printed
    assert out["metrics"]["step"] == 6
    assert any(p.name.startswith("6.corrupt-") for p in ckpt.iterdir())  # moved aside, not deleted
    assert [m["step"] for m in _metrics(tmp_path / "wd")] == list(range(1, 7))


def _main(argv, capsys):
    code = cli.main(argv)
    return code, capsys.readouterr().err.strip()


def test_bad_input_gets_one_clear_line(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    flags = cli_flags(cfg)
    wd = str(tmp_path / "wd")

    code, err = _main(["train", "--preset", "llama9:tiny", "--workdir", wd], capsys)
    assert code == 2 and "unknown" in err.lower() and "llama3" in err and len(err.splitlines()) == 1

    code, err = _main(["train", "--preset", "llama3:huge", "--workdir", wd], capsys)
    assert code == 2 and "huge" in err and "tiny" in err

    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--model.no-such-flag", "1"])
    assert e.value.code == 2 and "unrecognized arguments: --model.no-such-flag" in capsys.readouterr().err

    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--model.norm", "batchnorm"])
    assert e.value.code == 2 and "invalid choice: 'batchnorm'" in capsys.readouterr().err

    code, err = _main(["train", "--model.n-kv-heads", "3", "--workdir", wd], capsys)
    assert code == 2 and err.startswith("error: ModelConfig.n_kv_heads=3 is invalid")

    code, err = _main(["train", *flags, "--mesh.data", "3", "--workdir", wd], capsys)
    assert code == 2 and "does not match the 8 devices" in err

    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    code, err = _main(["train", *flags, "--workdir", str(blocker / "sub")], capsys)
    assert code == 2 and "cannot be written" in err and "--workdir" in err
    assert blocker.read_text() == "not a dir"


def test_resume_with_a_different_model_lists_the_fields(tmp_path, capsys):
    cfg = tiny_config(tmp_path, steps=3)
    loop.run(cfg, tmp_path / "wd")
    flags = cli_flags(cfg)
    i = flags.index("--model.n-kv-heads")
    flags[i + 1] = "4"
    code, err = _main(["train", *flags, "--model.norm", "layernorm", "--workdir", str(tmp_path / "wd")], capsys)
    assert code == 2
    assert "model.n_kv_heads: 2 -> 4" in err and "model.norm: 'rmsnorm' -> 'layernorm'" in err


def test_two_processes_match_one(tmp_path):
    script = REPO / "tests" / "scripts" / "two_process_steps.py"
    env = _env()
    env.pop("XLA_FLAGS")
    ref = subprocess.run([sys.executable, str(script), str(tmp_path / "ref.json"), str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{s.getsockname()[1]}"
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "multi.json"), str(tmp_path), str(i),
                               addr], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    ref_out, multi_out = (json.loads((tmp_path / n).read_text()) for n in ("ref.json", "multi.json"))
    assert multi_out["processes"] == 2 and multi_out["devices"] == 8 and ref_out["processes"] == 1
    assert multi_out["losses"] == pytest.approx(ref_out["losses"], abs=1e-5)


def _free_address():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.slow
def test_two_processes_train_checkpoint_resume_and_sample(tmp_path):
    """`lecture3 train` itself as 2 processes x 4 CPU devices, params sharded across both (fsdp=4 spans
    the processes): a killed-and-resumed run logs what the uninterrupted one did, and both end with a sample."""
    import shutil

    from lecture3 import data as dataio

    cfg = tiny_config(tmp_path, steps=4, checkpoint_every=2, eval_every=2)
    dataio.validation_batches(cfg.data, cfg.train.batch_size)  # build the dataset and tokenizer once, not in a race
    # under a loaded CI machine one process may reach a collective long after the other: wait, don't time out
    env = {**_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=4 --xla_cpu_collective_timeout_seconds=600",
           "JAX_PLATFORMS": "cpu"}

    def two_processes(workdir):
        dist = ["--mesh.data", "2", "--mesh.fsdp", "4", "--dist.coordinator-address", _free_address(),
                "--dist.num-processes", "2"]
        procs = [subprocess.Popen(_train_cmd(workdir, [*cli_flags(cfg), *dist, "--dist.process-id", str(i)]),
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(2)]
        outs = [p.communicate(timeout=600) for p in procs]
        for p, (_, err) in zip(procs, outs, strict=True):
            assert p.returncode == 0, err[-3000:]
        return outs[0][0]

    full = two_processes(tmp_path / "full")
    assert "sample:" in full
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "4")  # killed before checkpoint 4 landed
    resumed = two_processes(tmp_path / "resumed")
    assert "resuming from step 2" in resumed and "sample:" in resumed
    assert [m["step"] for m in _metrics(tmp_path / "full")] == [1, 2, 3, 4]
    _assert_same_metrics(_metrics(tmp_path / "resumed"), _metrics(tmp_path / "full"))


def test_generate_from_a_training_run(tmp_path, capsys):
    cfg = tiny_config(tmp_path, steps=3)
    out = loop.run(cfg, tmp_path / "wd")
    code = cli.main(["generate", "--workdir", str(tmp_path / "wd"), "--prompt", "import ", "--max-new-tokens", "6"])
    printed = capsys.readouterr().out
    assert code == 0 and "import " in printed
    # the checkpoint's params are the trained ones: greedy tokens equal those of the in-memory state
    from lecture3 import generate
    from lecture3.checkpoint import load_for_inference

    model_cfg, params, tok = load_for_inference(tmp_path / "wd")
    assert model_cfg == cfg.model
    prompt = [tok.encode("import ")]
    a = generate(model_cfg, params, prompt, 6)
    b = generate(cfg.model, jax.device_get(out["state"].params), prompt, 6)
    assert (a == b).all()
    code = cli.main(["generate", "--workdir", str(tmp_path / "nothing"), "--prompt", "x"])
    assert code == 2 and "no such directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    code = cli.main(["generate", "--workdir", str(tmp_path / "empty"), "--prompt", "x"])
    assert code == 2 and "no config.json" in capsys.readouterr().err


def test_resume_drops_metrics_past_the_checkpoint_and_a_line_cut_by_a_kill(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "loss": 1.2}\n{"step": 4, "lo')
    loop._truncate_metrics(path, 2)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    import dataclasses

    import jax.numpy as jnp

    from lecture3 import losses

    cfg = tiny_config(tmp_path, steps=3, checkpoint_every=3)
    loop.run(cfg, tmp_path / "wd")
    poisoned = losses.compose(losses.cross_entropy(), lambda logits, batch: (jnp.float32(jnp.nan), {}))
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=6, allow_config_change=True))
    with pytest.raises(loop.TrainingError, match=r"non-finite loss at step 4; .*checkpoint \(step 3\) is intact"):
        loop.run(longer, tmp_path / "wd", loss_fn=poisoned)
    assert sorted(p.name for p in (tmp_path / "wd" / "checkpoints").iterdir() if p.name.isdigit()) == ["3"]
    # the checkpoint still restores and training goes on from it
    assert loop.run(longer, tmp_path / "wd")["metrics"]["step"] == 6

    skipping = dataclasses.replace(longer, train=dataclasses.replace(longer.train, on_nonfinite="skip", steps=8))
    out = loop.run(skipping, tmp_path / "wd", loss_fn=poisoned)
    assert out["metrics"]["step"] == 8 and out["metrics"]["finite"] == 0.0
