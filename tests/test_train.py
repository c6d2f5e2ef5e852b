"""The sharded train step: mesh equivalence, overfitting, z-loss, non-finite handling."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lecture3 import losses
from lecture3 import sharding as S
from lecture3 import train as T
from lecture3.config import MeshConfig, ModelConfig, TrainConfig

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
    mesh = S.make_mesh(MeshConfig(*shape), devices)
    rules = S.axis_rules(cfg, mesh, tc.batch_size)
    _, shardings = T.state_shardings(cfg, tc, mesh, rules)
    state = T.init_state(cfg, tc, mesh, rules)
    step = T.jit_train_step(T.make_train_step(cfg, tc, loss_fn), mesh, rules, shardings)
    history = []
    for b in batches:
        state, m = step(state, {k: jax.device_put(v, S.batch_sharding(mesh, rules)) for k, v in b.items()})
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
    mesh = S.make_mesh(MeshConfig(1, 1, 8))
    with caplog.at_level(logging.INFO, logger="lecture3"):
        rules = dict(S.axis_rules(CFG, mesh, 8))
    assert rules["heads"] is None and rules["vocab"] is None and rules["kv_heads"] is None
    assert rules["mlp"] == ("tensor",)  # d_ff 128 divides
    lines = [r.getMessage() for r in caplog.records]
    assert any("vocab=259" in line and "replicated" in line for line in lines)
    assert any("heads=4" in line for line in lines)


def test_mesh_and_batch_errors_are_clear():
    with pytest.raises(S.MeshError, match="does not match the 8 devices"):
        S.make_mesh(MeshConfig(2, 2, 1))
    with pytest.raises(S.MeshError, match="fixed axes' product 3"):
        S.make_mesh(MeshConfig(-1, 3, 1))
    with pytest.raises(S.MeshError, match="batch_size=6 is not divisible by mesh data\\*fsdp=8"):
        S.check_batch(S.make_mesh(MeshConfig(-1, 1, 1)), 6)


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


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_non_finite_step_leaves_the_state_untouched(mode):
    tc = TrainConfig(steps=3, batch_size=8, warmup_steps=1, on_nonfinite=mode)
    calls = {"n": 0}

    def poisoned(logits, batch):  # NaN on every step: the state must never move
        calls["n"] += 1
        return jnp.float32(jnp.nan) * logits.mean(), {"poison": jnp.float32(0)}

    fn = losses.compose(losses.cross_entropy(), poisoned)
    mesh = S.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    rules = S.axis_rules(CFG, mesh, 8)
    _, shardings = T.state_shardings(CFG, tc, mesh, rules)
    state = T.init_state(CFG, tc, mesh, rules)
    before = jax.device_get(state.params)
    step = T.jit_train_step(T.make_train_step(CFG, tc, fn), mesh, rules, shardings)
    state, m = step(state, _batches(1)[0])
    assert float(m["finite"]) == 0.0 and int(state.step) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)


def test_max_attention_logit_is_reported_for_scanned_and_unscanned_stacks():
    tc = TrainConfig(steps=1, batch_size=8, warmup_steps=1)
    for scan in (False, True):
        cfg = ModelConfig(**{**CFG.__dict__, "scan_layers": scan})
        _, hist = _run(cfg, tc, (1, 1, 1), _batches(1))
        assert hist[0]["max_attn_logit"] > 0
