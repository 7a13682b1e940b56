"""The two layouts of the decoder's layer parameters, and conversion between them.

Unrolled (``ModelConfig.scan_layers = False``)::

    params["layers"][i]["attn"]["q_proj"]["kernel"]     [D, N*Hd]   one dict per layer, keys 0..L-1

Scanned (``scan_layers = True``)::

    params["layers"]["attn"]["q_proj"]["kernel"]        [L, D, N*Hd]  logical axes ("layers", "embed", "heads")

Layer ``i`` of the scanned layout is ``x[i]`` of every leaf. Everything else
(embedding, final norm, heads) is the same in both. The functions here
convert any tree that holds such ``layers`` dicts: params, gradients,
optimizer states (Adam's ``mu``/``nu`` are params-shaped), train states, and
their abstract forms (``jax.ShapeDtypeStruct`` with a ``NamedSharding``, for
restoring a checkpoint written in the other layout).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

__all__ = ["is_scanned", "stack_layers", "unstack_layers", "to_layout", "layer_index"]


def _is_unrolled_layers(layers: Any) -> bool:
    return isinstance(layers, dict) and bool(layers) and all(isinstance(k, int) for k in layers)


def _has_layers(node: Any) -> bool:
    return isinstance(node, dict) and isinstance(node.get("layers"), dict)


def is_scanned(tree: Any) -> bool | None:
    """Whether the first ``layers`` dict found in ``tree`` is stacked; None if ``tree`` has none."""
    found = []

    def visit(node):
        if _has_layers(node) and not found:
            found.append(not _is_unrolled_layers(node["layers"]))
        return node

    jax.tree.map(visit, tree, is_leaf=_has_layers)
    return found[0] if found else None


def _stack(*xs):
    x = xs[0]
    if isinstance(x, jax.ShapeDtypeStruct):
        sharding = x.sharding
        if isinstance(sharding, NamedSharding):
            sharding = NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))
        return jax.ShapeDtypeStruct((len(xs),) + tuple(x.shape), x.dtype, sharding=sharding)
    if x is None or not hasattr(x, "shape"):  # optax.MaskedNode and other placeholders: one per tree
        return x
    return jnp.stack(xs)


def _unstack(x, i: int):
    if isinstance(x, jax.ShapeDtypeStruct):
        sharding = x.sharding
        if isinstance(sharding, NamedSharding):
            sharding = NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
        return jax.ShapeDtypeStruct(tuple(x.shape)[1:], x.dtype, sharding=sharding)
    if x is None or not hasattr(x, "shape"):
        return x
    return x[i]


def _leaf(x) -> bool:
    return x is None or not isinstance(x, (dict, list, tuple))


def stack_layers(layers: dict) -> dict:
    """``{0: tree, 1: tree, ...}`` -> one tree whose leaves are stacked on a new leading axis."""
    if not _is_unrolled_layers(layers):
        raise ValueError("stack_layers needs the unrolled layout {0: ..., 1: ..., ...}")
    n = len(layers)
    if sorted(layers) != list(range(n)):
        raise ValueError(f"layer keys must be 0..{n - 1}, got {sorted(layers)}")
    return jax.tree.map(_stack, *(layers[i] for i in range(n)), is_leaf=_leaf)


def unstack_layers(layers: dict, num_layers: int | None = None) -> dict:
    """The inverse of :func:`stack_layers`: one tree per index of the leading axis."""
    if _is_unrolled_layers(layers):
        raise ValueError("unstack_layers needs the scanned layout (leaves with a leading layers axis)")
    sizes = {x.shape[0] for x in jax.tree.leaves(layers) if hasattr(x, "shape")}
    if len(sizes) != 1:
        raise ValueError(f"stacked layer leaves disagree on the number of layers: {sorted(sizes)}")
    n = sizes.pop()
    if num_layers is not None and n != num_layers:
        raise ValueError(f"stacked layers hold {n} layers, expected {num_layers}")
    return {i: jax.tree.map(lambda x: _unstack(x, i), layers, is_leaf=_leaf) for i in range(n)}


def to_layout(tree: Any, scanned: bool) -> Any:
    """``tree`` with every params-like dict (one holding ``"layers"``) in the scanned or unrolled layout.

    Works on params, gradients, optimizer states and ``TrainState`` (any
    pytree whose nodes jax can rebuild), concrete or abstract. Dicts already
    in the asked layout are returned as they are. Concrete arrays are
    stacked or sliced (a copy: call it under ``jax.jit`` with
    ``out_shardings`` to place the result); abstract leaves get the shape
    and the ``NamedSharding`` with the leading ``layers`` dimension added or
    removed (replicated).
    """

    def convert(node):
        if not _has_layers(node):
            return node
        layers = node["layers"]
        if _is_unrolled_layers(layers) == (not scanned):
            return node
        return {**node, "layers": stack_layers(layers) if scanned else unstack_layers(layers)}

    return jax.tree.map(convert, tree, is_leaf=_has_layers)


def layer_index(path: tuple, scanned: bool) -> tuple[tuple, int | None]:
    """An unrolled key path (``("layers", i, ...)``) in the asked layout -> ``(path, index)``.

    Scanned: ``(("layers", ...), i)`` (layer ``i`` is ``leaf[i]``);
    unrolled, or a path outside the layers: ``(path, None)``.
    """
    if scanned and len(path) > 1 and path[0] == "layers" and isinstance(path[1], int):
        return ("layers",) + tuple(path[2:]), path[1]
    return tuple(path), None
