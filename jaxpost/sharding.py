"""Sharding as data: a named device mesh, logical axis names, and rule presets.

Every parameter and key activation carries *logical* axis names (``batch``,
``length``, ``embed``, ``mlp``, ``heads``, ``kv_heads``, ``head_dim``,
``vocab``, ``norm``). A rule preset maps each logical name to zero or more of
the mesh axes ``data``, ``fsdp``, ``tensor``. A :class:`Partitioner` holds a
mesh and a preset and turns logical names into ``PartitionSpec`` /
``NamedSharding`` objects. The mesh always has all three axes (size 1 where
unused) so that every preset is valid on every mesh.

Example::

    part = Partitioner(make_mesh(fsdp=-1), FSDP)
    part.sharding(("embed", "mlp"))   # NamedSharding(mesh, P("fsdp", None))
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Mapping, Sequence

import gin
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LogicalAxes = tuple[str | None, ...]
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Batch is split over every data-like axis; the tensor axis holds replicas of
# the batch because tensor-parallel shards cooperate on the same examples.
_BATCH = ("batch", ("data", "fsdp"))

DATA_PARALLEL: Rules = (_BATCH,)
"""Pure data parallelism: parameters replicated, batch split over data x fsdp."""

FSDP: Rules = (_BATCH, ("embed", "fsdp"), ("vocab", None))
"""ZeRO-3 style: every weight split along its model dimension over ``fsdp``."""

FSDP_TP: Rules = (
    _BATCH,
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
)
"""FSDP plus Megatron-style tensor parallelism over heads, MLP and vocab."""

PRESETS: Mapping[str, Rules] = {
    "data_parallel": DATA_PARALLEL,
    "fsdp": FSDP,
    "fsdp_tp": FSDP_TP,
}


@gin.configurable
def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all).

    One axis may be ``-1``, meaning "all remaining devices". The product of
    the sizes must equal the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"At most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into data={data} fsdp={fsdp} tensor={tensor}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"Mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} "
            f"does not match the {len(devices)} available devices")
    try:
        arr = mesh_utils.create_device_mesh(sizes, devices)
    except Exception:  # non-TPU topologies without a known physical layout
        arr = np.asarray(devices).reshape(sizes)
    return Mesh(arr, MESH_AXES)


_ACTIVE: contextvars.ContextVar["Partitioner | None"] = contextvars.ContextVar("jaxpost_partitioner", default=None)


@gin.configurable
class Partitioner:
    """Turns logical axis names into shardings on one mesh (T5X-style).

    Args:
      mesh: a mesh whose axis names are ``MESH_AXES``.
      rules: a preset name from ``PRESETS`` or a tuple of ``(logical, mesh
        axes)`` pairs. Logical names without a rule are replicated.
    """

    def __init__(self, mesh: Mesh | None = None, rules: str | Rules = "fsdp"):
        self.mesh = make_mesh() if mesh is None else mesh
        if isinstance(rules, str):
            if rules not in PRESETS:
                raise ValueError(f"Unknown sharding preset {rules!r}; choose one of {sorted(PRESETS)}")
            rules = PRESETS[rules]
        self.rules: dict[str, Any] = dict(rules)
        bad = [a for v in self.rules.values() for a in ((v,) if isinstance(v, str) else (v or ())) if a not in MESH_AXES]
        if bad:
            raise ValueError(f"Sharding rules name unknown mesh axes {bad}; mesh axes are {MESH_AXES}")

    def __repr__(self) -> str:
        return f"Partitioner(mesh={dict(self.mesh.shape)}, rules={self.rules})"

    def spec(self, logical_axes: LogicalAxes | None) -> PartitionSpec:
        """``PartitionSpec`` for one array's logical axes (``None`` = replicated)."""
        if logical_axes is None:
            return PartitionSpec()
        used: set[str] = set()
        out = []
        for name in logical_axes:
            target = self.rules.get(name) if name is not None else None
            axes = (target,) if isinstance(target, str) else tuple(target or ())
            # A mesh axis may appear once per spec; later duplicates stay replicated.
            axes = tuple(a for a in axes if a not in used and self.mesh.shape[a] > 1)
            used.update(axes)
            out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        return PartitionSpec(*out)

    def sharding(self, logical_axes: LogicalAxes | None) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical_axes))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def shardings(self, axes_tree: Any, shapes: Any = None) -> Any:
        """Tree of ``NamedSharding`` for a tree of logical axes.

        If ``shapes`` (a matching tree of arrays or ``ShapeDtypeStruct``) is
        given, each split dimension is checked to divide evenly, with an error
        naming the array path, its shape and the offending axis.
        """
        is_axes = lambda x: x is None or (isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x))
        if shapes is None:
            return jax.tree.map(self.sharding, axes_tree, is_leaf=is_axes)

        def one(path, axes, shape_like):
            spec = self.spec(axes)
            shape = tuple(shape_like.shape)
            for dim, entry in zip(shape, spec):
                parts = math.prod(self.mesh.shape[a] for a in ((entry,) if isinstance(entry, str) else (entry or ())))
                if dim % parts:
                    raise ValueError(
                        f"Cannot shard {jax.tree_util.keystr(path)} of shape {shape} with logical axes {axes}: "
                        f"dimension {dim} is not divisible by {parts} (spec {spec}, mesh {dict(self.mesh.shape)})")
            return NamedSharding(self.mesh, spec)

        return jax.tree_util.tree_map_with_path(one, axes_tree, shapes, is_leaf=is_axes)

    def batch_sharding(self, ndim: int = 2) -> NamedSharding:
        """Sharding of a ``[batch, ...]`` input array."""
        return self.sharding(("batch",) + (None,) * (ndim - 1))

    def constrain(self, x: jax.Array, logical_axes: LogicalAxes) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, self.sharding(logical_axes))

    @contextlib.contextmanager
    def activate(self):
        """Within this context, :func:`constrain` applies this partitioner's rules."""
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)


def active_partitioner() -> Partitioner | None:
    """The partitioner made active by :meth:`Partitioner.activate`, if any."""
    return _ACTIVE.get()


def constrain(x: jax.Array, logical_axes: LogicalAxes) -> jax.Array:
    """Sharding constraint on an activation by logical names; no-op outside ``activate()``."""
    part = _ACTIVE.get()
    return x if part is None else part.constrain(x, logical_axes)
