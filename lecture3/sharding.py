"""The device mesh (data, fsdp, tensor) and the one table of logical-axis rules that shards everything.

Params carry logical axis names (`embed`, `heads`, `mlp`, `vocab`, ...; see lecture3/layers). The rules
map them to mesh axes. A dimension a mesh axis does not divide (4 heads on tensor=8, a vocabulary of 259)
is replicated on that axis, with one logged line, instead of an XLA error.
"""

from __future__ import annotations

import logging
import math

import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lecture3.config import MeshConfig, ModelConfig
from lecture3.errors import Lecture3Error

log = logging.getLogger("lecture3")

AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes, before divisibility is checked for a given model and mesh
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", ("fsdp",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("vocab", ("tensor",)),
    ("head_dim", ()),
    ("length", ()),
    ("layers", ()),
    ("norm", ()),
    ("relpos", ()),
)


class MeshError(Lecture3Error):
    """The mesh sizes do not fit the devices or the batch."""


def mesh_shape(cfg: MeshConfig, n_devices: int) -> dict[str, int]:
    sizes = {"data": cfg.data, "fsdp": cfg.fsdp, "tensor": cfg.tensor}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if -1 in sizes.values():
        if n_devices % fixed:
            raise MeshError(f"mesh {sizes} cannot use {n_devices} devices: the fixed axes' product {fixed} "
                            f"must divide the device count; change --mesh.fsdp / --mesh.tensor")
        sizes = {k: (n_devices // fixed if v == -1 else v) for k, v in sizes.items()}
    if math.prod(sizes.values()) != n_devices:
        raise MeshError(f"mesh data*fsdp*tensor = {math.prod(sizes.values())} {sizes} does not match the "
                        f"{n_devices} devices; set one axis to -1 (e.g. --mesh.data -1) or make the product "
                        f"{n_devices}")
    return sizes


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    sizes = mesh_shape(cfg, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    # Auto axes: shardings come from the rules and `with_sharding_constraint`, not from types
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def logical_sizes(cfg: ModelConfig, batch_size: int) -> dict[str, int]:
    return {
        "batch": batch_size, "embed": cfg.d_model, "heads": cfg.n_heads, "kv_heads": cfg.resolved_n_kv_heads,
        "mlp": cfg.resolved_d_ff, "vocab": cfg.vocab_size, "head_dim": cfg.resolved_head_dim,
    }


def axis_rules(cfg: ModelConfig, mesh: Mesh, batch_size: int) -> tuple[tuple[str, tuple[str, ...] | None], ...]:
    """RULES, with each mesh axis dropped where it does not divide the model's dimension."""
    sizes = logical_sizes(cfg, batch_size)
    rules = []
    for name, axes in RULES:
        kept = []
        for axis in axes:
            n = mesh.shape[axis]
            if n == 1:
                continue
            dim = sizes.get(name)
            if dim is not None and dim % (n * math.prod(mesh.shape[a] for a in kept)):
                log.warning("sharding: %s=%d is not divisible by mesh axis %s=%d; replicated on %s",
                         name, dim, axis, n, axis)
                continue
            kept.append(axis)
        rules.append((name, tuple(kept) if kept else None))
    return tuple(rules)


def check_batch(mesh: Mesh, batch_size: int) -> None:
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % n:
        raise MeshError(f"train.batch_size={batch_size} is not divisible by mesh data*fsdp={n}; "
                        f"use a multiple of {n}")


def spec_from_logical(axes: tuple[str | None, ...], rules) -> P:
    table = dict(rules)
    used, spec = set(), []
    for name in axes:
        mesh_axes = table.get(name) if name is not None else None
        mesh_axes = tuple(a for a in (mesh_axes or ()) if a not in used)  # a mesh axis at most once
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return P(*spec)


def tree_shardings(boxed_tree, mesh: Mesh, rules):
    """NamedShardings for a tree of flax LogicallyPartitioned boxes (or plain leaves: replicated)."""
    import flax.linen as nn

    def one(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            return NamedSharding(mesh, spec_from_logical(leaf.names, rules))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    return NamedSharding(mesh, spec_from_logical(("batch", "length"), rules))
