"""The research API: train from Python in memory or in a workdir, evaluate, load a run, own loss terms."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import cli_flags, tiny_config

import lecture3
from lecture3 import cli, losses

pytestmark = pytest.mark.slow  # trains models


def _batches(n, seed=0, b=8, t=32, vocab=259):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.integers(0, vocab, (b, t + 1)).astype(np.int32)
        out.append({"inputs": x[:, :-1], "targets": x[:, 1:]})
    return out


def test_notebook_style_training_in_memory_matches_the_cli(tmp_path, capsys):
    cfg = tiny_config(tmp_path, steps=50, log_every=10, eval_every=50, checkpoint_every=50, sample_tokens=0,
                      lr=1e-2, final_lr=1e-3, warmup_steps=5)
    run = lecture3.train(cfg)  # no workdir: nothing written
    losses_py = [r["loss"] for r in run.history]
    assert [r["step"] for r in run.history] == [10, 20, 30, 40, 50]
    assert losses_py[-1] < losses_py[0] - 0.5, losses_py
    assert run.stopped is None and "val_loss" in run.metrics and run.workdir is None
    assert isinstance(run.history.to_list(), list) and run.history.column("loss")[0][0] == 10
    batches = [{k: v for k, v in b.items()} for b in lecture3.loop.dataio.validation_batches(cfg.data, 8)[:1]]
    ev = lecture3.evaluate(cfg, run.params, batches)
    assert set(ev) == {"loss", "perplexity", "tokens"} and ev["tokens"] > 0
    np.testing.assert_allclose(ev["loss"], run.metrics["val_loss"], rtol=1e-5)  # the same validation batch

    flags = [*cli_flags(cfg), "--train.lr", "0.01", "--train.final-lr", "0.001"]
    assert cli.main(["train", *flags, "--workdir", str(tmp_path / "wd")]) == 0
    records = [json.loads(line) for line in (tmp_path / "wd" / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([r["loss"] for r in records], losses_py, rtol=1e-5)  # same seed, same losses

    loaded = lecture3.load_run(tmp_path / "wd")
    assert loaded.config == cfg
    assert [r["step"] for r in loaded.history] == [10, 20, 30, 40, 50]
    np.testing.assert_allclose(lecture3.evaluate(cfg, loaded.params, batches)["loss"], ev["loss"], rtol=1e-4)


def test_own_batches_callbacks_and_a_user_term_with_aux(tmp_path):
    cfg = tiny_config(tmp_path, steps=30, log_every=5, eval_every=100, checkpoint_every=100, sample_tokens=0,
                      log_per_layer=True)
    seen = []

    @losses.needs("attn_entropy", "resid_rms")
    def entropy_bonus(logits, batch, aux):
        assert aux["attn_entropy"].shape[0] == cfg.model.n_layers and "params" in aux
        value = -1e-2 * jnp.mean(aux["attn_entropy"]) + 0.0 * jnp.mean(aux["resid_rms"])
        return value, {"entropy_bonus": value}

    def stop_at_20(record):
        seen.append(record["step"])
        return record["step"] >= 20

    fn = losses.compose(losses.cross_entropy(), entropy_bonus)
    run = lecture3.train(cfg, data=iter(_batches(30)), val_data=_batches(1, seed=9), loss_fn=fn,
                         callbacks=[stop_at_20])
    assert seen == [5, 10, 15, 20] and "stop_at_20" in run.stopped
    rec = run.history[-1]
    assert rec["entropy_bonus"] < 0 and rec["loss"] == pytest.approx(rec["cross_entropy"] + rec["entropy_bonus"])
    assert {f"grad_norm/{i}" for i in range(2)} <= set(rec) and "max_attn_logit/1" in rec
    assert "val_loss" in rec  # the last record of a stopped run is evaluated

    plain = lecture3.train(cfg, data=iter(_batches(30)), callbacks=[lambda r: r["step"] >= 20])
    # the term changed the training: the params differ (its gradient is small at init, so after 20 steps the
    # logged loss can agree to all of float32's digits)
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(run.params),
                                                        strict=True)]
    assert any(changed)


def test_own_batches_of_the_wrong_shape_fail_before_any_compute(tmp_path):
    cfg = tiny_config(tmp_path)
    with pytest.raises(lecture3.Lecture3Error, match=r"inputs \(8, 16\).*\[8, 32\]"):
        lecture3.train(cfg, data=_batches(2, t=16))
    with pytest.raises(lecture3.Lecture3Error, match="'inputs' and 'targets'"):
        lecture3.train(cfg, data=[{"tokens": np.zeros((8, 32))}])
    with pytest.raises(lecture3.Lecture3Error, match=r"val_data batch 1 is not a mapping with 'inputs' and 'targets'"):
        lecture3.train(cfg, data=_batches(2), val_data=[*_batches(1), np.zeros((8, 32))])
    with pytest.raises(lecture3.Lecture3Error, match=r"evaluate: data batch 0 is not a mapping with 'inputs' and "
                       r"'targets' \(int\[B, T\]\); optional keys: loss_mask"):
        lecture3.evaluate(cfg, None, [{"tokens": np.zeros((8, 32))}])  # checked before the params are used


def test_a_workdir_run_on_own_batches_resumes_where_it_stopped(tmp_path):
    cfg = tiny_config(tmp_path, steps=12, log_every=2, eval_every=100, checkpoint_every=4, sample_tokens=0)
    data = _batches(12, seed=3)
    whole = lecture3.train(cfg, data=data)
    lecture3.train(cfg, data=data, workdir=tmp_path / "wd", callbacks=[lambda r: r["step"] >= 6])
    resumed = lecture3.train(cfg, data=data, workdir=tmp_path / "wd")  # skips the 6 batches already used
    np.testing.assert_allclose([r["loss"] for r in resumed.history], [r["loss"] for r in whole.history],
                               rtol=1e-5)


def test_init_params_are_plain_arrays():
    cfg = lecture3.ModelConfig(d_model=16, n_layers=2, n_heads=2, max_seq_len=8)
    params = lecture3.init_params(cfg, 0)
    import jax

    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(params))
    np.testing.assert_array_equal(params["embed"], lecture3.init_params(lecture3.Config(model=cfg), 0)["embed"])


MODULES = ["lecture3." + m for m in (
    "accounting", "capture", "checkpoint", "cli", "cli_data", "cli_generate", "cli_train", "config",
    "decoding", "diagnostics", "errors", "flags", "grid", "loop", "loss_spec", "losses", "model", "optim",
    "presets", "sharding", "steps", "data", "hf", "layers.attention", "layers.block", "layers.positions")]

# In one fresh interpreter, for each module: forget every lecture3 module, import that one first, then all
# the others, and report the error, if any. A cycle fails on the order of lecture3's own imports alone, so
# keeping jax, flax, tfds... loaded between rounds changes nothing but the time (one start, not one each).
_IMPORT_ROUNDS = """
import importlib, json, sys, traceback
modules = json.loads(sys.argv[1])
errors = {}
for first in modules:
    for name in [m for m in sys.modules if m == "lecture3" or m.startswith("lecture3.")]:
        del sys.modules[name]
    try:
        for m in [first, *reversed(modules)]:
            importlib.import_module(m)
    except Exception:
        errors[first] = traceback.format_exc(limit=-3)
print(json.dumps(errors))
"""


@pytest.fixture(scope="module")
def import_errors() -> dict[str, str]:
    out = subprocess.run([sys.executable, "-c", _IMPORT_ROUNDS, json.dumps(MODULES)], check=True,
                         capture_output=True, text=True, timeout=300)
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.parametrize("first", MODULES)
def test_every_module_imports_first(first, import_errors):
    """No import cycle: each module imports on its own, before any other lecture3 module, then all the others."""
    assert first not in import_errors, import_errors[first]
