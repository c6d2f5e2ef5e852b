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

from lecture3.config import ModelConfig
from lecture3.layers.attention import Attention
from lecture3.layers.common import constrain, dropout
from lecture3.layers.mlp import MLP
from lecture3.layers.norms import Norm


class Block(nn.Module):
    cfg: ModelConfig
    window: int | None = None
    deterministic: bool = True  # an attribute, not an argument, so nn.remat / nn.scan see a Python bool

    @nn.compact
    def __call__(self, x: jax.Array, q_idx: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
                 rel_table: jax.Array | None = None, cache: dict | None = None) -> tuple[jax.Array, dict | None]:
        cfg, deterministic = self.cfg, self.deterministic
        attn = Attention(cfg, self.window, name="attn")
        mlp = MLP(cfg, name="mlp")

        def drop(y):
            return dropout(self, y, cfg.resid_dropout, deterministic)

        def run_attn(h):
            return attn(h, q_idx, positions, segment_ids, rel_table, cache, deterministic)

        if cfg.block == "parallel":
            h = Norm(cfg, name="attn_norm")(x)
            h_mlp = h if cfg.parallel_norm == "shared" else Norm(cfg, name="mlp_norm")(x)
            a, cache = run_attn(h)
            x = x + drop(a) + drop(mlp(h_mlp))
        elif cfg.norm_position == "pre":
            a, cache = run_attn(Norm(cfg, name="attn_norm")(x))
            x = x + drop(a)
            x = x + drop(mlp(Norm(cfg, name="mlp_norm")(x)))
        elif cfg.norm_position == "post":
            a, cache = run_attn(x)
            x = Norm(cfg, name="attn_norm")(x + drop(a))
            x = Norm(cfg, name="mlp_norm")(x + drop(mlp(x)))
        elif cfg.norm_position == "sandwich":
            a, cache = run_attn(Norm(cfg, name="attn_norm")(x))
            x = x + drop(Norm(cfg, name="attn_post_norm")(a))
            x = x + drop(Norm(cfg, name="mlp_post_norm")(mlp(Norm(cfg, name="mlp_norm")(x))))
        else:  # post_branch
            a, cache = run_attn(x)
            x = x + drop(Norm(cfg, name="attn_norm")(a))
            x = x + drop(Norm(cfg, name="mlp_norm")(mlp(x)))
        return constrain(x, ("batch", "length", "embed")), cache
