"""Reward-model training: Bradley-Terry pairwise loss and last-token selection.

Bradley-Terry (Bradley & Terry 1952; as used for RLHF reward models by
Ouyang et al. 2022 and TRL's ``RewardTrainer``)::

    loss = mean_pairs( -log sigmoid(r_c - r_r - margin) )
           + center_coef * mean_pairs( (r_c + r_r)^2 )

The optional per-pair ``margin`` is Llama-2's margin term (Touvron et al.
2023); the centering term (Eisenstein et al. 2023, TRL's
``center_rewards_coefficient``) pulls rewards towards zero mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpost.losses.checks import check_rank, check_same_shape, f32
from jaxpost.losses.stats import masked_mean


def last_token_index(mask_or_segment_ids):
    """Index of the last real token of each row: ``max{t : x[b, t] != 0}``.

    Args:
      mask_or_segment_ids: ``[B,L]``, a float {0,1} mask or int segment ids
        (0 = padding). Any padding layout works (left, right or both).

    Returns:
      ``[B]`` int32. A row with no real token returns 0 (so gathering with it
      stays in bounds); callers that can produce empty rows should mask them.
    """
    check_rank("mask_or_segment_ids", mask_or_segment_ids, 2, "[B,L]")
    x = jnp.asarray(mask_or_segment_ids)
    pos = jnp.arange(x.shape[1], dtype=jnp.int32)
    return jnp.max(jnp.where(x != 0, pos[None, :], 0), axis=1).astype(jnp.int32)


def segment_last_token_indices(segment_ids, num_segments: int):
    """Index of the last token of each packed segment ``1..num_segments`` per row.

    Returns ``[B, num_segments]`` int32; ``-1`` where a row has no such segment.
    """
    check_rank("segment_ids", segment_ids, 2, "[B,L]")
    seg = jnp.asarray(segment_ids)
    pos = jnp.arange(seg.shape[1], dtype=jnp.int32)
    ids = jnp.arange(1, num_segments + 1, dtype=seg.dtype)
    hit = seg[:, None, :] == ids[None, :, None]          # [B,S,L]
    return jnp.max(jnp.where(hit, pos[None, None, :], -1), axis=2).astype(jnp.int32)


def gather_last(scores, mask_or_segment_ids):
    """``scores[b, last_token_index(mask)[b]]``: the score at each row's last real token. ``[B,L] -> [B]``."""
    check_same_shape(("scores", "mask_or_segment_ids"), (scores, mask_or_segment_ids), "[B,L]")
    idx = last_token_index(mask_or_segment_ids)
    return jnp.take_along_axis(f32(scores), idx[:, None], axis=1)[:, 0]


def bradley_terry_loss(chosen_rewards, rejected_rewards, margin=None, center_coef: float = 0.0,
                       pair_mask=None):
    """Pairwise reward-model loss, see the module docstring for the formula.

    Args:
      chosen_rewards, rejected_rewards: ``[B]`` scalar rewards per pair.
      margin: optional ``[B]`` required margin per pair (0 when None).
      center_coef: weight of the centering term ``mean((r_c + r_r)^2)``.
      pair_mask: optional ``[B]`` float {0,1}; 0 marks padding pairs that must
        not count (means are over real pairs only).

    Returns ``(loss, metrics)``; metrics: ``loss``, ``accuracy`` (fraction
    with ``r_c > r_r``, ties count as wrong), ``margin`` (mean ``r_c - r_r``),
    ``rewards/chosen``, ``rewards/rejected``, ``rewards/mean`` and
    ``rewards/std`` (population std over all 2B rewards).
    """
    check_rank("chosen_rewards", chosen_rewards, 1, "[B]")
    check_same_shape(("chosen_rewards", "rejected_rewards", "margin", "pair_mask"),
                     (chosen_rewards, rejected_rewards, margin, pair_mask), "[B]")
    rc, rr = f32(chosen_rewards), f32(rejected_rewards)
    m = jnp.ones_like(rc) if pair_mask is None else f32(pair_mask)
    diff = rc - rr
    logits = diff if margin is None else diff - f32(margin)
    loss = masked_mean(-jax.nn.log_sigmoid(logits), m)
    loss = loss + center_coef * masked_mean(jnp.square(rc + rr), m)
    both, mm = jnp.concatenate([rc, rr]), jnp.concatenate([m, m])
    mean = masked_mean(both, mm)
    std = jnp.sqrt(masked_mean(jnp.square(both - mean), mm))
    metrics = {
        "loss": loss,
        "accuracy": masked_mean((diff > 0).astype(jnp.float32), m),
        "margin": masked_mean(diff, m),
        "rewards/chosen": masked_mean(rc, m),
        "rewards/rejected": masked_mean(rr, m),
        "rewards/mean": mean,
        "rewards/std": std,
    }
    return loss, metrics
