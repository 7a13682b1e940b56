"""The train state: one immutable pytree holding everything a step changes.

``TrainState(params, opt_state, step, rng)`` is a registered pytree (a
``flax.struct.dataclass``), so it passes through ``jax.jit``, is donated
whole, and is saved and restored by Orbax as one tree. Its shardings come
from the parameter shardings: ``optax.tree_map_params`` maps them onto every
copy of the parameter tree in the optimizer state (Adam's ``mu``/``nu``,
Lion's momentum); counters and other scalars are replicated.
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


def _leaf_sharding(leaf: Any, param: Any, sharding: NamedSharding, replicated: NamedSharding) -> Any:
    """Sharding of one optimizer-state leaf that sits where ``param`` sits in a copy of the params tree."""
    if isinstance(leaf, optax.MaskedNode):  # a frozen leaf's (empty) state
        return leaf
    shape, p_shape = tuple(leaf.shape), tuple(param.shape)
    if shape == p_shape:
        return sharding
    spec = tuple(sharding.spec) + (None,) * (len(p_shape) - len(sharding.spec))
    for drop in range(len(p_shape)):
        if p_shape[:drop] + p_shape[drop + 1:] == shape:
            return NamedSharding(sharding.mesh, PartitionSpec(*(spec[:drop] + spec[drop + 1:])))
    return replicated


def state_shardings(state_abstract: TrainState, param_shardings: Any, partitioner: Partitioner,
                    optimizer: optax.GradientTransformation) -> TrainState:
    """Shardings for every leaf of a (possibly abstract) :class:`TrainState`.

    ``optax.tree_map_params(optimizer, ...)`` finds the copies of the
    parameter tree inside the optimizer state (Adam's ``mu``/``nu``, Lion's
    momentum, Adafactor's factored moments, the states under ``masked`` and
    ``multi_transform``) by initialising ``optimizer`` on a placeholder. A
    leaf of such a copy, standing for parameter ``p`` with sharding ``s``:

    * same shape as ``p`` -> ``s``;
    * ``p``'s shape with one dimension dropped (factored second moments,
      Adafactor's ``v_row``/``v_col``) -> ``s``'s spec with that dimension's
      entry dropped (the first such dimension when several match);
    * otherwise (e.g. Adafactor's ``(1,)`` stand-ins) -> replicated;
    * ``optax.MaskedNode`` (no state for a frozen parameter) -> kept as is.

    Every other optimizer-state leaf (step counts, scalars), ``step`` and
    ``rng`` are replicated.

    Args:
      state_abstract: from :func:`abstract_state` with the same ``optimizer``.
      param_shardings: ``NamedSharding`` tree with the structure of
        ``state_abstract.params``.
      partitioner: gives the replicated sharding.
      optimizer: the transformation whose ``init`` built ``state_abstract.opt_state``.

    Raises:
      ValueError: if ``param_shardings`` and the params differ in structure.
    """
    replicated = partitioner.replicated
    p_def = jax.tree.structure(state_abstract.params)
    s_def = jax.tree.structure(param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    if p_def != s_def:
        raise ValueError(
            f"param_shardings has {s_def.num_leaves} leaves but state.params has {p_def.num_leaves} "
            "(or their trees differ); they must have the same tree structure")
    opt_shardings = optax.tree_map_params(
        optimizer, lambda leaf, p, sh: _leaf_sharding(leaf, p, sh, replicated), state_abstract.opt_state,
        state_abstract.params, param_shardings, transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    return TrainState(params=param_shardings, opt_state=opt_shardings, step=replicated, rng=replicated)


def init_sharded_state(params: Any, optimizer: optax.GradientTransformation, shardings: TrainState,
                       seed: int = 0) -> TrainState:
    """:func:`init_state` compiled with ``out_shardings=shardings``: every leaf
    (optimizer moments included) is created directly in its shards."""
    return jax.jit(lambda p: init_state(p, optimizer, seed), out_shardings=shardings)(params)
