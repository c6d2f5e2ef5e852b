"""One transformer layer: norm position (pre / post / sandwich / post_branch) x serial / parallel.

  pre          x = x + f(norm(x))                 GPT-2, Llama: the residual stream is never normalised
  post         x = norm(x + f(x))                 Vaswani 2017: the stream itself is normalised
  sandwich     x = x + norm'(f(norm(x)))          Gemma 2, Grok: pre-norm plus a norm on the branch output
  post_branch  x = x + norm(f(x))                 OLMo 2 / Swin v2: only the branch output is normalised
  parallel     x = x + attn(norm(x)) + mlp(norm(x))   GPT-J, GPT-NeoX ("separate" norms), PaLM
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lecture3.config import ModelConfig
from lecture3.layers.attention import Attention
from lecture3.layers.common import Inputs, constrain, dropout
from lecture3.layers.mlp import MLP
from lecture3.layers.norms import Norm


def rms(x: jax.Array) -> jax.Array:
    """float32[B, T]: root mean square over the model dim."""
    return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1))


class Block(nn.Module):
    """One layer. Returns (x, new cache, captured): the `capture` names of `lecture3.capture` for this layer."""

    cfg: ModelConfig
    window: int | None = None
    deterministic: bool = True  # an attribute, not an argument, so nn.remat / nn.scan see a Python bool
    capture: tuple[str, ...] = ()

    @nn.compact
    def __call__(self, x: jax.Array, inputs: Inputs, cache: dict | None = None) -> tuple[jax.Array, dict | None, dict]:
        cfg, deterministic = self.cfg, self.deterministic
        attn = Attention(cfg, self.window, capture=self.capture, name="attn")
        mlp = MLP(cfg, name="mlp")
        branches = {}  # what each branch adds to the residual stream (after a branch norm, before dropout)

        def drop(y, branch):
            branches[branch] = y
            return dropout(self, y, cfg.resid_dropout, deterministic)

        def run_attn(h):
            return attn(h, inputs, cache, deterministic)

        if cfg.block == "parallel":
            h = Norm(cfg, name="attn_norm")(x)
            h_mlp = h if cfg.parallel_norm == "shared" else Norm(cfg, name="mlp_norm")(x)
            a, cache, captured = run_attn(h)
            x = x + drop(a, "attn") + drop(mlp(h_mlp), "mlp")
        elif cfg.norm_position == "pre":
            a, cache, captured = run_attn(Norm(cfg, name="attn_norm")(x))
            x = x + drop(a, "attn")
            x = x + drop(mlp(Norm(cfg, name="mlp_norm")(x)), "mlp")
        elif cfg.norm_position == "post":
            a, cache, captured = run_attn(x)
            x = Norm(cfg, name="attn_norm")(x + drop(a, "attn"))
            x = Norm(cfg, name="mlp_norm")(x + drop(mlp(x), "mlp"))
        elif cfg.norm_position == "sandwich":
            a, cache, captured = run_attn(Norm(cfg, name="attn_norm")(x))
            x = x + drop(Norm(cfg, name="attn_post_norm")(a), "attn")
            x = x + drop(Norm(cfg, name="mlp_post_norm")(mlp(Norm(cfg, name="mlp_norm")(x))), "mlp")
        else:  # post_branch
            a, cache, captured = run_attn(x)
            x = x + drop(Norm(cfg, name="attn_norm")(a), "attn")
            x = x + drop(Norm(cfg, name="mlp_norm")(mlp(x)), "mlp")
        x = constrain(x, ("batch", "length", "embed"))
        if "attn_out_rms" in self.capture:
            captured["attn_out_rms"] = rms(branches["attn"])
        if "mlp_out_rms" in self.capture:
            captured["mlp_out_rms"] = rms(branches["mlp"])
        if "resid_rms" in self.capture:
            captured["resid_rms"] = rms(x)
        if "hidden_states" in self.capture:
            captured["hidden_states"] = x
        return x, cache, captured
