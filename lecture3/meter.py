"""The logged training loss as the mean over the steps since the last log, for every training loop.

The step returns its loss and the loss's terms (cross-entropy, z-loss, ...) for that one batch: one batch
every `log_every` steps is a noisy curve (the quick start's jumped between 1.6 and 3.35). `LossMeter` adds
the loss and its terms up on the device as the steps run (no host sync) and a log record gets their mean.
The step's other metrics describe the state at one step (gradient norm, learning rate, the largest
attention logit, ...) and are logged as the last step's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# the step's metrics that describe one step rather than the loss: logged as the last step's values
STEP_SIGNALS = frozenset({"grad_norm", "update_ratio", "lr", "finite", "log_z_abs", "max_attn_logit"})


def is_loss_term(key: str) -> bool:
    """The loss and its terms (averaged since the last log); not a step signal or a per-layer array."""
    return key not in STEP_SIGNALS and not key.endswith("_layer")


class LossMeter:
    """Sums of the loss terms since the last `take` (arrays; a population's metrics have a member axis)."""

    def __init__(self):
        self.sums, self.count = None, 0

    def add(self, metrics: dict) -> None:
        terms = {k: v for k, v in metrics.items() if is_loss_term(k)}
        self.sums = terms if self.sums is None else jax.tree.map(jnp.add, self.sums, terms)
        self.count += 1

    def take(self, metrics: dict) -> dict:
        """`metrics` (this step's, on the host) with each loss term replaced by its mean since the last
        take; starts the next interval."""
        out = dict(metrics)
        if self.count:
            out.update({k: v / self.count for k, v in jax.device_get(self.sums).items()})
        self.sums, self.count = None, 0
        return out
