"""Device mesh and logical-axis sharding rules.

A config names mesh axes and sizes, e.g. ``(("data", -1), ("fsdp", 1), ("tensor", 1))``; -1 takes
the remaining devices. Parameters and activations are annotated with *logical* axis names
("batch", "embed", "mlp", ...); the rules map them onto mesh axes (as MaxText and big_vision do),
so a model file never mentions the mesh.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Batch is split over every data-parallel axis; parameters are split
# over fsdp along their embed dimension and over tensor along mlp/heads dimensions.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("patch", None),
    ("seq", None),
    ("act_embed", None),
)


def make_mesh(axes: Sequence[tuple[str, int]], devices=None) -> jax.sharding.Mesh:
    """Builds a mesh from ``((name, size), ...)``; one size may be -1 (all remaining devices).

    Example: ``make_mesh((("data", -1), ("fsdp", 2), ("tensor", 1)))`` on 8 devices gives 4x2x1.
    """
    devices = list(jax.devices() if devices is None else devices)
    names = tuple(name for name, _ in axes)
    unknown = [n for n in names if n not in MESH_AXES]
    if unknown:
        raise ValueError(f"mesh: unknown axis {unknown[0]!r}; allowed axes are {MESH_AXES}")
    sizes = [int(size) for _, size in axes]
    if sizes.count(-1) > 1:
        raise ValueError("mesh: at most one axis may have size -1")
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % fixed:
            raise ValueError(f"mesh: fixed axis sizes {sizes} do not divide {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // fixed
    if -1 not in [int(size) for _, size in axes] and math.prod(sizes) < len(devices) \
            and jax.process_count() == 1:
        # An explicit smaller mesh on one host (e.g. a 1-device run) uses the first devices.
        log.info("mesh: using %d of %d devices", math.prod(sizes), len(devices))
        devices = devices[:math.prod(sizes)]
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh: sizes {dict(zip(names, sizes))} need {math.prod(sizes)} devices, "
                         f"{len(devices)} are available")
    device_array = np.asarray(devices).reshape(sizes)
    return jax.sharding.Mesh(device_array, names,
                             axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def data_parallel_size(mesh: jax.sharding.Mesh, rules=DEFAULT_RULES) -> int:
    """Number of ways the batch dimension is split (axes missing from the mesh count as 1)."""
    return _mesh_axes_size(mesh, _lookup(rules, "batch"))


def logical_to_spec(logical_axes: Sequence[str | None], rules=DEFAULT_RULES,
                    shape: Sequence[int] | None = None, mesh=None, what: str = "") -> P:
    """Maps logical axis names to a PartitionSpec.

    When ``shape`` and ``mesh`` are given, a dimension that the mesh axes do not divide is
    replicated instead (logged once), so odd sizes never crash a run.
    """
    spec = []
    used: set[str] = set()
    for dim, name in enumerate(logical_axes):
        mesh_axes = _lookup(rules, name) if name is not None else None
        if mesh_axes is not None:
            axes_tuple = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
            # A mesh axis may appear once per spec; later dims replicate.
            axes_tuple = tuple(a for a in axes_tuple if a not in used)
            if mesh is not None:
                axes_tuple = tuple(a for a in axes_tuple if a in mesh.shape)
            if shape is not None and mesh is not None and axes_tuple:
                size = _mesh_axes_size(mesh, axes_tuple)
                if shape[dim] % size:
                    log.info("sharding: %s dim %d (%s, size %d) not divisible by mesh axes %s "
                             "(size %d); replicating it", what, dim, name, shape[dim],
                             axes_tuple, size)
                    axes_tuple = ()
            used.update(axes_tuple)
            mesh_axes = (axes_tuple[0] if len(axes_tuple) == 1 else axes_tuple) or None
        spec.append(mesh_axes)
    return P(*spec)


def shard_activation(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Constrains an activation's sharding by logical names; a no-op without a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    from flax.core.spmd import get_logical_axis_rules  # local: keeps import cheap
    rules = get_logical_axis_rules() or DEFAULT_RULES
    spec = logical_to_spec(logical_axes, rules, x.shape, mesh, what="activation")
    return jax.lax.with_sharding_constraint(x, spec)


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
    """Sharding of a batch array: leading dim over the data-parallel axes, rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules,
                                               mesh=mesh))


def _lookup(rules, name):
    for logical, mesh_axes in rules:
        if logical == name:
            return mesh_axes
    return None


def _mesh_axes_size(mesh, mesh_axes) -> int:
    if mesh_axes is None:
        return 1
    if isinstance(mesh_axes, str):
        mesh_axes = (mesh_axes,)
    return math.prod(mesh.shape[a] for a in mesh_axes if a in mesh.shape)
