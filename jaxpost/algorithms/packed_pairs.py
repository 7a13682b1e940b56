"""Per-pair reductions over packed preference rows (layout: :mod:`jaxpost.data.pair_packing`).

A packed row holds up to ``K`` pairs; token ``t`` of row ``b`` belongs to
pair slot ``pair_ids[b, t]`` (``1..K``, 0 = padding) on side
``pair_sides[b, t]`` (1 = chosen, 2 = rejected). Every reduction here is
row-local (a pair never straddles rows), so it shards along the batch axis
with no cross-device traffic.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from jaxpost.models import forward
from jaxpost.models.config import ModelConfig
from jaxpost.models.heads import scores, token_logprobs


def _slot_index(pair_ids, pair_sides, num_pairs: int):
    """``2 (pair - 1) + (side - 1)`` in ``[0, 2K)`` per token; padding goes to the spare bucket ``2K``."""
    return jnp.where(pair_ids > 0, 2 * (pair_ids - 1) + pair_sides - 1, 2 * num_pairs).astype(jnp.int32)


def _split_sides(per_slot, num_pairs: int):
    # [B, 2K + 1] -> chosen [B, K], rejected [B, K]; the spare padding bucket is dropped.
    pairs = per_slot[:, :2 * num_pairs].reshape(per_slot.shape[0], num_pairs, 2)
    return pairs[..., 0], pairs[..., 1]


def pair_sums(values, pair_ids, pair_sides, num_pairs: int):
    """Sums of ``values`` ``[B, L]`` per pair and side: ``(chosen [B, K], rejected [B, K])``.

    ``chosen[b, k-1] = sum_t values[b, t] [pair_ids[b, t] = k, pair_sides[b, t] = 1]``
    (rejected: side 2). Empty slots sum to 0. A segment sum (scatter-add) per
    row, so memory is ``O(B (L + K))``, never ``[B, L, K]``.
    """
    idx = _slot_index(pair_ids, pair_sides, num_pairs)
    seg = jax.vmap(lambda v, i: jax.ops.segment_sum(v, i, num_segments=2 * num_pairs + 1))
    return _split_sides(seg(values, idx), num_pairs)


def pair_last_index(pair_ids, pair_sides, num_pairs: int):
    """Position of each sequence's last token: ``(chosen [B, K], rejected [B, K])`` int32.

    ``max{t : pair_ids[b, t] = k, pair_sides[b, t] = side}``; 0 for an empty
    slot (in bounds; callers mask those pairs with ``pair_mask``).
    """
    idx = _slot_index(pair_ids, pair_sides, num_pairs)
    pos = jnp.broadcast_to(jnp.arange(pair_ids.shape[1], dtype=jnp.int32), pair_ids.shape)
    seg = jax.vmap(lambda p, i: jax.ops.segment_max(p, i, num_segments=2 * num_pairs + 1))
    last = jnp.maximum(seg(pos, idx), 0)  # segment_max of an empty segment is the dtype's minimum
    return _split_sides(last, num_pairs)


def packed_pair_logps(graphdef, config: ModelConfig, params, batch: Mapping, *, chunk_size: int = 512):
    """Summed response log-probs and response lengths per pair, from one forward over the packed rows.

    ``pi_side[b, k] = sum_t log p(targets[b, t]) loss_mask[b, t]`` over the
    tokens of slot ``k`` on that side; ``len_side`` the same sum of
    ``loss_mask``. Returns ``(pi_c, pi_r, len_c, len_r)``, each ``[B, K]``
    with ``K = batch["pair_mask"].shape[1]``.
    """
    hidden, _ = forward(graphdef, params, batch["tokens"], batch["positions"], batch["segment_ids"])
    logp = token_logprobs(params, config, hidden, batch["targets"], chunk_size=chunk_size)
    k = batch["pair_mask"].shape[1]
    mask = batch["loss_mask"].astype(jnp.float32)
    pc, pr = pair_sums(logp * mask, batch["pair_ids"], batch["pair_sides"], k)
    lc, lr = pair_sums(mask, batch["pair_ids"], batch["pair_sides"], k)
    return pc, pr, lc, lr


def packed_pair_scores(graphdef, params, batch: Mapping):
    """Scalar scores at each sequence's last token (``head="score"`` model): ``(r_c, r_r)`` ``[B, K]``."""
    hidden, _ = forward(graphdef, params, batch["tokens"], batch["positions"], batch["segment_ids"])
    s = scores(params, hidden).astype(jnp.float32)
    k = batch["pair_mask"].shape[1]
    ic, ir = pair_last_index(batch["pair_ids"], batch["pair_sides"], k)
    return jnp.take_along_axis(s, ic, axis=1), jnp.take_along_axis(s, ir, axis=1)
