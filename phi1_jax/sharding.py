"""Device mesh from the config, and logical-axis rules to `NamedSharding`s.

Mesh axes: `data` (pure data parallelism), `fsdp` (data parallelism with parameters and optimizer state sharded,
ZeRO-3 style), `tensor` (Megatron-style: heads and MLP columns split). Sizes come from `config.mesh.{data,fsdp,tensor}`;
-1 takes all remaining devices.

`config.sharding_rules` maps the model's logical parameter axes (`vocab`, `embed`, `heads`, `head_dim`, `mlp`) and the
batch axis (`batch`) to mesh axes, e.g. `embed -> fsdp`, `heads -> tensor`. A dimension that a mesh axis does not divide
is an error that names the parameter.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from phi1_jax.errors import UserError

AXES = ("data", "fsdp", "tensor")


class ShardingError(UserError, ValueError):
    """A mesh or rule that does not fit the devices, the batch or a parameter; the message names it."""


def mesh_shape(mesh_config, n_devices: int) -> tuple[int, int, int]:
    sizes = [int(mesh_config[a]) for a in AXES]
    for a, s in zip(AXES, sizes):
        if s == 0 or s < -1:
            raise ShardingError(f"config.mesh.{a}={s}: sizes are positive, or -1 for all remaining devices")
    if sizes.count(-1) > 1:
        raise ShardingError(f"config.mesh {dict(zip(AXES, sizes))}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if n_devices % known:
        raise ShardingError(f"config.mesh {dict(zip(AXES, sizes))} does not divide the {n_devices} devices")
    sizes = [n_devices // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != n_devices:
        raise ShardingError(f"config.mesh {dict(zip(AXES, sizes))} uses {math.prod(sizes)} devices, "
                            f"but {n_devices} are present")
    return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_config, len(devices))
    try:
        grid = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # some platforms (CPU) have no topology to optimise for
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, AXES)


def rules_dict(rules) -> dict:
    """`config.sharding_rules` ((logical, mesh axis or None or tuple), ...) as a dict, checked."""
    out = {}
    for logical, mesh_axes in rules:
        targets = () if mesh_axes is None else (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        for t in targets:
            if t not in AXES:
                raise ShardingError(f"config.sharding_rules: {logical!r} -> {t!r} is not a mesh axis {AXES}")
        out[logical] = targets
    return out


def spec_for(logical_axes, shape, rules: dict, mesh: Mesh, where: str) -> P:
    """PartitionSpec of one array from its logical axis names; each mesh axis is used at most once."""
    used, spec = set(), []
    for name, dim in zip(logical_axes, shape):
        targets = tuple(t for t in rules.get(name, ()) if t not in used and mesh.shape[t] > 1)
        size = math.prod(mesh.shape[t] for t in targets)
        if dim % size:
            raise ShardingError(f"{where}: dimension {name}={dim} is not divisible by mesh axes {targets} "
                                f"(size {size}); change config.mesh or config.sharding_rules")
        used.update(targets)
        spec.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return P(*spec)


def param_shardings(logical: dict, abstract_params, rules: dict, mesh: Mesh):
    """NamedShardings for a pure-dict parameter tree, from {path tuple: logical axes}."""

    def one(path, x):
        key = tuple(p.key if hasattr(p, "key") else p.idx for p in path)
        return NamedSharding(mesh, spec_for(logical[key], x.shape, rules, mesh, "/".join(map(str, key))))

    return jax.tree_util.tree_map_with_path(one, abstract_params)


def batch_sharding(rules: dict, mesh: Mesh, ndim: int = 2) -> NamedSharding:
    targets = tuple(t for t in rules.get("batch", ()) if mesh.shape[t] > 1)
    lead = None if not targets else targets[0] if len(targets) == 1 else targets
    return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))
