"""Functional entry points: build, shard, and run a model as ``(graphdef, params)``.

``params`` is a plain nested dict of arrays (``nnx.to_pure_dict``); the
module is re-assembled inside pure functions with ``nnx.merge``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpost.models.attention import Branches, KVCache
from jaxpost.models.config import ModelConfig
from jaxpost.models.transformer import Transformer


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _state_to_dict(state) -> dict:
    """nnx.State -> nested plain dict, keeping each Variable as the leaf."""
    out = {}
    for key, value in state.items():
        out[key] = value if _is_variable(value) else _state_to_dict(value)
    return out


def abstract(config: ModelConfig) -> tuple[nnx.GraphDef, dict]:
    """``(graphdef, params)`` with ``jax.ShapeDtypeStruct`` leaves; allocates nothing."""
    module = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(module)
    return graphdef, nnx.to_pure_dict(state)


def logical_axes(config: ModelConfig) -> dict:
    """The params tree with each leaf replaced by its tuple of logical axis names."""
    module = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    tree = _state_to_dict(nnx.state(module))
    return jax.tree.map(lambda v: tuple(v.get_metadata()["logical_axes"]), tree, is_leaf=_is_variable)


def create(config: ModelConfig, seed: int = 0, partitioner=None) -> tuple[nnx.GraphDef, dict]:
    """Randomly initialised ``(graphdef, params)`` (normal(0, 0.02) weights, unit norms).

    With a :class:`jaxpost.sharding.Partitioner`, initialisation runs under
    ``jax.jit`` with ``out_shardings`` from the logical axes, so each device
    materialises only its own shards. The values do not depend on the
    partitioner.
    """
    graphdef, shapes = abstract(config)

    def init():
        return nnx.to_pure_dict(nnx.state(Transformer(config, rngs=nnx.Rngs(seed))))

    shardings = None if partitioner is None else partitioner.shardings(logical_axes(config), shapes)
    params = jax.jit(init, out_shardings=shardings)()
    return graphdef, params


def forward(graphdef: nnx.GraphDef, params: dict, tokens: jax.Array, positions: jax.Array,
            segment_ids: jax.Array, cache: KVCache | None = None,
            branches: Branches | None = None, fused=None) -> tuple[jax.Array, KVCache | None]:
    """Hidden states ``[B, T, D]`` after the final norm, and the advanced cache.

    Pure; call it inside ``jax.jit``. ``tokens``, ``positions`` and
    ``segment_ids`` are int32 ``[B, T]`` (segment 0 = padding, positions
    restart at 0 per segment). With a cache from :func:`init_cache` the T
    tokens fill slots ``[cache.index, cache.index + T)`` and attend to all
    earlier slots of their segment; the returned cache has ``index += T``.
    With :class:`~jaxpost.models.attention.Branches` (static) each row is a
    shared prefix followed by branches that do not see each other.
    ``fused`` (from :func:`fused_projections` of the same params) computes
    each layer's query, key and value projections as one matmul, and its
    gate and up projections as another, over stacked copies of their
    kernels: the same numbers, fewer matmuls, for a decode loop that makes
    the copies once.
    """
    model = nnx.merge(graphdef, params)
    return model(tokens, positions, segment_ids, cache, branches, fused)


def fused_projections(graphdef: nnx.GraphDef, params: dict):
    """Stacked copies of every layer's q/k/v and gate/up kernels, for :func:`forward`'s ``fused``.

    A pytree of arrays (:meth:`~jaxpost.models.transformer.Transformer.fused_projections`),
    sharded like the kernels under the active partitioner; it costs those
    kernels' memory while it lives. Pure; call it inside ``jax.jit``.
    """
    return nnx.merge(graphdef, params).fused_projections()


def inputs_from_attention_mask(attention_mask: jax.Array, position_ids: jax.Array | None = None
                               ) -> tuple[jax.Array, jax.Array]:
    """Hugging Face ``attention_mask`` (and ``position_ids``) -> jaxpost ``(positions, segment_ids)``.

    ``attention_mask`` is ``[B, T]`` (bool or int, 1 = real token, 0 =
    padding, on either side). Returns int32 ``[B, T]`` arrays for
    :func:`forward`: ``segment_ids`` 0 on padding; ``positions`` 0 on
    padding. NumPy inputs give NumPy outputs (host-side data code); JAX
    arrays, traced ones inside ``jax.jit`` included, give JAX arrays.

    * Without ``position_ids`` each row is one sequence: ``segment_ids =
      attention_mask``, and ``positions[b, t]`` counts the real tokens before
      ``t`` (HF's ``attention_mask.cumsum(-1) - 1`` on real tokens), so a
      left-padded prompt starts at position 0.
    * With ``position_ids`` ``[B, T]`` (HF's packed rows, e.g.
      ``DataCollatorWithFlattening``: several sequences per row, each
      restarting at position 0) ``positions = position_ids`` on real tokens,
      and ``segment_ids`` number the sequences of a row ``1, 2, ...``: a
      new one starts at a real token whose position id is 0 or whose left
      neighbour is padding (or the row's start).
    """
    on_host = isinstance(attention_mask, np.ndarray) and (position_ids is None or isinstance(position_ids, np.ndarray))
    xp = np if on_host else jnp
    real = xp.asarray(attention_mask).astype(bool)
    if position_ids is None:
        segment_ids = real.astype(xp.int32)
        positions = xp.where(real, xp.cumsum(segment_ids, axis=-1) - 1, 0)
        return positions.astype(xp.int32), segment_ids
    position_ids = xp.asarray(position_ids).astype(xp.int32)
    prev_real = xp.pad(real[..., :-1], [(0, 0)] * (real.ndim - 1) + [(1, 0)])
    starts = real & ((position_ids == 0) | ~prev_real)
    segment_ids = xp.where(real, xp.cumsum(starts.astype(xp.int32), axis=-1), 0).astype(xp.int32)
    return xp.where(real, position_ids, 0).astype(xp.int32), segment_ids


def param_count(params: Any) -> int:
    """Total number of scalars in a params tree."""
    return sum(x.size for x in jax.tree.leaves(params))
