"""The chunked cross-entropy (`train.loss_chunk`): the same loss, gradients and metrics as the full logits,
without ever holding a [B, T, V] array; the default path untouched."""

import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from lecture3 import losses, sharding, steps
from lecture3.config import Config, MeshConfig, ModelConfig, TrainConfig
from lecture3.experiment import spec
from lecture3.model import Transformer, head_logits, head_matrix

# soft-capped final logits, a vocabulary the chunks do not divide into, GQA
CFG = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                  final_logit_softcap=5.0)
B, T = 4, 12
EVERY_TERM = "cross_entropy:0.1+z_loss:1e-3+logit_l2:1e-4+max_attn_logit:1e-3,0.01"


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (B, T + 1))
    mask = (rng.random((B, T)) > 0.25).astype(np.float32)
    return {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
            "loss_mask": jnp.asarray(mask)}


def _params(cfg):
    params = Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    # larger weights than init, so the soft-cap, z-loss and log Z are far from their values at zero logits
    return jax.tree.map(lambda p: p * 4.0, params)


def _loss_and_grads(forward, cfg, loss_fn, batch):
    model = Transformer(cfg)
    fn = lambda p: forward(model, p, batch, loss_fn)
    (loss, (metrics, _)), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(_params(cfg))
    return loss, metrics, grads


@pytest.mark.parametrize("chunk", [1, 5, 12, 64])  # one position, chunks padded at the end, exact, one chunk
@pytest.mark.parametrize("tied", [True, False])
def test_chunked_equals_full_loss_gradients_and_metrics(chunk, tied):
    cfg = dataclasses.replace(CFG, tie_embeddings=tied)
    loss_fn = losses.parse(EVERY_TERM)
    batch = _batch()
    full = _loss_and_grads(steps.forward_metrics, cfg, loss_fn, batch)
    chunked = _loss_and_grads(lambda *a: steps.forward_metrics_chunked(*a, chunk=chunk), cfg, loss_fn, batch)
    assert set(chunked[1]) == set(full[1]) >= {"loss", "cross_entropy", "cross_entropy_smoothed", "z_loss",
                                               "logit_l2", "max_attn_logit_penalty", "log_z_abs", "max_attn_logit"}
    assert float(full[1]["z_loss"]) > 1e-4 and float(full[1]["max_attn_logit_penalty"]) > 0  # terms really on
    np.testing.assert_allclose(chunked[0], full[0], rtol=1e-5, atol=1e-6)
    for name in full[1]:
        np.testing.assert_allclose(chunked[1][name], full[1][name], rtol=1e-5, atol=1e-6, err_msg=name)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(full[2]), jax.tree.leaves(chunked[2]), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_the_head_of_the_model_is_head_logits():
    params, batch = _params(CFG), _batch()
    model = Transformer(CFG)
    out = model.apply({"params": params}, batch["inputs"], capture=(), head=False)
    assert out.logits is None and out.hidden.shape == (B, T, CFG.d_model)
    full = model.apply({"params": params}, batch["inputs"]).logits
    np.testing.assert_array_equal(head_logits(CFG, out.hidden, head_matrix(CFG, params)), full)


def _arrays_of_shape(jaxpr, shape) -> int:
    """How many values in `jaxpr` (and every jaxpr inside it) have this shape."""
    count = 0
    for eqn in jaxpr.eqns:
        count += sum(getattr(v.aval, "shape", None) == shape for v in eqn.outvars)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            count += _arrays_of_shape(sub, shape)
    return count


def test_the_chunked_gradient_never_holds_the_full_logits():
    loss_fn, batch, params, model = losses.parse(EVERY_TERM), _batch(), _params(CFG), Transformer(CFG)
    full = lambda p: steps.forward_metrics(model, p, batch, loss_fn)[0]
    chunked = lambda p: steps.forward_metrics_chunked(model, p, batch, loss_fn, chunk=4)[0]
    logits = (B, T, CFG.vocab_size)
    assert _arrays_of_shape(jax.make_jaxpr(jax.grad(full))(params).jaxpr, logits) > 0
    assert _arrays_of_shape(jax.make_jaxpr(jax.grad(chunked))(params).jaxpr, logits) == 0
    assert _arrays_of_shape(jax.make_jaxpr(jax.grad(chunked))(params).jaxpr, (B, 4, CFG.vocab_size)) > 0


def test_the_train_step_with_loss_chunk_matches_the_default_one():
    """One sharded step (data 2 x fsdp 2 x tensor 2 on the simulated CPU devices), with every logged metric."""
    tc = TrainConfig(batch_size=B, loss="cross_entropy:0.1+logit_l2:1e-4", z_loss=1e-3, warmup_steps=1)
    mesh = sharding.make_mesh(MeshConfig(2, 2, 2), jax.devices()[:8])
    rules = sharding.axis_rules(CFG, mesh, B)
    out = []
    for train in (tc, dataclasses.replace(tc, loss_chunk=5)):
        _, shardings = steps.state_shardings(CFG, train, mesh, rules)
        state = steps.init_state(CFG, train, mesh, rules, shardings=shardings)
        step = steps.jit_train_step(steps.make_train_step(CFG, train), mesh, rules, shardings)
        state, metrics = step(state, jax.device_put(_batch(), sharding.batch_sharding(mesh, rules)))
        out.append((jax.device_get(state.params), jax.device_get(metrics)))
    (p_full, m_full), (p_chunk, m_chunk) = out
    assert set(m_full) == set(m_chunk)
    for name in m_full:
        np.testing.assert_allclose(m_chunk[name], m_full[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # Adam's first update is about lr * sign(g): where a gradient is ~eps, float rounding moves it by ~1e-6
    for a, b in zip(jax.tree.leaves(p_full), jax.tree.leaves(p_chunk), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_a_term_that_reads_the_full_logits_is_refused_one_line():
    def argmax_hits(logits, batch):
        hits = (jnp.argmax(logits, -1) == batch["targets"]).mean()
        return 0.0 * hits, {"hits": hits}

    loss_fn = losses.compose(losses.cross_entropy(), argmax_hits)
    with pytest.raises(losses.LossSpecError, match="argmax_hits reads the full logits.*loss_chunk=None"):
        steps.make_train_step(CFG, TrainConfig(loss_chunk=4), loss_fn)


def test_loss_chunk_is_validated_and_off_by_default_without_changing_run_keys():
    assert TrainConfig().loss_chunk is None
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match="TrainConfig.loss_chunk"):
            TrainConfig(loss_chunk=bad)
    assert "loss_chunk" not in spec.key_config(Config())["train"]  # the records of existing runs keep their keys
    assert spec.key_config(Config(train=TrainConfig(loss_chunk=512)))["train"]["loss_chunk"] == 512
