"""The measurements without a training run (`lecture3.experiment.measures`)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import tiny_config

from lecture3 import losses, sharding, steps
from lecture3.experiment import measures
from lecture3.model import Transformer, stack_layers, unstack_layers


@pytest.mark.slow  # an init and two compiled gradients
def test_init_grad_norms_reads_a_scanned_stack_in_layer_order(tmp_path):
    """With scan_layers the per-layer norms are those of the same params unscanned, layer by layer (a
    two-slot pattern: layer = group * 2 + slot)."""
    cfg = tiny_config(tmp_path).replace(**{"model.n_layers": 4, "model.scan_layers": True,
                                           "model.layer_pattern": ("local", "global"), "model.sliding_window": 8})
    got = measures.init_grad_norms(cfg, n_batches=2)
    mesh = sharding.make_mesh(cfg.mesh)
    state = steps.init_state(cfg.model, cfg.train, mesh, sharding.axis_rules(cfg.model, mesh, cfg.train.batch_size))
    scanned = nn.unbox(jax.device_get(state.params))
    flat_cfg = cfg.model.replace(scan_layers=False)
    flat = {k: v for k, v in scanned.items() if k != "layers"}
    flat |= stack_layers(flat_cfg, unstack_layers(cfg.model, scanned))
    model, ce = Transformer(flat_cfg), losses.cross_entropy()
    for batch, norms in zip(measures._batches(cfg, 2), got["per_batch"], strict=True):
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        g = jax.grad(lambda p, b=batch: ce(model.apply({"params": p}, b["inputs"]).logits, b)[0])(flat)
        want = [float(jnp.linalg.norm(g[f"layer_{i}"]["mlp"]["up"])) for i in range(4)]
        np.testing.assert_allclose(norms, want, rtol=1e-5)
    assert len(set(got["per_layer"])) == 4 and all(x > 0 for x in got["per_layer"])
