"""Losses as pure functions, the AdamW decay mask, and the schedules."""

import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lecture3 import Transformer, losses, presets
from lecture3.config import ModelConfig, TrainConfig
from lecture3.optim import decay_mask, make_optimizer, schedule


def _batch(rng, b=2, t=5, v=7):
    logits = jnp.asarray(rng.normal(size=(b, t, v)) * 3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
    mask = jnp.asarray(rng.integers(0, 2, (b, t)), jnp.float32).at[0, 0].set(1.0)
    return logits, {"targets": targets, "loss_mask": mask}


def test_cross_entropy_matches_manual_and_respects_mask():
    logits, batch = _batch(np.random.default_rng(0))
    lp = np.asarray(jax.nn.log_softmax(logits))
    nll = -np.take_along_axis(lp, np.asarray(batch["targets"])[..., None], -1)[..., 0]
    m = np.asarray(batch["loss_mask"])
    loss, metrics = losses.cross_entropy()(logits, batch)
    np.testing.assert_allclose(loss, (nll * m).sum() / m.sum(), rtol=1e-6)
    assert set(metrics) == {"cross_entropy"}
    # masked positions do not count: changing their logits changes nothing
    noisy = jnp.where(batch["loss_mask"][..., None] > 0, logits, logits + 100.0)
    np.testing.assert_allclose(losses.cross_entropy()(noisy, batch)[0], loss, rtol=1e-6)


def test_z_loss_is_weighted_mean_square_log_z_and_float32():
    logits, batch = _batch(np.random.default_rng(1))
    logz = np.asarray(jax.nn.logsumexp(logits, -1))
    m = np.asarray(batch["loss_mask"])
    value, _ = losses.z_loss(1e-2)(logits.astype(jnp.bfloat16), batch)
    assert value.dtype == jnp.float32
    np.testing.assert_allclose(value, 1e-2 * (logz**2 * m).sum() / m.sum(), rtol=2e-2)


def test_compose_adds_terms_and_a_user_term_is_one_function():
    logits, batch = _batch(np.random.default_rng(2))

    def entropy_bonus(logits, batch):  # a user's own term
        p = jax.nn.softmax(logits)
        value = -0.1 * (p * jnp.log(p)).sum(-1).mean()
        return value, {"entropy_bonus": value}

    fn = losses.compose(losses.cross_entropy(), losses.z_loss(1e-4), entropy_bonus)
    total, metrics = fn(logits, batch)
    np.testing.assert_allclose(total, metrics["cross_entropy"] + metrics["z_loss"] + metrics["entropy_bonus"],
                               rtol=1e-6)
    assert metrics["loss"] == total
    with pytest.raises(ValueError, match="unknown loss term 'foo'"):
        losses.from_config({"foo": 1.0})
    with pytest.raises(ValueError, match="at least one term"):
        losses.compose()


def _flat(tree):
    """{"a/b/c": leaf}, skipping the `.value` of flax's boxes."""
    return {"/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)): v
            for path, v in jax.tree_util.tree_leaves_with_path(tree)}


MASK_CFG = ModelConfig(d_model=32, n_layers=2, n_heads=4, norm="layernorm", norm_bias=True, qkv_bias=True,
                       mlp_bias=True, attn_out_bias=True, qk_norm="per_head", position="learned",
                       tie_embeddings=False, max_seq_len=16)
UNDECAYED = ("layer_0/attn_norm/scale", "layer_0/attn_norm/bias", "layer_0/attn/q_bias", "layer_0/attn/q_norm",
             "layer_0/mlp/down_bias", "layer_0/attn/o_bias", "final_norm/scale", "embed", "pos_embed", "head")


@pytest.mark.slow
def test_decay_mask_leaves_norms_biases_and_embeddings_undecayed():
    params = nn.unbox(Transformer(MASK_CFG).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
    flat = _flat(decay_mask(params))
    assert flat["layer_0/attn/q"] and flat["layer_0/attn/o"] and flat["layer_0/mlp/up"] and flat["layer_0/mlp/down"]
    for name in UNDECAYED:
        assert flat[name] is False, name
    # embeddings and the head, tied or untied, follow decay_embeddings together
    on = _flat(decay_mask(params, decay_embeddings=True))
    assert on["embed"] is True and on["head"] is True and on["pos_embed"] is True

    # the optimiser really uses that mask: with zero gradients only decayed leaves move
    tx = make_optimizer(TrainConfig(lr=0.1, final_lr=0.1, warmup_steps=0, weight_decay=0.5, grad_clip=None))
    state = tx.init(params)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
    assert float(jnp.abs(updates["layer_0"]["attn"]["q"]).max()) > 0
    for leaf in (updates["layer_0"]["attn_norm"]["scale"], updates["layer_0"]["attn_norm"]["bias"],
                 updates["embed"], updates["head"], updates["layer_0"]["attn"]["q_bias"]):
        chex.assert_trees_all_equal(leaf, jnp.zeros_like(leaf))


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
def test_decay_mask_is_the_same_on_boxed_params(scan):
    """`Transformer(cfg).init(...)["params"]` is boxed (LogicallyPartitioned, last key `value`): with zero
    gradients and weight decay on, norm gains, biases, embeddings and the head stay put; matrices move."""
    cfg = MASK_CFG.replace(scan_layers=scan)
    boxed = Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    assert isinstance(boxed["embed"], nn.LogicallyPartitioned)
    assert _flat(decay_mask(boxed)) == _flat(decay_mask(nn.unbox(boxed)))
    tx = make_optimizer(TrainConfig(lr=0.1, final_lr=0.1, warmup_steps=0, weight_decay=0.5, grad_clip=None))
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, boxed), tx.init(boxed), boxed)
    moved = {k: bool(jnp.any(u != 0)) for k, u in _flat(updates).items()}
    prefix = "layers/" if scan else ""
    for name in UNDECAYED:
        name = name.replace("layer_0/", prefix + "layer_0/")
        assert moved[name] is False, name
    for name in ("layer_0/attn/q", "layer_0/attn/o", "layer_0/mlp/up", "layer_0/mlp/down"):
        assert moved[prefix + name] is True, name


# The undecayed parameters of every preset (and three option configs the presets lack), as the name-based
# rule of 297096c decided them, layer indices folded to `layer_*`: the structural rule must give the same.
UNDECAYED_BY_PRESET = {name: tuple(names.split()) for name, names in {
    "gpt2": "embed final_norm/bias final_norm/scale layer_*/attn/k_bias layer_*/attn/o_bias layer_*/attn/q_bias "
            "layer_*/attn/v_bias layer_*/attn_norm/bias layer_*/attn_norm/scale layer_*/mlp/down_bias "
            "layer_*/mlp/up_bias layer_*/mlp_norm/bias layer_*/mlp_norm/scale pos_embed",
    "llama3": "embed final_norm/scale head layer_*/attn_norm/scale layer_*/mlp_norm/scale",
    "gemma2": "embed final_norm/scale layer_*/attn_norm/scale layer_*/attn_post_norm/scale layer_*/mlp_norm/scale "
              "layer_*/mlp_post_norm/scale",
    "mistral": "embed final_norm/scale head layer_*/attn_norm/scale layer_*/mlp_norm/scale",
    "qwen2": "embed final_norm/scale layer_*/attn/k_bias layer_*/attn/q_bias layer_*/attn/v_bias "
             "layer_*/attn_norm/scale layer_*/mlp_norm/scale",
    "olmo2": "embed final_norm/scale head layer_*/attn/k_norm layer_*/attn/q_norm layer_*/attn_norm/scale "
             "layer_*/mlp_norm/scale",
    "gpt_neox": "embed final_norm/bias final_norm/scale head layer_*/attn/k_bias layer_*/attn/o_bias "
                "layer_*/attn/q_bias layer_*/attn/v_bias layer_*/attn_norm/bias layer_*/attn_norm/scale "
                "layer_*/mlp/down_bias layer_*/mlp/up_bias layer_*/mlp_norm/bias layer_*/mlp_norm/scale",
    "palm": "embed final_norm/scale layer_*/attn_norm/scale",
    "modern": "embed final_norm/scale head layer_*/attn/k_norm layer_*/attn/q_norm layer_*/attn_norm/scale "
              "layer_*/mlp_norm/scale",
    "t5_relative": "embed final_norm/scale layer_*/attn_norm/scale layer_*/mlp_norm/scale rel_bias",
    "qk_norm_full": "embed final_norm/bias final_norm/scale layer_*/attn/k_norm layer_*/attn/k_norm_bias "
                    "layer_*/attn/q_norm layer_*/attn/q_norm_bias layer_*/attn_norm/bias layer_*/attn_norm/scale "
                    "layer_*/mlp_norm/bias layer_*/mlp_norm/scale",
    "parallel_separate": "embed final_norm/scale layer_*/attn/k_bias layer_*/attn/o_bias layer_*/attn/q_bias "
                         "layer_*/attn/v_bias layer_*/attn_norm/scale layer_*/mlp/down_bias layer_*/mlp/gate_bias "
                         "layer_*/mlp/up_bias layer_*/mlp_norm/scale",
}.items()}
MASK_EXTRA = {"t5_relative": dict(position="relative"),
              "qk_norm_full": dict(qk_norm="full", norm="layernorm", norm_bias=True),
              "parallel_separate": dict(block="parallel", parallel_norm="separate", qkv_bias=True, mlp_bias=True,
                                        attn_out_bias=True)}


def _undecayed(cfg: ModelConfig, decay_embeddings: bool) -> tuple[str, ...]:
    shapes = jax.eval_shape(lambda: nn.unbox(Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))[
        "params"]))
    flat = _flat(decay_mask(shapes, decay_embeddings))
    return tuple(sorted({re.sub(r"^(layers/)?layer_\d+/", "layer_*/", k) for k, v in flat.items() if not v}))


@pytest.mark.parametrize("name", list(UNDECAYED_BY_PRESET))
def test_decay_mask_is_the_pinned_one_on_every_preset_scanned_or_not(name):
    cfg = (presets.get(name, "tiny") if name in presets.names()
           else ModelConfig(d_model=32, n_layers=2, n_heads=4, max_seq_len=16, **MASK_EXTRA[name]))
    for scan in (False, True):
        assert _undecayed(cfg.replace(scan_layers=scan), False) == UNDECAYED_BY_PRESET[name], scan
    embeddings = ("embed", "head", "pos_embed", "rel_bias")
    assert _undecayed(cfg, True) == tuple(n for n in UNDECAYED_BY_PRESET[name] if n not in embeddings)


def test_every_preset_has_a_pinned_decay_mask():
    assert set(presets.names()) <= set(UNDECAYED_BY_PRESET)


def test_learning_rate_follows_the_step_argument_not_the_update_count():
    """make_optimizer reads the schedule at `step=` (the train step); without it, at its own count."""
    tc = TrainConfig(lr=1.0, final_lr=0.1, warmup_steps=4, steps=10, weight_decay=None, grad_clip=None)
    tx, f = make_optimizer(tc), schedule(tc)
    params, grads = {"w": jnp.ones((3,))}, {"w": jnp.array([1.0, -2.0, 3.0])}
    state = tx.init(params)
    first, _ = tx.update(grads, state, params)  # count 0: lr/4
    for step in (0, 1, 3, 9):
        updates, _ = tx.update(grads, state, params, step=jnp.int32(step))
        np.testing.assert_allclose(updates["w"], first["w"] * float(f(step)) / float(f(0)), rtol=1e-6)


@pytest.mark.parametrize("kind", ["cosine", "wsd", "constant", "inverse_sqrt"])
def test_schedules_warm_up_then_reach_their_final_lr(kind):
    cfg = TrainConfig(schedule=kind, steps=100, warmup_steps=10, lr=1.0, final_lr=0.1)
    f = schedule(cfg)
    lrs = np.array([float(f(s)) for s in range(100)])
    np.testing.assert_allclose(lrs[:10], np.arange(1, 11) / 10, rtol=1e-6)
    assert lrs.max() <= 1.0 + 1e-6 and lrs.min() >= 0.1 - 1e-6
    if kind == "constant":
        np.testing.assert_allclose(lrs[10:], 1.0)
    elif kind == "inverse_sqrt":
        np.testing.assert_allclose(lrs[40], np.sqrt(10 / 40), rtol=1e-5)
    else:
        np.testing.assert_allclose(lrs[-1], 0.1, rtol=1e-5)
    if kind == "wsd":
        np.testing.assert_allclose(lrs[10:82], 1.0)  # stable until the last 20% of the post-warmup steps


def test_warmup_starts_at_lr_over_warmup_steps_and_peaks_one_step_early():
    """As `schedule` documents: step 0 trains at lr / warmup_steps (not 0), step warmup_steps - 1 at lr."""
    for warm in (1, 4, 7):
        f = schedule(TrainConfig(steps=50, warmup_steps=warm, lr=2.0, final_lr=0.2))
        np.testing.assert_allclose(float(f(0)), 2.0 / warm, rtol=1e-6)
        np.testing.assert_allclose(float(f(warm - 1)), 2.0, rtol=1e-6)
        assert warm == 1 or float(f(warm - 2)) < 2.0
    np.testing.assert_allclose(float(schedule(TrainConfig(warmup_steps=0, lr=2.0, final_lr=0.2))(0)), 2.0)


def test_optimizer_clips_by_global_norm():
    tx = optax.chain(make_optimizer(TrainConfig(grad_clip=1.0)))
    params = {"w": jnp.ones((3,))}
    state = tx.init(params)
    # Adam normalises, so compare the clipped first moment instead of the update
    _, state = tx.update({"w": jnp.full((3,), 100.0)}, state, params)
    mu = state[0][1][0].mu["w"]  # chain -> (clip, adamw chain) -> scale_by_adam state
    np.testing.assert_allclose(float(jnp.linalg.norm(mu)), (1 - 0.9) * 1.0, rtol=1e-5)
