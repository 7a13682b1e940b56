"""The train state: one immutable pytree holding everything a step changes.

``TrainState(params, opt_state, step, rng)`` is a registered pytree (a
``flax.struct.dataclass``), so it passes through ``jax.jit``, is donated
whole, and is saved and restored by Orbax as one tree. Its shardings come
from the parameter shardings: every optimizer-state leaf that mirrors a
parameter (Adam's ``mu``/``nu``, Lion's momentum) is sharded like that
parameter; counters and other scalars are replicated.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxpost.sharding import Partitioner

__all__ = ["TrainState", "init_state", "abstract_state", "state_shardings", "init_sharded_state"]


@flax.struct.dataclass
class TrainState:
    """Immutable training state.

    Attributes:
      params: the trained parameters (nested dict of arrays, fp32 master copy).
      opt_state: the optax state for ``params``.
      step: int32 scalar, number of optimizer updates applied so far.
      rng: raw ``uint32[2]`` PRNG key (``jax.random.PRNGKey`` layout, so Orbax
        saves it as a plain array); advanced once per step.
    """

    params: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array


def init_state(params: Any, optimizer: optax.GradientTransformation, seed: int = 0) -> TrainState:
    """``TrainState(params, optimizer.init(params), step=0, rng=PRNGKey(seed))``.

    Pure and traceable: wrap it in ``jax.jit(..., out_shardings=...)`` (see
    :func:`init_sharded_state`) to create the state directly in its shards.
    """
    return TrainState(
        params=params,
        opt_state=optimizer.init(params),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.PRNGKey(seed),
    )


def abstract_state(params: Any, optimizer: optax.GradientTransformation, seed: int = 0) -> TrainState:
    """Shapes and dtypes of :func:`init_state` (``jax.eval_shape``; no memory allocated).

    ``params`` may be arrays or ``jax.ShapeDtypeStruct`` leaves.
    """
    return jax.eval_shape(lambda p: init_state(p, optimizer, seed), params)


def _keystr(path) -> str:
    return jax.tree_util.keystr(tuple(path))


def state_shardings(state_abstract: TrainState, param_shardings: Any, partitioner: Partitioner) -> TrainState:
    """Shardings for every leaf of a (possibly abstract) :class:`TrainState`.

    Rule for an optimizer-state leaf at key path ``P``: find the parameter
    whose key path is the longest suffix of ``P`` (optax states embed copies
    of the parameter tree, e.g. ``[0].mu['layers'][0]['kernel']``).

    * same shape as that parameter -> the parameter's sharding;
    * the parameter's shape with one dimension dropped (factored second
      moments, e.g. Adafactor's ``v_row``/``v_col``) -> the parameter's spec
      with that dimension's entry dropped;
    * otherwise (scalars such as step counts, anything unmatched) -> replicated.

    ``step`` and ``rng`` are replicated. ``param_shardings`` must have the
    tree structure of ``state_abstract.params``.
    """
    replicated = partitioner.replicated
    p_leaves = jax.tree_util.tree_flatten_with_path(state_abstract.params)[0]
    s_leaves, s_def = jax.tree_util.tree_flatten(param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    if len(p_leaves) != len(s_leaves):
        raise ValueError(
            f"param_shardings has {len(s_leaves)} leaves but state.params has {len(p_leaves)}; "
            "they must have the same tree structure")
    by_path = {tuple(path): (tuple(leaf.shape), sh) for (path, leaf), sh in zip(p_leaves, s_leaves)}
    max_depth = max((len(p) for p in by_path), default=0)

    def for_opt_leaf(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        if not shape:
            return replicated
        path = tuple(path)
        for n in range(min(max_depth, len(path)), 0, -1):
            hit = by_path.get(path[-n:])
            if hit is None:
                continue
            p_shape, sh = hit
            if shape == p_shape:
                return sh
            spec = tuple(sh.spec) + (None,) * (len(p_shape) - len(sh.spec))
            for drop in range(len(p_shape)):
                if p_shape[:drop] + p_shape[drop + 1:] == shape:
                    return NamedSharding(sh.mesh, PartitionSpec(*(spec[:drop] + spec[drop + 1:])))
            return replicated
        return replicated

    opt_shardings = jax.tree_util.tree_map_with_path(for_opt_leaf, state_abstract.opt_state)
    return TrainState(params=param_shardings, opt_state=opt_shardings, step=replicated, rng=replicated)


def init_sharded_state(params: Any, optimizer: optax.GradientTransformation, shardings: TrainState,
                       seed: int = 0) -> TrainState:
    """:func:`init_state` compiled with ``out_shardings=shardings``: every leaf
    (optimizer moments included) is created directly in its shards."""
    return jax.jit(lambda p: init_state(p, optimizer, seed), out_shardings=shardings)(params)
