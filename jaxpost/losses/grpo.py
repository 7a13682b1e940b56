"""Group-relative policy optimisation: GRPO, Dr. GRPO, DAPO-style clipping, RLOO, GSPO.

References: Shao et al. 2024 (GRPO, DeepSeekMath), Liu et al. 2025
(Dr. GRPO), Yu et al. 2025 (DAPO: clip-higher, token-level aggregation),
Ahmadian et al. 2024 (RLOO), Kool et al. 2019 (leave-one-out baseline),
Zheng et al. 2025 (GSPO: one length-normalised importance ratio per sequence).

Rewards and advantages are ``[B]`` with ``B = num_prompts * group_size``
and the completions of one prompt contiguous (rows ``g*G .. g*G+G-1``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpost.losses.checks import check_rank, check_same_shape, f32
from jaxpost.losses.stats import masked_mean

AGGREGATIONS = ("sequence", "token", "dr_grpo")
ADVANTAGES = ("grpo", "dr_grpo", "rloo", "grpo_batch_std")
SCALES = ("group", "batch", "none")
RATIO_LEVELS = ("token", "sequence")


def _groups(rewards, group_size: int):
    check_rank("rewards", rewards, 1, "[B*G]")
    n = jnp.shape(rewards)[0]
    if group_size < 2 or n % group_size:
        raise ValueError(f"rewards of length {n} cannot be split into groups of group_size={group_size} "
                         "(need group_size >= 2 dividing the length)")
    return f32(rewards).reshape(n // group_size, group_size)


def group_advantages(rewards, group_size: int, scale: str = "group", eps: float = 1e-4):
    """GRPO advantages: ``A_i = (r_i - mean_g(r)) / (std(r) + eps)``.

    ``mean_g`` is over the ``group_size`` completions of the same prompt.
    ``scale`` picks the ``std`` (the unbiased sample std, ``ddof=1``, as
    TRL's torch ``std``): ``"group"``, over the same group (GRPO);
    ``"batch"``, over every reward of the batch (TRL's
    ``scale_rewards="batch"``; the group-mean, batch-std normalisation of Liu
    et al. 2025, "Tricks or Traps?", which keeps a group of near-equal rewards
    from being blown up to unit scale); ``"none"``, no division (Dr. GRPO,
    Liu et al. 2025, which removes the question-difficulty bias). Returns ``[B*G]``.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    r = _groups(rewards, group_size)
    adv = r - jnp.mean(r, axis=1, keepdims=True)
    if scale == "group":
        adv = adv / (jnp.std(r, axis=1, keepdims=True, ddof=1) + eps)
    elif scale == "batch":
        adv = adv / (jnp.std(r, ddof=1) + eps)
    return adv.reshape(-1)


def rloo_advantages(rewards, group_size: int):
    """RLOO advantages: ``A_i = r_i - mean_{j != i} r_j = (G r_i - sum_j r_j) / (G - 1)``. Returns ``[B*G]``."""
    r = _groups(rewards, group_size)
    g = group_size
    return ((r - (jnp.sum(r, axis=1, keepdims=True) - r) / (g - 1))).reshape(-1)


def advantages_of(rewards, group_size: int, kind: str):
    """``[B*G]`` advantages of contiguous groups' rewards: ``grpo`` (:func:`group_advantages`), ``dr_grpo``
    (the same unscaled), ``grpo_batch_std`` (scaled by the batch's std) or ``rloo`` (:func:`rloo_advantages`)."""
    if kind == "rloo":
        return rloo_advantages(rewards, group_size)
    scales = {"grpo": "group", "dr_grpo": "none", "grpo_batch_std": "batch"}
    if kind in scales:
        return group_advantages(rewards, group_size, scale=scales[kind])
    raise ValueError(f"Unknown advantage estimator {kind!r}; choose one of {ADVANTAGES}")


def high_entropy_mask(entropy, mask, top_quantile: float):
    """``[B,L]`` float: 1 on the tokens of ``mask`` whose entropy is at least the ``1 - top_quantile`` quantile.

    The quantile is over the entropies of all tokens of ``mask`` in the
    batch, interpolated linearly (``torch.quantile``'s rule, which TRL's
    ``get_high_entropy_mask`` uses); ``top_quantile = 1`` keeps every
    token of ``mask``, ``0.2`` about the fifth with the highest entropy. The
    mask carries no gradient.
    """
    if not 0.0 < top_quantile <= 1.0:
        raise ValueError(f"top_quantile must be in (0, 1], got {top_quantile}")
    valid = f32(mask) != 0
    entropy = jax.lax.stop_gradient(f32(entropy))
    threshold = jnp.nanquantile(jnp.where(valid, entropy, jnp.nan), 1.0 - top_quantile)
    return (valid & (entropy >= threshold)).astype(jnp.float32)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, *, clip_eps_low: float = 0.2,
              clip_eps_high: float | None = None, beta: float = 0.0, aggregation: str = "sequence",
              max_len: int | None = None, ratio_level: str = "token", delta: float | None = None,
              policy_weights=None):
    """GRPO clipped surrogate with optional k3 KL to the reference.

    Per token, with ``ratio = exp(logp - old_logp)`` and the row's advantage ``A``::

        l_t = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
              + beta * (exp(ref - logp) - (ref - logp) - 1)

    ``ratio_level="sequence"`` (GSPO, Zheng et al. 2025; TRL's
    ``importance_sampling_level="sequence"``) replaces every token's ratio
    by its sequence's length-normalised one,
    ``s = exp(sum_t m_t (logp_t - old_t) / max(sum_t m_t, 1))``, so that a
    sequence is clipped as a whole (GSPO's clip range is about 1e-3 wide:
    ``configs/algorithms/gspo.gin``).

    ``delta`` (two-sided clipping, INTELLECT-2; TRL's ``delta``) caps the
    unclipped term's ratio: ``l_t = -min(min(ratio, delta) * A, clip(ratio) * A)``.
    With ``A < 0`` the plain surrogate grows without bound in ``ratio``;
    capped, a token far off-policy moves the loss by at most ``delta * |A|``.
    ``A > 0`` is unchanged when ``delta > 1 + eps_high``.

    ``policy_weights`` ``[B,L]`` (None: 1) multiplies each token's surrogate
    term, not its KL term nor the normalisers below: TRL's
    ``top_entropy_quantile`` passes its high-entropy mask so (Wang et al.
    2025, "Beyond the 80/20 rule": train on the forking tokens only).

    aggregated over the ``mask`` by ``aggregation``:

    - ``"sequence"`` (GRPO paper): ``mean_b( sum_t l * m / max(sum_t m, 1) )``;
    - ``"token"`` (DAPO; TRL ``bnpo``): ``sum(l * m) / max(sum(m), 1)``;
    - ``"dr_grpo"`` (Dr. GRPO): ``sum(l * m) / (B * max_len)``, a constant
      normaliser (``max_len`` defaults to ``L``, set it to the generation
      budget so the scale does not depend on padding).

    Args:
      logp: ``[B,L]`` current policy log-probs of the sampled tokens.
      old_logp: ``[B,L]`` log-probs at sampling time, or None for a single
        on-policy update (then ``old_logp = stop_gradient(logp)``: ratio 1,
        gradient ``-A * grad logp``).
      ref_logp: ``[B,L]`` reference log-probs, or None (required if ``beta != 0``).
      advantages: ``[B]`` per-sequence (or ``[B,L]`` per-token) advantages.
      mask: ``[B,L]`` float {0,1} completion mask.
      clip_eps_low, clip_eps_high: clip range; ``clip_eps_high`` defaults to
        ``clip_eps_low`` (DAPO's clip-higher sets it larger).

    Returns ``(loss, metrics)``; metrics (TRL): ``loss``, ``kl`` (token mean
    of k3, when ``ref_logp`` is given), ``clip_ratio/low_mean`` (tokens with
    ``ratio < 1 - eps_low`` and ``A < 0``), ``clip_ratio/high_mean``
    (``ratio > 1 + eps_high`` and ``A > 0``), ``clip_ratio/region_mean``
    (either), ``loss_tokens``.
    """
    check_rank("logp", logp, 2, "[B,L]")
    check_same_shape(("logp", "old_logp", "ref_logp", "mask"), (logp, old_logp, ref_logp, mask), "[B,L]")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"Unknown aggregation {aggregation!r}; choose one of {AGGREGATIONS}")
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"Unknown ratio_level {ratio_level!r}; choose one of {RATIO_LEVELS}")
    if delta is not None and not delta > 1.0:
        raise ValueError(f"delta must be None or > 1 (the cap of the unclipped ratio), got {delta}")
    if ref_logp is None and (not isinstance(beta, (int, float)) or beta != 0):
        raise ValueError(f"grpo_loss with beta={beta} needs ref_logp ([B,L])")
    logp, mask = f32(logp), f32(mask)
    adv = f32(advantages)
    if adv.ndim == 1:
        if adv.shape[0] != logp.shape[0]:
            raise ValueError(f"advantages must have shape [B]=({logp.shape[0]},) or [B,L], got {adv.shape}")
        adv = adv[:, None]
    elif adv.shape != logp.shape:
        raise ValueError(f"advantages must have shape [B] or [B,L]={logp.shape}, got {adv.shape}")
    eps_high = clip_eps_low if clip_eps_high is None else clip_eps_high
    valid = mask != 0
    old = jax.lax.stop_gradient(logp) if old_logp is None else f32(old_logp)
    # Log-ratios are zeroed at padding before exp so padding garbage cannot overflow.
    log_ratio = jnp.where(valid, logp - old, 0.0)
    if ratio_level == "sequence":
        log_ratio = jnp.sum(log_ratio, axis=1, keepdims=True) / jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1.0)
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1.0 - clip_eps_low, 1.0 + eps_high)
    capped = ratio if delta is None else jnp.minimum(ratio, delta)
    per_token = -jnp.minimum(capped * adv, clipped * adv)
    if policy_weights is not None:
        check_same_shape(("logp", "policy_weights"), (logp, policy_weights), "[B,L]")
        per_token = per_token * f32(policy_weights)
    metrics = {}
    if ref_logp is not None:
        d = jnp.where(valid, f32(ref_logp) - logp, 0.0)
        kl = jnp.expm1(d) - d
        per_token = per_token + beta * kl
        metrics["kl"] = masked_mean(kl, mask)
    per_token = jnp.where(valid, per_token, 0.0)
    if aggregation == "sequence":
        loss = jnp.mean(jnp.sum(per_token, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0))
    elif aggregation == "token":
        loss = jnp.sum(per_token) / jnp.maximum(jnp.sum(mask), 1.0)
    else:
        length = logp.shape[1] if max_len is None else max_len
        loss = jnp.sum(per_token) / (logp.shape[0] * length)
    low_clip = ((ratio < 1.0 - clip_eps_low) & (adv < 0)).astype(jnp.float32)
    high_clip = ((ratio > 1.0 + eps_high) & (adv > 0)).astype(jnp.float32)
    metrics.update({
        "loss": loss,
        "clip_ratio/low_mean": masked_mean(jnp.broadcast_to(low_clip, mask.shape), mask),
        "clip_ratio/high_mean": masked_mean(jnp.broadcast_to(high_clip, mask.shape), mask),
        "clip_ratio/region_mean": masked_mean(jnp.broadcast_to(jnp.maximum(low_clip, high_clip), mask.shape), mask),
        "loss_tokens": jnp.sum(mask),
    })
    return loss, metrics
