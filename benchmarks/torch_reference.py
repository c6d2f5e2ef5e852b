"""The PyTorch side of benchmarks/train_step_vs_torch.py: the same model in eager PyTorch (or transformers'
LlamaForCausalLM for the small Llama), its AdamW trainer, and the check that both sides are the same model.

The lecture3 init params travel to PyTorch through a file (`save_params` writes it, `load_params` or
transformers' `from_pretrained` reads it).
"""

from __future__ import annotations

import numpy as np
from step_variants import VARIANTS, bench_config, jax_setup, make_batch


def torch_model(params: dict[str, np.ndarray], m, sdpa: bool):
    """The lecture3 default Transformer in eager PyTorch, holding a copy of the given lecture3 params."""
    import torch
    import torch.nn.functional as F

    n, h, d, eps = m.n_heads, m.resolved_head_dim, m.d_model, m.norm_eps
    inv_freq = torch.tensor(1.0 / m.rope_theta ** (np.arange(0, h, 2) / h), dtype=torch.float32)

    def linear(w_in_out: np.ndarray) -> torch.nn.Linear:  # lecture3 stores [in, out]; nn.Linear [out, in]
        lin = torch.nn.Linear(*w_in_out.shape, bias=False)
        lin.weight.data.copy_(torch.from_numpy(np.ascontiguousarray(w_in_out.T)))
        return lin

    def gain(w: np.ndarray) -> torch.nn.Parameter:
        return torch.nn.Parameter(torch.from_numpy(w.copy()))

    def rms(x, scale):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * scale

    def rope(x, cos, sin):  # x [B, N, T, H], rotate-half layout
        x1, x2 = x[..., : h // 2], x[..., h // 2:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    class Layer(torch.nn.Module):
        def __init__(self, p):
            super().__init__()
            a = p["attn"]
            self.attn_norm, self.mlp_norm = gain(p["attn_norm"]["scale"]), gain(p["mlp_norm"]["scale"])
            self.q, self.k, self.v = (linear(a[w].reshape(d, n * h)) for w in ("q", "k", "v"))
            self.o = linear(a["o"].reshape(n * h, d))
            self.up, self.gate, self.down = (linear(p["mlp"][w]) for w in ("up", "gate", "down"))

        def forward(self, x, cos, sin, mask):
            b, t, _ = x.shape
            y = rms(x, self.attn_norm)
            q, k, v = (proj(y).view(b, t, n, h).transpose(1, 2) for proj in (self.q, self.k, self.v))
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            if sdpa:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                logits = (q @ k.transpose(-1, -2)) * h ** -0.5  # [B, N, T, S]
                o = torch.softmax(logits.masked_fill(~mask, -1e30), dim=-1) @ v
            x = x + self.o(o.transpose(1, 2).reshape(b, t, n * h))
            y = rms(x, self.mlp_norm)
            return x + self.down(F.silu(self.gate(y)) * self.up(y))

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = gain(params["embed"])
            self.layers = torch.nn.ModuleList(Layer(params[f"layer_{i}"]) for i in range(m.n_layers))
            self.final_norm = gain(params["final_norm"]["scale"])

        def forward(self, tokens):
            t = tokens.shape[1]
            angles = torch.arange(t, dtype=torch.float32)[:, None] * inv_freq  # [T, H/2]
            cos, sin = angles.cos(), angles.sin()
            mask = torch.ones(t, t, dtype=torch.bool).tril()
            x = self.embed[tokens]
            for layer in self.layers:
                x = layer(x, cos, sin, mask)
            return rms(x, self.final_norm) @ self.embed.T  # tied head

    return Model()


def hf_llama(hf_dir: str, sdpa: bool):
    """(module, forward(tokens) -> logits): transformers' LlamaForCausalLM on the weights lecture3 wrote."""
    import torch
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(
        hf_dir, attn_implementation="sdpa" if sdpa else "eager", dtype=torch.float32)
    model.train()  # dropout is 0 in the config: train mode changes nothing but is what training uses
    return model, lambda tokens: model(input_ids=tokens, use_cache=False).logits


def torch_trainer(params_file: str, sdpa: bool = False, model_name: str = "default"):
    """(forward(tokens) -> logits, step(tokens, targets) -> loss): AdamW + clipping, lecture3's
    hyperparameters and decay mask. `params_file`: what `save_params` wrote for `model_name`."""
    import torch

    from lecture3.optim import schedule

    cfg = bench_config(model_name)
    m, tc = cfg.model, cfg.train
    if model_name == "llama":
        model, forward = hf_llama(params_file, sdpa)
        # lecture3's mask: matrices decay; norm gains, the embedding and the untied head only with
        # decay_embeddings
        embedding = lambda name: "embed_tokens" in name or "lm_head" in name  # noqa: E731
        decays = lambda name, p: p.ndim >= 2 and (tc.decay_embeddings or not embedding(name))  # noqa: E731
    else:
        model = forward = torch_model(load_params(params_file), m, sdpa)
        decays = lambda name, p: name.endswith(".weight")  # noqa: E731  the matrices; not gains, embed
    named = list(model.named_parameters())
    decay = [p for name, p in named if decays(name, p)]
    no_decay = [p for name, p in named if not decays(name, p)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps)
    lr_at = schedule(tc)
    lrs = [float(lr_at(s)) for s in range(64)]
    count = [0]

    def step(tokens, targets):
        for g in opt.param_groups:
            g["lr"] = lrs[min(count[0], len(lrs) - 1)]
        logits = forward(tokens)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        count[0] += 1
        return loss

    return forward, step


def save_params(path: str, model: str = "default") -> tuple[float, list[float]]:
    """Init the lecture3 state of the comparison, save its params (an .npz; for llama, the folder that
    lecture3.hf.save_pretrained writes); return its loss at init and over 3 steps."""
    import jax

    from lecture3 import losses
    from lecture3.model import Transformer

    step, state, batch, (m, *_rest) = jax_setup(VARIANTS["jax"], model)
    params = jax.tree.map(np.asarray, state.params)
    if model == "llama":
        from lecture3.hf import save_pretrained

        save_pretrained(m, params, path, family="llama")
    else:
        flat = {"/".join(getattr(k, "key", str(k)) for k in path_): leaf
                for path_, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
        np.savez(path, **flat)
    logits = jax.jit(lambda p, x: Transformer(m).apply({"params": p}, x, capture=()).logits)(
        state.params, batch["inputs"])
    init_loss = float(losses.cross_entropy()(logits, batch)[0])
    trained = []
    for _ in range(3):
        state, metrics = step(state, batch)
        trained.append(float(metrics["loss"]))
    return init_loss, trained


def load_params(path: str) -> dict:
    tree: dict = {}
    with np.load(path) as z:
        for key in z.files:
            node = tree
            *parents, last = key.split("/")
            for p in parents:
                node = node.setdefault(p, {})
            node[last] = z[key]
    return tree


def torch_batch(model_name: str):
    """(tokens, targets) of the comparison's batch as torch int64 tensors (the JAX side's batch)."""
    import torch

    cfg = bench_config(model_name)
    b = make_batch(cfg.model.vocab_size, cfg.train.batch_size, cfg.data.seq_len)
    return torch.from_numpy(b["inputs"]).long(), torch.from_numpy(b["targets"]).long()


def check_same_model(params_file: str, jax_init: float, jax_losses: list[float], threads: int,
                     model_name: str = "default") -> None:
    import torch

    torch.set_num_threads(threads)
    forward, step = torch_trainer(params_file, model_name=model_name)
    tokens, targets = torch_batch(model_name)
    with torch.no_grad():
        logits = forward(tokens)
        init = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()
    losses = [step(tokens, targets).item() for _ in range(3)]
    print("same model check (identical weights, same batch): loss")
    print(f"  at init         jax {jax_init:.6f}   torch {init:.6f}   |diff| {abs(jax_init - init):.2e}")
    for i, (a, t) in enumerate(zip(jax_losses, losses, strict=True)):
        print(f"  train step {i + 1}    jax {a:.6f}   torch {t:.6f}   |diff| {abs(a - t):.2e}")
    worst = max(abs(jax_init - init), *(abs(a - t) for a, t in zip(jax_losses, losses, strict=True)))
    print(f"  {'OK' if worst < 1e-3 else 'MISMATCH'}: largest |diff| {worst:.2e} (tolerance 1e-3)\n")


