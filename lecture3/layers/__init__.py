"""The pieces of a transformer block: each option's maths is a small pure function here.

Axis letters, used in shape comments and einsum strings everywhere in lecture3:
B batch, T query length, S key length, D model dim, N query heads, K kv heads, G query heads per kv head,
H head dim, F feed-forward dim, V vocab, L layers.
"""
