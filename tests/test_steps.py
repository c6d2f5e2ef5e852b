"""The sharded train step: mesh equivalence, overfitting, z-loss, non-finite handling."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lecture3 import losses, runtime, sharding, steps
from lecture3.config import MeshConfig, ModelConfig, TrainConfig
from lecture3.errors import Lecture3Error
from lecture3.optim import schedule

pytestmark = pytest.mark.slow  # compiles models or runs the trainer: the fast tier skips it

CFG = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=259, max_seq_len=64)


def _batches(n, b=8, t=16, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.integers(0, 259, (b, t + 1)).astype(np.int32)
        out.append({"inputs": x[:, :-1], "targets": x[:, 1:], "loss_mask": np.ones((b, t), np.float32)})
    return out


def _run(cfg, tc, shape, batches, loss_fn=None):
    devices = jax.devices()[: int(np.prod(shape))]
    mesh = sharding.make_mesh(MeshConfig(*shape), devices)
    rules = sharding.axis_rules(cfg, mesh, tc.batch_size)
    _, shardings = steps.state_shardings(cfg, tc, mesh, rules)
    state = steps.init_state(cfg, tc, mesh, rules)
    step = steps.jit_train_step(steps.make_train_step(cfg, tc, loss_fn), mesh, rules, shardings)
    history = []
    for b in batches:
        state, m = step(state, {k: jax.device_put(v, sharding.batch_sharding(mesh, rules)) for k, v in b.items()})
        history.append({k: float(v) for k, v in m.items()})
    return state, history


def test_meshes_give_the_single_device_losses():
    tc = TrainConfig(steps=5, batch_size=8, warmup_steps=1)
    batches = _batches(5)
    _, single = _run(CFG, tc, (1, 1, 1), batches)
    for shape in [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)]:
        state, hist = _run(CFG, tc, shape, batches)
        np.testing.assert_allclose([h["loss"] for h in hist], [h["loss"] for h in single], atol=1e-5,
                                   err_msg=str(shape))
        if shape == (2, 2, 2):  # really sharded: fsdp on embed, tensor on heads
            spec = state.params["layer_0"]["attn"]["q"].sharding.spec
            assert spec[0] == "fsdp" and spec[1] == "tensor", spec


def test_indivisible_dims_are_replicated_with_one_log_line(caplog):
    mesh = sharding.make_mesh(MeshConfig(1, 1, 8))
    with caplog.at_level(logging.INFO, logger="lecture3"):
        rules = dict(sharding.axis_rules(CFG, mesh, 8))
    assert rules["heads"] is None and rules["vocab"] is None and rules["kv_heads"] is None
    assert rules["mlp"] == ("tensor",)  # d_ff 128 divides
    lines = [r.getMessage() for r in caplog.records]
    assert any("vocab=259" in line and "replicated" in line for line in lines)
    assert any("heads=4" in line for line in lines)


def test_mesh_and_batch_errors_are_clear():
    with pytest.raises(sharding.MeshError, match="does not match the 8 devices"):
        sharding.make_mesh(MeshConfig(2, 2, 1))
    with pytest.raises(sharding.MeshError, match="fixed axes' product 3"):
        sharding.make_mesh(MeshConfig(-1, 3, 1))
    with pytest.raises(sharding.MeshError, match="batch_size=6 is not divisible by mesh data\\*fsdp=8"):
        sharding.check_batch(sharding.make_mesh(MeshConfig(-1, 1, 1)), 6)


def test_tiny_model_overfits_a_fixed_batch():
    tc = TrainConfig(steps=150, batch_size=4, lr=1e-2, final_lr=1e-3, warmup_steps=10, weight_decay=None)
    batch = _batches(1, b=4, t=16, seed=3)[0]
    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=4, vocab_size=259, max_seq_len=64)
    _, hist = _run(cfg, tc, (1, 1, 1), [batch] * tc.steps)
    assert hist[0]["loss"] > 5.0
    assert hist[-1]["loss"] < 0.05, hist[-1]["loss"]


def test_z_loss_shrinks_log_z():
    batches = _batches(1, seed=4) * 60
    base = TrainConfig(steps=60, batch_size=8, lr=1e-2, final_lr=1e-2, warmup_steps=2)
    _, plain = _run(CFG, base, (1, 1, 1), batches)
    _, with_z = _run(CFG, TrainConfig(**{**base.__dict__, "z_loss": 1.0}), (1, 1, 1), batches)
    assert "z_loss" in with_z[-1] and "z_loss" not in plain[-1]
    assert with_z[-1]["log_z_abs"] < 0.5 * plain[-1]["log_z_abs"], (with_z[-1]["log_z_abs"], plain[-1]["log_z_abs"])


def _one_device(tc, cfg=CFG):
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    rules = sharding.axis_rules(cfg, mesh, tc.batch_size)
    _, shardings = steps.state_shardings(cfg, tc, mesh, rules)
    return mesh, rules, shardings, steps.init_state(cfg, tc, mesh, rules, shardings=shardings)


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_non_finite_step_leaves_the_state_untouched(mode):
    """Neither mode moves a parameter or an Adam moment; "skip" uses up the step (and its place in the
    schedule), "stop" hands back the input state itself, step included."""
    tc = TrainConfig(steps=3, batch_size=8, warmup_steps=1, on_nonfinite=mode)

    def poisoned(logits, batch):  # NaN on every step: the state must never move
        return jnp.float32(jnp.nan) * logits.mean(), {"poison": jnp.float32(0)}

    fn = losses.compose(losses.cross_entropy(), poisoned)
    mesh, rules, shardings, state = _one_device(tc)
    params, opt_state = jax.device_get(state.params), jax.device_get(state.opt_state)
    step = steps.jit_train_step(steps.make_train_step(CFG, tc, fn), mesh, rules, shardings)
    state, m = step(state, _batches(1)[0])
    assert float(m["finite"]) == 0.0
    assert float(m["lr"]) == 0.0 and float(m["update_ratio"]) == 0.0  # nothing was applied
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), params)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.opt_state), opt_state)
    assert int(state.step) == {"skip": 1, "stop": 0}[mode]


def test_a_skipped_step_keeps_the_schedule_on_time_and_the_logged_lr_is_the_applied_one():
    tc = TrainConfig(steps=6, batch_size=8, lr=1e-2, final_lr=1e-3, warmup_steps=3, weight_decay=None,
                     grad_clip=None, on_nonfinite="skip")
    batches = _batches(tc.steps, seed=5)
    batches[0] = {**batches[0], "loss_mask": np.full_like(batches[0]["loss_mask"], np.nan)}  # step 0 is NaN
    mesh, rules, shardings, state = _one_device(tc)
    step = steps.jit_train_step(steps.make_train_step(CFG, tc), mesh, rules, shardings)
    params, history = [jax.device_get(state.params)], []
    for b in batches:
        state, m = step(state, b)
        params.append(jax.device_get(state.params))
        history.append({k: float(v) for k, v in m.items()})
    lr_at = schedule(tc)
    assert history[0]["finite"] == 0.0 and history[0]["lr"] == 0.0
    np.testing.assert_allclose([h["lr"] for h in history[1:]], [float(lr_at(s)) for s in range(1, 6)], rtol=1e-6)
    np.testing.assert_allclose(history[-1]["lr"], tc.final_lr, rtol=1e-5)  # the run still ends at final_lr
    assert int(state.step) == tc.steps
    # step 1 is Adam's first update, g / (|g| + eps) ~ sign(g): its largest change is the lr it applied
    applied = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(params[2]), jax.tree.leaves(params[1]),
                                                                strict=True))
    np.testing.assert_allclose(applied, history[1]["lr"], rtol=1e-4)


def test_max_attention_logit_is_reported_for_scanned_and_unscanned_stacks():
    tc = TrainConfig(steps=1, batch_size=8, warmup_steps=1)
    for scan in (False, True):
        cfg = ModelConfig(**{**CFG.__dict__, "scan_layers": scan})
        _, hist = _run(cfg, tc, (1, 1, 1), _batches(1))
        assert hist[0]["max_attn_logit"] > 0


def _run_split(cfg, tc, batches, splits):
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    rules = sharding.axis_rules(cfg, mesh, tc.batch_size)
    _, shardings = steps.state_shardings(cfg, tc, mesh, rules)
    state = steps.init_state(cfg, tc, mesh, rules)
    step_fn = steps.make_train_step(cfg, tc, splits=splits)
    step = steps.jit_train_step(step_fn, mesh, rules, shardings)
    history = []
    for b in batches:
        state, m = step(state, b)
        history.append({k: np.asarray(v) for k, v in m.items()})
    return state, history, step_fn, b


@pytest.mark.parametrize("cfg", [CFG, CFG.replace(document_mask=True, qk_norm="per_head")],
                         ids=["gqa", "documents+qk_norm"])
def test_the_step_in_batch_halves_trains_the_same_model(cfg):
    tc = TrainConfig(steps=4, batch_size=8, warmup_steps=1, z_loss=1e-4, log_per_layer=True)
    batches = _batches(4)
    for i, b in enumerate(batches):  # two documents per row, restarting positions, so the halves carry them
        b["segment_ids"] = np.repeat([[0] * 9 + [1] * 7], 8, axis=0).astype(np.int32) + i
        b["positions"] = np.concatenate([np.arange(9), np.arange(7)])[None].repeat(8, 0).astype(np.int32)
    one_state, one, one_fn, b = _run_split(cfg, tc, batches, 1)
    two_state, two, two_fn, _ = _run_split(cfg, tc, batches, 2)
    for key in one[0]:  # every metric, per-layer ones included
        np.testing.assert_allclose([h[key] for h in two], [h[key] for h in one], rtol=1e-5, atol=1e-6, err_msg=key)
    # Adam divides by sqrt(v): where a gradient is ~0, rounding moves an update by a few 1e-5 (lr is 3e-3)
    jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, atol=5e-5), two_state.params, one_state.params)
    # and it really is two passes: twice the forward's matmuls in the traced step
    count = lambda fn: str(jax.make_jaxpr(fn)(one_state, b)).count("dot_general")  # noqa: E731
    assert count(two_fn) > 1.5 * count(one_fn)


def test_lecture3_splits_only_where_the_maths_cannot_change(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_cores", lambda: 2)
    one = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    two = sharding.make_mesh(MeshConfig(2, 1, 1), jax.devices()[:2])
    tc = TrainConfig(batch_size=8)
    assert steps.batch_splits(CFG, tc, one) == 2
    assert steps.batch_splits(CFG, tc, two) == 1  # each device already has its part
    assert steps.batch_splits(CFG, TrainConfig(batch_size=7), one) == 1
    assert steps.batch_splits(CFG.replace(resid_dropout=0.1), tc, one) == 1  # one mask per half
    monkeypatch.setattr(runtime, "cpu_cores", lambda: 1)
    assert steps.batch_splits(CFG, tc, one) == 1  # a worker pinned to one core: nothing to run side by side


def test_a_split_that_cannot_hold_says_so():
    tc = TrainConfig(batch_size=8)
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    rules = sharding.axis_rules(CFG, mesh, 8)
    state = steps.init_state(CFG, tc, mesh, rules)
    batch = _batches(1)[0]
    with pytest.raises(Lecture3Error, match="splits=3 must be a positive whole number that divides the batch of 8"):
        jax.eval_shape(steps.make_train_step(CFG, tc, splits=3), state, batch)
    with pytest.raises(Lecture3Error, match="splits=2 with dropout would draw each part's masks apart"):
        jax.eval_shape(steps.make_train_step(CFG.replace(resid_dropout=0.1), tc, splits=2), state, batch)
