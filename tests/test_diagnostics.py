"""Per-layer signals: one norm per layer, in layer order, the same for scanned and unscanned stacks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lecture3 import Transformer, diagnostics
from lecture3.config import ModelConfig
from lecture3.model import stack_layers, unstack_layers


@pytest.mark.slow
def test_layer_norms_are_per_layer_in_order_scanned_or_not():
    cfg = ModelConfig(d_model=32, n_layers=4, n_heads=4, layer_pattern=("local", "global"), sliding_window=4,
                      max_seq_len=16)
    params = nn.unbox(Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
    # make layer i's weights scale with i + 1, so the norms must come out in layer order
    layers = [jax.tree.map(lambda a, s=i + 1: a * s, layer) for i, layer in enumerate(unstack_layers(cfg, params))]
    params = {**{k: v for k, v in params.items() if not k.startswith("layer")}, **stack_layers(cfg, layers)}
    norms = np.asarray(diagnostics.layer_norms(cfg, params))
    expected = [float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(layer)))) for layer in layers]
    np.testing.assert_allclose(norms, expected, rtol=1e-5)

    scanned = cfg.replace(scan_layers=True)
    sparams = {**{k: v for k, v in params.items() if not k.startswith("layer")}, **stack_layers(scanned, layers)}
    np.testing.assert_allclose(diagnostics.layer_norms(scanned, sparams), norms, rtol=1e-5)
    assert np.all(np.diff(norms[::2]) > 0)  # layers 0, 2 have the same shapes: the scale shows


@pytest.mark.slow
def test_per_layer_metrics_and_flattening():
    cfg = ModelConfig(d_model=16, n_layers=2, n_heads=2, max_seq_len=8)
    params = nn.unbox(Transformer(cfg).init(jax.random.PRNGKey(1), jnp.zeros((1, 4), jnp.int32))["params"])
    updates = jax.tree.map(lambda a: 0.01 * a, params)
    m = diagnostics.per_layer_metrics(cfg, params, updates, params, jnp.asarray([[1.0, 3.0], [2.0, 0.5]]))
    np.testing.assert_allclose(m["update_ratio_layer"], [0.01, 0.01], rtol=1e-5)
    np.testing.assert_allclose(m["max_attn_logit_layer"], [3.0, 2.0])
    flat = diagnostics.flatten_layers({"loss": 1.0, **m})
    assert flat["max_attn_logit/1"] == 2.0 and flat["loss"] == 1.0 and "grad_norm/0" in flat
