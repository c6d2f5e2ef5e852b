"""The ways to compute attention (`lecture3.layers.attention_ops`) against the dense reference, on random
inputs with every mask and everything inside the softmax; what each costs; what the config refuses.

Model-level equality (logits and gradients through the whole Transformer) is
tests/test_model.py::test_attention_impl_same_maths_different_program.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lecture3 import accounting
from lecture3.config import ModelConfig
from lecture3.layers import attention_ops as ops
from lecture3.layers import positions as pos

B, T, N, K, H = 2, 37, 4, 2, 8  # GQA 4:2, T a multiple of neither the chunk nor the window
SCALE = 0.3
IDX = jnp.broadcast_to(jnp.arange(T), (B, T))
SEG = jnp.asarray(np.sort(np.random.RandomState(0).randint(0, 3, (B, T)), axis=1))


def qkv(t=T):
    keys = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(keys[0], (B, t, N, H)), jax.random.normal(keys[1], (B, t, K, H)),
            jax.random.normal(keys[2], (B, t, K, H)))


def alibi(qp, kp):
    return pos.alibi_bias(qp, kp, N)


def dense(q, k, v, window, seg, bias_fn, cap):
    mask = ops.attention_mask(IDX, IDX, window, seg, seg)
    out, _, head_max = ops.attention_core(q, k, v, mask, None if bias_fn is None else bias_fn(IDX, IDX),
                                          SCALE, cap)
    return out, head_max


def chunked(q, k, v, window, seg, bias_fn, cap):
    return ops.chunked_attention(q, k, v, IDX, IDX, window, seg, seg, IDX, IDX, bias_fn, SCALE, cap, chunk=8)


def local(q, k, v, window, seg, bias_fn, cap):
    return ops.local_attention(q, k, v, IDX, window, seg, IDX, bias_fn, SCALE, cap)


def grads(fn, q, k, v, *args):
    return jax.grad(lambda *x: jnp.sum(jnp.sin(fn(*x, *args)[0])), argnums=(0, 1, 2))(q, k, v)


def naive_attention(q, k, v, mask, bias, cap):
    """The textbook maths, one head at a time with `jax.nn.softmax`: what `attention_core` must equal."""
    outs, maxes = [], []
    for i in range(N):
        logits = SCALE * jnp.einsum("bth,bsh->bts", q[:, :, i], k[:, :, i // (N // K)])
        maxes.append(jnp.max(jnp.where(mask, logits, -jnp.inf)))
        if cap is not None:
            logits = cap * jnp.tanh(logits / cap)
        if bias is not None:
            logits = logits + bias[:, i]
        probs = jnp.where(mask, jax.nn.softmax(jnp.where(mask, logits, -1e30), axis=-1), 0.0)
        outs.append(jnp.einsum("bts,bsh->bth", probs, v[:, :, i // (N // K)]))
    return jnp.stack(outs, axis=2), jnp.stack(maxes)


@pytest.mark.parametrize("bias, cap", [(None, None), ("alibi", None), (None, 2.0)])
def test_dense_core_equals_the_textbook_maths_with_gradients(bias, cap):
    """Outputs, head max and the gradients of both (the core has its own softmax derivative, and without a
    cap or a bias takes the head max from the softmax's row max), with a row that sees no key at all."""
    q, k, v = qkv()
    mask = ops.attention_mask(IDX, IDX, 9, SEG, SEG).at[1, 5].set(False)  # row 5 of batch 1: no key
    b = None if bias is None else alibi(IDX, IDX)
    core = lambda q, k, v: ops.attention_core(q, k, v, mask, b, SCALE, cap)  # noqa: E731
    out, probs, head_max = core(q, k, v)
    ref_out, ref_max = naive_attention(q, k, v, mask, b, cap)
    np.testing.assert_allclose(out, ref_out, atol=2e-6)
    np.testing.assert_allclose(head_max, ref_max, atol=2e-6)
    assert np.all(np.asarray(out)[1, 5] == 0) and np.all(np.asarray(probs)[1, :, :, 5] == 0)
    for pick in (lambda o, m: jnp.sum(jnp.sin(o)), lambda o, m: jnp.sum(m ** 2)):
        got = jax.grad(lambda *x, pick=pick: pick(*core(*x)[::2]), argnums=(0, 1, 2))(q, k, v)
        want = jax.grad(lambda *x, pick=pick: pick(*naive_attention(*x, mask, b, cap)),
                        argnums=(0, 1, 2))(q, k, v)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, atol=1e-5)
    no_key = ops.attention_core(q, k, v, jnp.zeros_like(mask), b, SCALE, cap)[2]
    assert np.all(np.asarray(no_key) == -np.inf)  # a head that sees no key: -inf, as the max of nothing


@pytest.mark.parametrize("window, documents, bias, cap", [
    (None, False, None, None), (None, True, "alibi", 2.0), (5, False, "alibi", None), (5, True, None, 2.0),
    (16, True, "alibi", None), (16, False, None, 2.0)])  # windows < chunk, > chunk; every option twice
def test_chunked_and_local_equal_dense_with_their_gradients(window, documents, bias, cap):
    q, k, v = qkv()
    args = (window, SEG if documents else None, alibi if bias else None, cap)
    ref, ref_max = dense(q, k, v, *args)
    ref_grads = grads(dense, q, k, v, *args)
    for fn in [chunked] + ([local] if window else []):
        out, head_max = fn(q, k, v, *args)
        np.testing.assert_allclose(out, ref, atol=2e-6, err_msg=fn.__name__)
        np.testing.assert_allclose(head_max, ref_max, atol=2e-6, err_msg=fn.__name__)  # before the cap
        for g, r in zip(grads(fn, q, k, v, *args), ref_grads, strict=True):
            np.testing.assert_allclose(g, r, atol=1e-5, err_msg=fn.__name__)


def test_fused_equals_dense_and_zeroes_a_fully_masked_row():
    q, k, v = qkv()
    mask = ops.attention_mask(IDX, IDX, 7, SEG, SEG).at[0, 3].set(False)  # row 3 of batch 0 sees nothing
    bias = alibi(IDX, IDX)
    ref, _, ref_max = ops.attention_core(q, k, v, mask, bias, SCALE)
    out, head_max = ops.fused_attention(q, k, v, mask, bias, SCALE, with_max=True)
    np.testing.assert_allclose(out, ref, atol=2e-6)
    np.testing.assert_allclose(head_max, ref_max, atol=2e-6)
    assert np.all(np.asarray(out)[0, 3] == 0)
    seg = SEG[:, :, None] == SEG[:, None, :]  # the documents only: causality and window are JAX's
    out, head_max = ops.fused_attention(q, k, v, seg, bias, SCALE, causal=True, window=7, with_max=True)
    ref, _, ref_max = ops.attention_core(q, k, v, ops.attention_mask(IDX, IDX, 7, SEG, SEG), bias, SCALE)
    np.testing.assert_allclose(out, ref, atol=2e-6)
    np.testing.assert_allclose(head_max, ref_max, atol=2e-6)


@pytest.mark.parametrize("poison", [np.nan, np.inf])
def test_chunked_keeps_a_poisoned_value_slot_from_the_rows_that_do_not_see_it(poison):
    q, k, v = qkv()
    v = v.at[0, 20, 1].set(poison)  # batch 0, key 20, kv head 1
    out = np.asarray(chunked(q, k, v, None, None, None, None)[0])
    ref = np.asarray(dense(q, k, v, None, None, None, None)[0])
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    assert np.isnan(out[0, 20:, 2:]).all() and np.isfinite(out[0, :20]).all()  # heads 2, 3 read kv head 1
    assert np.isfinite(out[0, 20:, :2]).all() and np.isfinite(out[1]).all()


def test_chunked_reads_a_cache_with_empty_slots():
    """Decoding-like keys: a longer key axis than queries, empty slots (k_idx -1) and later queries."""
    q, k, v = qkv()
    q = q[:, :5]
    q_idx = jnp.broadcast_to(jnp.arange(20, 25), (B, 5))
    k_idx = jnp.where(jnp.arange(T) < 25, jnp.arange(T), -1)[None].repeat(B, 0)
    mask = ops.attention_mask(q_idx, k_idx, 9)
    ref, _, _ = ops.attention_core(q, k, v, mask, scale=SCALE)
    out, _ = ops.chunked_attention(q, k, v, q_idx, k_idx, 9, scale=SCALE, chunk=4)
    np.testing.assert_allclose(out, ref, atol=2e-6)


def _largest_intermediate(fn, *args) -> int:
    """The largest array in fn's jaxpr (its equations' outputs), in elements."""
    sizes = [int(np.prod(var.aval.shape)) for eqn in jax.make_jaxpr(fn)(*args).jaxpr.eqns for var in eqn.outvars
             if hasattr(var.aval, "shape")]
    return max(sizes)


def test_local_and_chunked_never_hold_t_by_t_logits():
    t, window = 512, 32
    idx = jnp.broadcast_to(jnp.arange(t), (1, t))
    q, k, v = (x[:1, :1].repeat(t, 1) for x in qkv())
    logits_tt = 1 * K * (N // K) * t * t
    dense_fn = lambda q, k, v: ops.attention_core(q, k, v, ops.attention_mask(idx, idx, window), scale=SCALE)[0]  # noqa: E731
    assert _largest_intermediate(dense_fn, q, k, v) >= logits_tt
    local_fn = lambda q, k, v: ops.local_attention(q, k, v, idx, window, scale=SCALE)[0]  # noqa: E731
    assert _largest_intermediate(local_fn, q, k, v) <= N * t * 2 * window
    chunk_fn = lambda q, k, v: ops.chunked_attention(q, k, v, idx, idx, scale=SCALE, chunk=64)[0]  # noqa: E731
    assert _largest_intermediate(jax.grad(lambda *x: jnp.sum(chunk_fn(*x))), q, k, v) <= N * t * 64


def test_accounting_charges_what_each_way_computes():
    local = ModelConfig(sliding_window=256, layer_pattern=("local",), max_seq_len=8192)
    assert accounting.computed_keys(local, 4096, 0) == 512  # 2 x window, not T
    assert accounting.computed_keys(local, 256, 0) == 256  # T <= 2 window: the dense T x T product
    glob = ModelConfig(max_seq_len=8192)
    assert accounting.computed_keys(glob, 4096, 0) == 4096
    chunked = glob.replace(attention_impl="chunked", attention_chunk=512)
    assert accounting.computed_keys(chunked, 4096, 0) == 36 * 512 * 512 / 4096  # 8 x 9 / 2 chunk pairs
    per_token = [accounting.flops_per_token(local, t)["computed_attention"] for t in (256, 4096)]
    assert per_token[1] == 2 * per_token[0]


@pytest.mark.parametrize("changes, words", [
    ({"attention_impl": "flash"}, "one of 'dense', 'chunked', 'cudnn'"),
    ({"attention_impl": "cudnn", "attn_logit_softcap": 50.0}, "cannot express a soft-cap"),
    ({"attention_impl": "cudnn", "attn_dropout": 0.1}, "cannot express dropout"),
    ({"attention_impl": "cudnn", "position": "relative"}, "learned bias"),
    ({"attention_impl": "chunked", "attn_dropout": 0.1}, "never holds the probabilities"),
    ({"attention_chunk": 0}, "attention_chunk=0 is invalid"),
])
def test_the_config_refuses_what_an_implementation_cannot_do(changes, words):
    with pytest.raises(ValueError, match=words):
        ModelConfig(**changes)


# ------------------------------------------------------------------------------- the cudnn path in the model
SMALL = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                    init_std=0.25, layer_pattern=("local", "global"), sliding_window=3)
TOKENS = jax.random.randint(jax.random.key(1), (2, 12), 0, 50)
SEGMENTS = jnp.array([[0] * 5 + [1] * 7, [0] * 7 + [1] * 5])


def _init(cfg):
    from lecture3 import Transformer
    return nn.unbox(Transformer(cfg).init(jax.random.key(0), TOKENS)["params"])


@pytest.mark.parametrize("document_mask, position", [(False, "rope"), (True, "alibi")])
def test_cudnn_path_hands_jax_is_causal_and_the_window(monkeypatch, document_mask, position):
    """In training the fused call gets `is_causal` and `local_window_size` (what cuDNN computes without a
    T x S mask), a mask only for the documents, and still gives the dense logits."""
    from lecture3 import Transformer
    calls, real = [], jax.nn.dot_product_attention

    def spy(*args, **kw):
        calls.append(kw)
        return real(*args, **kw)

    dense = SMALL.replace(document_mask=document_mask, position=position)
    cfg = dense.replace(attention_impl="cudnn")
    params = _init(dense)
    kw = {"segment_ids": SEGMENTS} if document_mask else {}
    ref = Transformer(dense).apply({"params": params}, TOKENS, **kw).logits
    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    out = Transformer(cfg).apply({"params": params}, TOKENS, **kw).logits
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert [c.get("is_causal") for c in calls] == [True, True]
    assert [c.get("local_window_size") for c in calls] == [(2, 0), None]  # local layer: q - k < 3
    assert all((c.get("mask") is not None) == document_mask for c in calls)


def test_train_step_reads_the_max_logit_from_cudnn_only_when_asked():
    """The fused kernel never forms the logits: the step's forward leaves the max logit out (rebuilding the
    T x S product is what the kernel avoids) unless a loss term or the per-layer log asks for it; the other
    ways get it free from their softmax and log it."""
    from lecture3 import Transformer, losses, steps
    batch = {"inputs": TOKENS, "targets": TOKENS}
    params = _init(SMALL)
    for impl, logged in (("dense", True), ("chunked", True), ("cudnn", False)):
        cfg = SMALL.replace(attention_impl=impl, attention_chunk=4)
        _, (metrics, captured) = steps.forward_metrics(Transformer(cfg), params, batch, losses.cross_entropy())
        assert ("max_attn_logit" in metrics) == logged == ("attn_logit_max" in captured), impl
    cudnn = Transformer(SMALL.replace(attention_impl="cudnn"))
    _, (metrics, _) = steps.forward_metrics(cudnn, params, batch, losses.parse("cross_entropy+max_attn_logit"))
    assert "max_attn_logit" in metrics  # a term that needs it asks for it
    _, (metrics, _) = steps.forward_metrics(cudnn, params, batch, losses.cross_entropy(), logit_max=True)
    assert "max_attn_logit" in metrics
    from lecture3.config import TrainConfig
    from lecture3.optim import make_optimizer
    tc = TrainConfig(batch_size=2, log_per_layer=True)  # the per-layer log asks for it too
    state = steps.TrainState(jnp.int32(0), params, make_optimizer(tc).init(params), jax.random.key_data(
        jax.random.key(0)))
    shapes = jax.eval_shape(steps.make_train_step(cudnn.cfg, tc), state, batch)[1]
    assert {"max_attn_logit", "max_attn_logit_layer"} <= set(shapes)


def test_cudnn_forward_without_capture_computes_no_max_logit():
    """Without the capture the fused path has the kernel's two products only, not a third q.k for the max."""
    q, k, v = qkv()
    mask = ops.attention_mask(IDX, IDX)
    count = lambda fn: sum(e.primitive.name == "dot_general" for e in jax.make_jaxpr(fn)(q, k, v).jaxpr.eqns)  # noqa: E731
    with_max = count(lambda q, k, v: ops.fused_attention(q, k, v, mask, scale=SCALE, with_max=True))
    without = count(lambda q, k, v: ops.fused_attention(q, k, v, mask, scale=SCALE, with_max=False))
    assert without < with_max


def test_cudnn_with_float32_compute_is_refused_before_jit_on_a_gpu(monkeypatch):
    """cuDNN's fused attention takes float16 / bfloat16 only: on a GPU a float32 model says so as a
    ConfigError before anything is compiled; elsewhere the XLA path computes float32."""
    from lecture3 import Transformer
    from lecture3.config import ConfigError
    cfg = SMALL.replace(attention_impl="cudnn")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.raises(ConfigError, match="attention_impl='cudnn'.*dtype='float32'.*dtype='bfloat16'"):
        Transformer(cfg).init(jax.random.key(0), TOKENS)
    assert ops.fused_implementation("bfloat16", "gpu") == "cudnn"
    assert ops.fused_implementation("float32", "cpu") == "xla"
