"""The intermediates a forward pass can capture: their names, shapes and meaning, in one place.

Every per-layer capture is stacked over layers in layer order (leading axis L), whether or not the
layers are scanned. Letters: L layers, B batch, T queries, S keys, N query heads, K kv heads, D model dim.
"""

from __future__ import annotations

CAPTURES: dict[str, str] = {
    "attn_probs": "float32[L, B, N, T, S]: attention probabilities after masking (rows sum to 1 over keys)",
    "attn_logit_max": "float32[L, N]: each head's largest attention logit over batch, queries and allowed keys, "
                      "after the query scale and before any soft-cap or position bias",
    "attn_entropy": "float32[L, B, N, T]: entropy (nats) of each query's attention distribution",
    "q_norm": "float32[L, B, T, N]: L2 norm of each query vector, as it enters the dot product",
    "k_norm": "float32[L, B, T, K]: L2 norm of each key vector, as it enters the dot product",
    "attn_out_rms": "float32[L, B, T]: RMS over D of the attention branch's output (before the residual add)",
    "mlp_out_rms": "float32[L, B, T]: RMS over D of the MLP branch's output (before the residual add)",
    "resid_rms": "float32[L, B, T]: RMS over D of the residual stream after each block",
    "hidden_states": "float[L, B, T, D]: the residual stream after each block (compute dtype)",
    "log_z": "float32[B, T]: log of the softmax normaliser of the final logits (not per layer)",
}

PER_LAYER = tuple(name for name in CAPTURES if name != "log_z")


def check(names) -> tuple[str, ...]:
    """The names, validated and without repeats, in the order given."""
    from lecture3.errors import Lecture3Error

    names = tuple(dict.fromkeys(names))
    unknown = [n for n in names if n not in CAPTURES]
    if unknown:
        raise Lecture3Error(f"unknown capture name(s) {unknown}: expected any of {sorted(CAPTURES)}")
    return names
