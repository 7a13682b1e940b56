"""Batches on the mesh: the global batch (the same on every host) -> global sharded arrays, and sums over it."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.sharding import Partitioner

__all__ = ["MeshBatches", "count_loss_tokens", "global_sum", "on_mesh"]


def on_mesh(batch: Mapping[str, Any], partitioner: Partitioner) -> dict[str, jax.Array]:
    """The global batch -> global arrays split over the batch axes.

    Every host passes the same global ``[B, ...]`` numpy batch (the
    pipelines of :mod:`jaxpost.data.pipeline` yield it on every host); each
    host transfers only the shards its own devices hold
    (``jax.make_array_from_callback``), so any mesh layout works, whichever
    rows a host's devices hold. ``B`` must divide over the batch axes.
    Non-array entries (raw prompt text) are dropped.
    """
    out = {}
    for k, v in batch.items():
        if not isinstance(v, np.ndarray):
            continue
        sharding = partitioner.batch_sharding(v.ndim)
        out[k] = jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
    return out


class MeshBatches:
    """Wraps an iterator of global numpy batches (the same on every host) so ``next`` yields global arrays.

    Passes ``get_state``/``set_state`` through, so checkpoints hold the
    underlying pipeline's position.
    """

    def __init__(self, it: Any, partitioner: Partitioner, transform: Callable[[dict], dict] | None = None):
        self.it, self.partitioner, self.transform = it, partitioner, transform

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, jax.Array]:
        batch = next(self.it)
        if self.transform is not None:
            batch = self.transform(batch)
        return on_mesh(batch, self.partitioner)

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state) -> None:
        self.it.set_state(state)


@jax.jit
def _global_sums(arrays: list[jax.Array]) -> list[jax.Array]:
    # Replicated scalar outputs: every process holds the result, whereas a
    # batch spanning several processes cannot be fetched by any one of them.
    return [jnp.sum(jnp.asarray(x, jnp.float32)) for x in arrays]


def global_sum(x: jax.Array | np.ndarray) -> float:
    """``sum(x)`` over the whole global array, on every process.

    Arrays this process holds entirely are summed on the host; a global
    array split over several processes is summed on the devices (a collective:
    every process must call this in the same order).
    """
    if isinstance(x, np.ndarray) or x.is_fully_addressable:
        return float(np.asarray(jax.device_get(x), np.float64).sum())
    return float(jax.device_get(_global_sums([x])[0]))


@jax.jit
def _real_tokens(segment_ids: list[jax.Array]) -> jax.Array:
    return sum(jnp.count_nonzero(s) for s in segment_ids)  # a replicated scalar: every process holds it


def count_loss_tokens(batch: Mapping[str, jax.Array]) -> int | jax.Array:
    """Real (non-padding) tokens of the global batch: ``sum(segment_ids != 0)``, for tokens/s.

    Host (numpy) batches are counted on the host. Device batches are counted
    on their devices and the count is returned as a device scalar, not
    read: fetching it would make the host wait for the step before (and, for
    a batch over several processes, for a collective). :func:`jaxpost.train.train`
    reads the counts at log steps only.
    """
    keys = [k for k in batch if k.endswith("segment_ids")]
    if all(isinstance(batch[k], np.ndarray) for k in keys):
        return sum(int(np.count_nonzero(batch[k])) for k in keys)
    return _real_tokens([batch[k] for k in keys])
