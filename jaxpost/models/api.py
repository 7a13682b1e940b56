"""Functional entry points: build, shard, and run a model as ``(graphdef, params)``.

``params`` is a plain nested dict of arrays (``nnx.to_pure_dict``); the
module is re-assembled inside pure functions with ``nnx.merge``.
"""

from __future__ import annotations

from typing import Any

import jax
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
            branches: Branches | None = None) -> tuple[jax.Array, KVCache | None]:
    """Hidden states ``[B, T, D]`` after the final norm, and the advanced cache.

    Pure; call it inside ``jax.jit``. ``tokens``, ``positions`` and
    ``segment_ids`` are int32 ``[B, T]`` (segment 0 = padding, positions
    restart at 0 per segment). With a cache from :func:`init_cache` the T
    tokens fill slots ``[cache.index, cache.index + T)`` and attend to all
    earlier slots of their segment; the returned cache has ``index += T``.
    With :class:`~jaxpost.models.attention.Branches` (static) each row is a
    shared prefix followed by branches that do not see each other.
    """
    model = nnx.merge(graphdef, params)
    return model(tokens, positions, segment_ids, cache, branches)


def param_count(params: Any) -> int:
    """Total number of scalars in a params tree."""
    return sum(x.size for x in jax.tree.leaves(params))
