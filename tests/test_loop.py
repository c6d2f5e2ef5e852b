"""The training loop's bookkeeping: MFU peaks, strict metrics, resume checks, saves without copies,
inputs checked before anything is created, and no host sync on the steps between log steps."""

import dataclasses
import json
import math
import struct
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import cli_flags, tiny_config

import lecture3
from lecture3 import cli, loop, meter, steps
from lecture3.checkpoint import Checkpointer, CheckpointError, check_resumable
from lecture3.config import TrainConfig
from lecture3.data import DataError
from lecture3.sharding import MeshError


def _device(kind, platform="gpu"):
    return SimpleNamespace(device_kind=kind, platform=platform)


@pytest.mark.parametrize(("kind", "dtype", "tflops"), [
    ("NVIDIA L40S", "bfloat16", 362.0),  # not the L4's 121
    ("NVIDIA L4", "bfloat16", 121.0),
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.0),
    ("NVIDIA H100 80GB HBM3", "float32", 494.5),  # TF32, not the bf16 peak
    ("NVIDIA H100 PCIe", "bfloat16", 756.0),
    ("TPU v5 lite", "bfloat16", 197.0),
    ("TPU v5", "bfloat16", 459.0),
    ("Tesla V100-SXM2-16GB", "bfloat16", None),  # no bf16 tensor cores: no MFU rather than a wrong one
    ("NVIDIA RTX 9999", "bfloat16", None),
])
def test_peak_flops_are_looked_up_by_exact_device_kind_and_compute_dtype(kind, dtype, tflops, monkeypatch):
    monkeypatch.setattr(loop.jax, "jit", lambda *a, **k: pytest.fail("timed a matmul on an accelerator"))
    peak = meter.peak_flops_per_device(None, dtype, _device(kind))
    assert peak == (None if tflops is None else pytest.approx(tflops * 1e12))
    assert meter.peak_flops_per_device(100.0, dtype, _device(kind)) == pytest.approx(1e14)


def test_peak_flops_are_measured_on_a_cpu():
    assert meter.peak_flops_per_device(None, "float32", jax.devices()[0]) > 0


def _strict(text):
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))


def test_metrics_lines_are_strict_json():
    line = loop._json_line({"step": 3, "loss": math.nan, "grad_norm": math.inf, "lr": 1e-3, "mfu": None})
    assert _strict(line) == {"step": 3, "loss": None, "grad_norm": None, "lr": 1e-3, "mfu": None}


@pytest.mark.slow
def test_sample_tokens_zero_is_allowed():
    assert TrainConfig(sample_tokens=0).sample_tokens == 0
    with pytest.raises(ValueError, match="sample_tokens=-1"):
        TrainConfig(sample_tokens=-1)


def _workdir_with_checkpoint(tmp_path, config):
    wd = tmp_path / "wd"
    (wd / "checkpoints" / "3").mkdir(parents=True)
    (wd / "config.json").write_text(json.dumps(config))
    return wd


@pytest.mark.slow
def test_resume_refuses_schedule_and_data_order_changes_unless_asked(tmp_path):
    cfg = tiny_config(tmp_path)
    wd = _workdir_with_checkpoint(tmp_path, cfg.to_dict())

    def resume(**train):
        check_resumable(wd, dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train)).to_dict())

    for field, value in [("lr", 1e-3), ("final_lr", 0.0), ("steps", 60), ("warmup_steps", 5), ("schedule", "wsd"),
                         ("batch_size", 16), ("seed", 1), ("beta2", 0.99), ("weight_decay", None)]:
        with pytest.raises(CheckpointError) as e:
            resume(**{field: value})
        msg = str(e.value)
        assert f"train.{field}: " in msg and "--train.allow-config-change" in msg and len(msg.splitlines()) == 1
    with pytest.raises(CheckpointError, match=r"train\.lr: 0\.003 -> 0\.001; train\.steps: 6 -> 60"):
        resume(lr=1e-3, steps=60)
    # what only changes logging, evaluation, saving or the end-of-run sample resumes freely
    resume(log_every=2, eval_every=2, eval_batches=2, checkpoint_every=2, keep_checkpoints=1, peak_tflops=10.0,
           sample_tokens=0, progress=True, on_nonfinite="skip")
    resume(loss_chunk=8)  # an implementation field: the same maths computed another way
    resume(lr=1e-3, steps=60, allow_config_change=True)
    with pytest.raises(CheckpointError, match="model.d_model"):  # the flag never allows another model
        check_resumable(wd, dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, d_model=64),
            train=dataclasses.replace(cfg.train, allow_config_change=True)).to_dict())


@pytest.mark.slow
def test_a_save_hands_orbax_the_state_arrays_themselves(tmp_path):
    state = steps.TrainState(step=jnp.zeros((), jnp.int32), params={"w": jnp.ones((4, 4))},
                         opt_state=({"mu": jnp.zeros((4, 4))},), rng=jax.random.PRNGKey(0))
    ckpt = Checkpointer(tmp_path, 1)
    saved = {}
    ckpt.manager.save = lambda step, args: saved.update(args.state.item)
    ckpt.save(1, state, iterator=None)
    assert saved["params"]["w"] is state.params["w"]
    assert saved["opt_state"][0]["mu"] is state.opt_state[0]["mu"]
    assert saved["step"] is state.step and saved["rng"] is state.rng


def test_bad_inputs_are_reported_before_the_parameter_table_and_create_nothing(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    flags = cli_flags(cfg)
    wd = tmp_path / "wd"
    bad_glob = [*flags, "--data.source", f"files:{tmp_path}/nothing-here/*.txt", "--workdir", str(wd)]
    assert cli.main(["train", *bad_glob]) == 2
    out, err = capsys.readouterr()
    assert "matches no files" in err and len(err.strip().splitlines()) == 1
    assert out == "" and not wd.exists()  # no parameter table, no empty workdir

    assert cli.main(["train", *flags, "--mesh.data", "3", "--workdir", str(wd)]) == 2
    out, err = capsys.readouterr()
    assert "does not match the 8 devices" in err and out == "" and not wd.exists()

    afile = tmp_path / "afile"
    afile.write_text("x")
    assert cli.main(["train", *flags, "--workdir", str(afile)]) == 2
    out, err = capsys.readouterr()
    assert f"{afile} is a file, not a folder" in err and "--workdir" in err and out == ""
    assert "File exists" not in err and afile.read_text() == "x"

    with pytest.raises(DataError):
        loop.check_inputs(dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data, source=f"files:{tmp_path}/missing.txt")), wd)
    with pytest.raises(MeshError):
        loop.check_inputs(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=4)), wd)


def test_each_process_probes_the_workdir_with_its_own_file(tmp_path, monkeypatch):
    written = []
    real = Path.write_text
    monkeypatch.setattr(Path, "write_text", lambda self, text: written.append(self.name) or real(self, text))
    loop.check_workdir(tmp_path / "wd", process_index=1)
    assert len(written) == 1 and written[0].startswith(".write-test-1-") and list((tmp_path / "wd").iterdir()) == []


class _Flag(np.ndarray):
    """A host-side `finite` flag that records when the loop reads it."""

    def __bool__(self):
        self.events.append(("read", self.step))
        return bool(self.item())

    __float__ = lambda self: (self.__bool__(), float(self.item()))[1]  # noqa: E731


@pytest.mark.slow
@pytest.mark.slow
def test_the_loop_reads_a_steps_flag_only_after_queueing_the_next_step(tmp_path, monkeypatch):
    events = []
    real = steps.jit_train_step

    def recording(*args, **kwargs):
        step_fn = real(*args, **kwargs)

        def wrapped(state, batch):
            state, metrics = step_fn(state, batch)
            done = len([e for e in events if e[0] == "dispatch"]) + 1
            events.append(("dispatch", done))
            flag = np.asarray(jax.device_get(metrics["finite"]), np.float32).view(_Flag)
            flag.events, flag.step = events, done
            return state, {**metrics, "finite": flag}

        return wrapped

    monkeypatch.setattr(steps, "jit_train_step", recording)
    cfg = tiny_config(tmp_path, steps=6, log_every=6, eval_every=6, checkpoint_every=6)
    loop.run(cfg, tmp_path / "wd")
    for k in range(2, 6):  # step 1 compiles and is timed apart; step 6 is logged and saved
        assert events.index(("read", k)) > events.index(("dispatch", k + 1)), events


def _tb_scalars(tb_dir, tag):
    """(step, value) of every `tag` scalar in the TensorBoard event files of `tb_dir`."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(Path(tb_dir).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            out += [(event.step, v.simple_value) for v in event.summary.value if v.tag == tag]
    return out


@pytest.mark.slow
@pytest.mark.slow
def test_a_resume_keeps_tensorboard_history_and_metrics_in_step(tmp_path, capsys):
    cfg = tiny_config(tmp_path, steps=6, checkpoint_every=3)
    wd = tmp_path / "wd"
    loop.run(cfg, wd)
    first = capsys.readouterr().out
    assert f"wrote {wd}/: metrics.jsonl, tb/" in first and "checkpoints/ (latest step 6)" in first
    records = [_strict(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["tokens_per_s"] is None and records[0]["mfu"] is None  # step 1 compiles: not timed
    assert all(r["tokens_per_s"] > 0 and r["mfu"] > 0 for r in records[1:])
    # a kill after step 6 was logged but before its checkpoint landed: the resume redoes steps 4..6
    import shutil

    shutil.rmtree(wd / "checkpoints" / "6")
    assert cli.main(["train", *cli_flags(cfg), "--train.sample-tokens", "0", "--workdir", str(wd)]) == 0
    out = capsys.readouterr().out
    assert "resuming from step 3" in out and "sample:" not in out
    steps = [r["step"] for r in (_strict(line) for line in (wd / "metrics.jsonl").read_text().splitlines())]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in _tb_scalars(wd / "tb", "loss")] == [1, 2, 3, 4, 5, 6]
    history = [json.loads(line) for line in (wd / "config-history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [0, 3]
    assert history[1]["config"]["train"]["sample_tokens"] == 0 and history[0]["config"]["train"]["sample_tokens"] == 8
    assert json.loads((wd / "config.json").read_text())["train"]["sample_tokens"] == 0


def test_history_to_pandas_keeps_step_as_a_column(monkeypatch):
    pd = pytest.importorskip("pandas")
    history = loop.History([{"loss": 3.0, "step": 10, "lr": 1e-3}, {"step": 20, "loss": 2.5, "lr": 2e-3,
                                                                      "val_loss": 2.7}])
    df = history.to_pandas()
    assert isinstance(df, pd.DataFrame) and list(df.columns) == ["step", "loss", "lr", "val_loss"]
    assert list(df["step"]) == [10, 20] and list(df.sort_values("step")["loss"]) == [3.0, 2.5]
    by_step = df.set_index("step")
    assert by_step.loc[20, "loss"] == 2.5 and by_step.loc[20, "val_loss"] == 2.7
    assert math.isnan(by_step.loc[10, "val_loss"])
    assert history.df.equals(df)
    monkeypatch.setitem(sys.modules, "pandas", None)  # as if pandas were not installed
    with pytest.raises(lecture3.Lecture3Error, match="History.to_pandas needs pandas: pip install pandas"):
        history.to_pandas()


def _by_step(history):
    return {r["step"]: r for r in history if "loss" in r}


def test_the_logged_loss_is_the_mean_of_the_steps_since_the_last_log(tmp_path):
    """One batch every log_every steps is a noisy curve: the logged loss and its terms are the mean over the
    steps since the last log; the step's signals (gradient norm, lr) are the last step's."""
    cfg = tiny_config(tmp_path, steps=6, log_every=1, eval_every=6, **{"z_loss": 1e-4})
    every = _by_step(lecture3.train(cfg).history)
    grouped = _by_step(lecture3.train(cfg.replace(**{"train.log_every": 3})).history)
    assert sorted(grouped) == [3, 6]
    for end in (3, 6):
        steps_ = range(end - 2, end + 1)
        for key in ("loss", "cross_entropy", "z_loss"):
            assert grouped[end][key] == pytest.approx(np.mean([every[s][key] for s in steps_]), rel=1e-6), key
        for key in ("grad_norm", "lr"):
            assert grouped[end][key] == pytest.approx(every[end][key], rel=1e-6), key
    assert grouped[3]["loss"] != pytest.approx(every[3]["loss"], rel=1e-6)  # not the last batch's


def test_the_population_logs_the_mean_loss_since_the_last_log(tmp_path):
    from lecture3 import population

    cfg = tiny_config(tmp_path, steps=4, log_every=1, eval_every=4)
    members = [{"train.seed": 0}, {"train.seed": 1}]
    every = [_by_step(r.history) for r in population.train(cfg, members, progress=False, echo=lambda *a: None)]
    grouped = [_by_step(r.history) for r in population.train(cfg.replace(**{"train.log_every": 2}), members,
                                                             progress=False, echo=lambda *a: None)]
    for one, two in zip(every, grouped, strict=True):
        for end in (2, 4):
            assert two[end]["loss"] == pytest.approx((one[end - 1]["loss"] + one[end]["loss"]) / 2, rel=1e-6)


def test_config_json_states_the_numerical_environment(tmp_path):
    cfg = tiny_config(tmp_path, steps=2, eval_every=2, checkpoint_every=2, sample_tokens=0)
    lecture3.train(cfg, workdir=tmp_path / "run", echo=lambda *a: None)
    env = json.loads((tmp_path / "run" / "config.json").read_text())["environment"]
    assert {"cpu", "cpu_family", "cpu_model", "jax", "jaxlib", "xla_flags", "keep_host_memory",
            "batch_splits"} <= set(env)
    assert env["batch_splits"] == steps.batch_splits(cfg.model, cfg.train, lecture3.sharding.make_mesh(cfg.mesh))
    history = (tmp_path / "run" / "config-history.jsonl").read_text().splitlines()
    assert json.loads(history[-1])["environment"] == env
    assert lecture3.load_run(tmp_path / "run").config == cfg  # the extra key does not disturb reading it back


def test_a_single_process_run_leaves_the_process_jax_settings_alone(monkeypatch):
    """`lecture3.train` in a notebook joins no cluster, so it must not set the user's CPU collectives."""
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
    before = jax.config.jax_cpu_collectives_implementation
    jax.config.update("jax_cpu_collectives_implementation", "mpi")
    try:
        loop.init_distributed(lecture3.Config())
        assert jax.config.jax_cpu_collectives_implementation == "mpi"
    finally:
        jax.config.update("jax_cpu_collectives_implementation", before)
