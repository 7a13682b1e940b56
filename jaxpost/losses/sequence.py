"""Per-sequence reductions of per-token log-probs: sums, lengths and means over masked tokens, per pair.

Preference losses (:mod:`jaxpost.losses.dpo`) read per-sequence log-probs
``pi = sum_t log p(y_t) m_t`` and lengths ``|y| = sum_t m_t``, where
``m = loss_mask`` marks the response tokens. These functions compute them
from ``[B, L]`` token log-probs in the three layouts jaxpost uses: one
sequence per row (:func:`sequence_logps`), the average per token
(:func:`average_logps`, :func:`mean_sequence_logps`), and packed rows holding
several pairs (:func:`pair_sums`, :func:`packed_sequence_logps`; layout in
:mod:`jaxpost.data.pair_packing`). All return float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpost.losses.checks import check_same_shape, f32


def sequence_logps(token_logps, loss_mask):
    """Summed log-prob and length of each sequence: ``(sum_t logp_t m_t, sum_t m_t)`` over the last axis.

    Args:
      token_logps: ``[..., L]`` log p(target) per position (e.g.
        :func:`jaxpost.models.token_logprobs`).
      loss_mask: ``[..., L]`` float {0,1}, 1 on the response tokens.

    Returns ``(logps [...], lengths [...])``, the inputs of the preference
    losses (``chosen_logps``, ``chosen_lengths``...).
    """
    check_same_shape(("token_logps", "loss_mask"), (token_logps, loss_mask), "[..., L]")
    mask = f32(loss_mask)
    return jnp.sum(token_logps * mask, axis=-1), jnp.sum(mask, axis=-1)


def average_logps(logps, lengths):
    """Length-averaged log-prob ``logps / max(lengths, 1)`` (SimPO, IPO, RPO); zero-length stays finite."""
    return f32(logps) / jnp.maximum(f32(lengths), 1.0)


def mean_sequence_logps(token_logps, loss_mask):
    """Mean log-prob per response token of each sequence: ``sum_t logp_t m_t / max(sum_t m_t, 1)``."""
    return average_logps(*sequence_logps(token_logps, loss_mask))


def _slot_index(pair_ids, pair_sides, num_pairs: int):
    """``2 (pair - 1) + (side - 1)`` in ``[0, 2K)`` per token; padding goes to the spare bucket ``2K``."""
    return jnp.where(pair_ids > 0, 2 * (pair_ids - 1) + pair_sides - 1, 2 * num_pairs).astype(jnp.int32)


def _split_sides(per_slot, num_pairs: int):
    # [B, 2K + 1] -> chosen [B, K], rejected [B, K]; the spare padding bucket is dropped.
    pairs = per_slot[:, :2 * num_pairs].reshape(per_slot.shape[0], num_pairs, 2)
    return pairs[..., 0], pairs[..., 1]


def pair_sums(values, pair_ids, pair_sides, num_pairs: int):
    """Sums of ``values`` ``[B, L]`` per pair and side of packed rows: ``(chosen [B, K], rejected [B, K])``.

    ``chosen[b, k-1] = sum_t values[b, t] [pair_ids[b, t] = k, pair_sides[b, t] = 1]``
    (rejected: side 2). Empty slots sum to 0. A segment sum (scatter-add) per
    row, so memory is ``O(B (L + K))``, never ``[B, L, K]``.
    """
    idx = _slot_index(pair_ids, pair_sides, num_pairs)
    seg = jax.vmap(lambda v, i: jax.ops.segment_sum(v, i, num_segments=2 * num_pairs + 1))
    return _split_sides(seg(values, idx), num_pairs)


def pair_last_index(pair_ids, pair_sides, num_pairs: int):
    """Position of each packed sequence's last token: ``(chosen [B, K], rejected [B, K])`` int32.

    ``max{t : pair_ids[b, t] = k, pair_sides[b, t] = side}``; 0 for an empty
    slot (in bounds; callers mask those pairs with ``pair_mask``).
    """
    idx = _slot_index(pair_ids, pair_sides, num_pairs)
    pos = jnp.broadcast_to(jnp.arange(pair_ids.shape[1], dtype=jnp.int32), pair_ids.shape)
    seg = jax.vmap(lambda p, i: jax.ops.segment_max(p, i, num_segments=2 * num_pairs + 1))
    last = jnp.maximum(seg(pos, idx), 0)  # segment_max of an empty segment is the dtype's minimum
    return _split_sides(last, num_pairs)


def packed_sequence_logps(token_logps, loss_mask, pair_ids, pair_sides, num_pairs: int, ld_alpha=None):
    """:func:`sequence_logps` for packed rows: ``(pi_c, pi_r, len_c, len_r)``, each ``[B, K]``.

    ``pi_side[b, k-1] = sum_t logp[b, t] m[b, t]`` over the tokens of pair
    slot ``k`` on that side (``pair_ids``, ``pair_sides`` ``[B, L]``),
    ``len_side`` the same sum of ``m``; empty slots give 0. ``ld_alpha``:
    LD-DPO's weights in place of ``m`` in ``pi`` (:func:`ld_sequence_logps`).
    """
    check_same_shape(("token_logps", "loss_mask", "pair_ids", "pair_sides"),
                     (token_logps, loss_mask, pair_ids, pair_sides), "[B, L]")
    mask = f32(loss_mask)
    lc, lr = pair_sums(mask, pair_ids, pair_sides, num_pairs)
    weights = mask
    if ld_alpha is not None:
        # Each token's rank among its reply's tokens: the running count of response tokens minus the count
        # before its slot (slots are contiguous, so that count is the slot's smallest running count - m).
        idx = _slot_index(pair_ids, pair_sides, num_pairs)
        count = jnp.cumsum(mask, axis=1)
        start = jax.vmap(lambda v, i: jax.ops.segment_min(v, i, num_segments=2 * num_pairs + 1))(count - mask, idx)
        rank = count - jnp.take_along_axis(start, idx, axis=1)
        shared = jnp.take_along_axis(jnp.minimum(lc, lr), jnp.clip(pair_ids - 1, 0, num_pairs - 1), axis=1)
        weights = jnp.where(rank <= shared, 1.0, ld_alpha) * mask
    pc, pr = pair_sums(token_logps * weights, pair_ids, pair_sides, num_pairs)
    return pc, pr, lc, lr


def ld_sequence_logps(chosen_token_logps, chosen_mask, rejected_token_logps, rejected_mask, ld_alpha):
    """LD-DPO's (Liu et al. 2024, length desensitization; TRL's ``ld_alpha``) ``(pi_c, pi_r, len_c, len_r)``.

    With ``n = min(len_c, len_r)`` a pair's shared length, each reply's
    first ``n`` response tokens count fully and the rest by ``ld_alpha``:
    ``pi = sum_t logp_t m_t (1 if rank_t <= n else ld_alpha)``, ``rank_t =
    sum_{s <= t} m_s``. ``ld_alpha = 1`` is plain DPO's sum; 0 drops the
    longer reply's excess. Lengths are the plain ``sum_t m_t``. Inputs
    ``[B, L]`` per side (lengths may differ between sides).
    """
    mc, mr = f32(chosen_mask), f32(rejected_mask)
    lc, lr = jnp.sum(mc, axis=-1), jnp.sum(mr, axis=-1)
    shared = jnp.minimum(lc, lr)[..., None]
    weight = lambda m: jnp.where(jnp.cumsum(m, axis=-1) <= shared, 1.0, ld_alpha) * m  # noqa: E731
    pc = jnp.sum(f32(chosen_token_logps) * weight(mc), axis=-1)
    pr = jnp.sum(f32(rejected_token_logps) * weight(mr), axis=-1)
    return pc, pr, lc, lr


def wpo_weights(token_logps, log_sum_sq, loss_mask):
    """WPO's weight of each sequence (Zhou et al. 2024, eq. 2; TRL's ``use_weighting``), without gradient.

    ``w = exp( sum_t (log p(y_t) - log sum_v p_v(t)^2) m_t / max(sum_t m_t, 1) )``:
    the geometric mean over the response tokens of ``p(y_t) / sum_v p_v^2``,
    the probability of the token against the policy's own expected
    probability of what it samples, so off-policy pairs weigh less.
    ``log_sum_sq``: ``log sum_v p_v^2`` per position
    (:func:`jaxpost.models.heads.token_logprobs` with ``return_log_sum_sq``).
    Inputs ``[..., L]``; returns ``[...]``.
    """
    aligned = jax.lax.stop_gradient(f32(token_logps) - f32(log_sum_sq))
    return jnp.exp(mean_sequence_logps(aligned, loss_mask))


def packed_wpo_weights(token_logps, log_sum_sq, loss_mask, pair_ids, pair_sides, num_pairs: int):
    """:func:`wpo_weights` for packed rows: ``(w_c, w_r)``, each ``[B, K]`` (1 for empty slots)."""
    aligned = jax.lax.stop_gradient(f32(token_logps) - f32(log_sum_sq))
    ac, ar, lc, lr = packed_sequence_logps(aligned, loss_mask, pair_ids, pair_sides, num_pairs)
    return jnp.exp(average_logps(ac, lc)), jnp.exp(average_logps(ar, lr))
