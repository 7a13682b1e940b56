"""Sharding as data: a named device mesh, logical axis names, and rule presets.

Every parameter and key activation carries *logical* axis names (``batch``,
``length``, ``embed``, ``mlp``, ``heads``, ``kv_heads``, ``head_dim``,
``vocab``, ``norm``). A rule preset maps each logical name to zero or more of
the mesh axes ``data``, ``fsdp``, ``tensor``. A :class:`Partitioner` holds a
mesh and a preset and turns logical names into ``PartitionSpec`` /
``NamedSharding`` objects. The mesh always has all three axes (size 1 where
unused) so that every preset is valid on every mesh.

Meshes come from ``jax.make_mesh`` (one slice or node, ordered by its ICI
topology) or, for several TPU slices / GPU nodes, from
``mesh_utils.create_hybrid_device_mesh`` (``make_mesh(dcn_data=...)``).
:meth:`Partitioner.activate` makes the mesh JAX's context mesh
(``jax.set_mesh``) and the rules the ones :func:`constrain` applies to
activations; the active partitioner is a ``jax.make_user_context`` value, so
it is part of ``jax.jit``'s cache key.

Example::

    part = Partitioner(make_mesh(fsdp=-1), FSDP)
    part.sharding(("embed", "mlp"))   # NamedSharding(mesh, P("fsdp", None))
    with part.activate():
        step(state, batch)            # activations constrained by FSDP's rules
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Mapping, Sequence

import gin
import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

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


def _mesh_error(sizes: Sequence[int], dcn_data: int, n: int, why: str) -> ValueError:
    data, fsdp, tensor = sizes
    where = f"data={data} fsdp={fsdp} tensor={tensor}" + (f" dcn_data={dcn_data}" if dcn_data != 1 else "")
    return ValueError(f"Cannot build a mesh {where} over {n} devices: {why}. Set the make_mesh sizes "
                      f"(gin: make_mesh.data/fsdp/tensor/dcn_data) so that data x fsdp x tensor = {n}.")


def _granules(devices: Sequence[Any]) -> tuple[str, int]:
    """The network units a hybrid mesh spans: TPU slices if the devices carry
    more than one ``slice_index``, else processes (one per GPU node)."""
    slices = {getattr(d, "slice_index", None) for d in devices}
    if None not in slices and len(slices) > 1:
        return "slice_index", len(slices)
    return "process_index", len({d.process_index for d in devices})


@gin.configurable
def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None, dcn_data: int = 1) -> Mesh:
    """Builds a ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all).

    One of ``data``, ``fsdp``, ``tensor`` may be ``-1``, meaning "all
    remaining devices"; the product of the sizes must equal the device count.
    Every axis has ``AxisType.Auto`` (shardings are constraints XLA
    propagates, as with a plain ``Mesh``).

    ``dcn_data = 1`` (one TPU slice, one host or one GPU node): the layout is
    ``jax.make_mesh``'s, which orders devices by the physical ICI topology.

    ``dcn_data = G > 1`` (multi-slice TPU, multi-node GPU): a hybrid mesh from
    ``mesh_utils.create_hybrid_device_mesh``. The devices fall into ``G``
    groups -- TPU slices when they carry more than one ``slice_index``,
    otherwise processes (one per GPU node) -- joined by the slow data-centre
    network (DCN). The ``data`` axis is split as ``G`` groups x ``data / G``
    inside a group, so ``data`` index ``i`` lies in group ``i // (data / G)``;
    ``fsdp`` and ``tensor`` never leave a group (ICI / NVLink), and the only
    traffic across groups is the gradient all-reduce over ``data``.

    Raises:
      ValueError: naming the axes and sizes, when more than one size is -1,
        the devices do not divide into them, ``dcn_data`` does not divide
        ``data``, or the devices do not form ``dcn_data`` equal groups.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise _mesh_error(sizes, dcn_data, n, "at most one axis may be -1")
    if dcn_data < 1 or any(s < 1 and s != -1 for s in sizes):
        raise _mesh_error(sizes, dcn_data, n, "sizes must be positive (or -1 for one axis)")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise _mesh_error(sizes, dcn_data, n, f"{n} is not divisible by the fixed sizes' product {known}")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise _mesh_error(sizes, dcn_data, n, f"data x fsdp x tensor = {math.prod(sizes)}, not {n}")
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if dcn_data == 1:
        attr, groups = _granules(devices)
        if attr == "slice_index":
            raise _mesh_error(sizes, dcn_data, n, f"the devices span {groups} TPU slices; set dcn_data to the "
                              "number of slices (configs/mesh/tpu_v5p_multislice.gin)")
        return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=axis_types, devices=devices)
    if sizes[0] % dcn_data:
        raise _mesh_error(sizes, dcn_data, n, f"dcn_data={dcn_data} does not divide data={sizes[0]}")
    attr, groups = _granules(devices)
    if groups != dcn_data:
        raise _mesh_error(sizes, dcn_data, n, f"the devices form {groups} groups by {attr}, not {dcn_data}")
    ici = (sizes[0] // dcn_data, sizes[1], sizes[2])
    arr = mesh_utils.create_hybrid_device_mesh(ici, (dcn_data, 1, 1), devices,
                                               process_is_granule=attr == "process_index")
    return Mesh(arr, MESH_AXES, axis_types=axis_types)


# The partitioner whose rules activation constraints use. A ``jax.make_user_context``
# value is part of ``jax.jit``'s cache key and trace context: a function traced under
# one partitioner is re-traced, not reused, under another with a different mesh or rules.
_ACTIVE = jax.make_user_context(None)


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

    def shards(self, logical: str) -> int:
        """How many pieces an array axis of logical name ``logical`` is split into (1: replicated)."""
        return self._pieces(self.spec((logical,))[0])

    def _pieces(self, entry) -> int:
        """The number of devices along one ``PartitionSpec`` entry's mesh axes."""
        return math.prod(self.mesh.shape[a] for a in ((entry,) if isinstance(entry, str) else (entry or ())))

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
                parts = self._pieces(entry)
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

    def _key(self) -> tuple:
        return (self.mesh, tuple(sorted((k, v) for k, v in self.rules.items())))

    def __eq__(self, other: object) -> bool:
        """Equal when mesh and rules are equal: such partitioners trace identical functions."""
        return isinstance(other, Partitioner) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    @contextlib.contextmanager
    def activate(self):
        """Within this context, :func:`constrain` applies this partitioner's rules.

        Outside any trace it also makes ``self.mesh`` JAX's mesh
        (``jax.set_mesh``), so ``jax.jit``, raw ``PartitionSpec`` shardings and
        ``jax.shard_map`` see the same mesh the rules resolve against. Inside
        a trace (``jax.set_mesh`` is refused there) only the rules change; the
        constraints still name this mesh explicitly.

        The partitioner is held in a ``jax.make_user_context``, which is part of
        ``jax.jit``'s cache key: a jitted function first traced under one
        partitioner is re-traced under one with other rules or another mesh,
        never served a stale compilation. Equal partitioners (same mesh and
        rules) share compilations.
        """
        with contextlib.ExitStack() as stack:
            if _trace_state_clean():
                stack.enter_context(jax.set_mesh(self.mesh))
            stack.enter_context(_ACTIVE(self))
            yield self


def _trace_state_clean() -> bool:
    """True outside any JAX transformation: the exact condition ``jax.set_mesh`` requires.

    JAX 0.10 has no public form of this check (``jax.set_mesh`` raises a
    ``ValueError`` otherwise), hence the internal import.
    """
    from jax._src import core as jax_core
    return jax_core.trace_state_clean()


def active_partitioner() -> Partitioner | None:
    """The partitioner made active by :meth:`Partitioner.activate`, if any."""
    return _ACTIVE.value


def constrain(x: jax.Array, logical_axes: LogicalAxes) -> jax.Array:
    """Sharding constraint on an activation by logical names; no-op outside ``activate()``.

    The constraint is ``NamedSharding(part.mesh, part.spec(logical_axes))`` for
    the active partitioner ``part`` -- under ``activate()`` at top level that
    mesh is also JAX's context mesh (see :meth:`Partitioner.activate`).
    """
    part = _ACTIVE.value
    return x if part is None else part.constrain(x, logical_axes)
