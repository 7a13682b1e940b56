"""Group-relative policy optimisation: GRPO, Dr. GRPO, DAPO-style clipping, RLOO, GSPO and their successors.

References: Shao et al. 2024 (GRPO, DeepSeekMath), Liu et al. 2025
(Dr. GRPO), Yu et al. 2025 (DAPO: clip-higher, token-level aggregation),
Ahmadian et al. 2024 (RLOO), Kool et al. 2019 (leave-one-out baseline),
Zheng et al. 2025 (GSPO: one length-normalised importance ratio per sequence),
MiniMax-M1 (arXiv 2506.13585; CISPO: clip the importance weight, not the
update), SAPO (arXiv 2511.20347: a soft, temperature-controlled gate instead
of a hard clip), DeepSeek-V3.2 (arXiv 2512.02556: off-policy sequence
masking, the unbiased KL estimate), GDPO (arXiv 2601.05242: each reward
normalised on its own), LUSPO (arXiv 2602.05261: each sequence's loss
scaled by its length), VESPO (arXiv 2602.10693: a smooth Gamma weight of
the sequence's importance ratio instead of a clip).

Rewards and advantages are ``[B]`` with ``B = num_prompts * group_size``
and the completions of one prompt contiguous (rows ``g*G .. g*G+G-1``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxpost.losses.checks import check_rank, check_same_shape, f32
from jaxpost.losses.stats import masked_mean

AGGREGATIONS = ("sequence", "token", "dr_grpo", "luspo")
ADVANTAGES = ("grpo", "dr_grpo", "rloo", "grpo_batch_std", "gdpo")
SCALES = ("group", "batch", "none")
RATIO_LEVELS = ("token", "sequence")
SURROGATES = ("clip", "cispo", "sapo", "vespo")


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


def gdpo_advantages(term_rewards, weights, group_size: int, eps: float = 1e-4):
    """GDPO advantages (arXiv 2601.05242; TRL's ``multi_objective_aggregation="normalize_then_sum"``).

    Each reward term is normalised within its group first, so that a term
    with a large spread cannot drown the others, then the weighted sum is
    normalised over the batch::

        n_k = (r_k - mean_g(r_k)) / (std_g(r_k) + eps)       # per term, per group
        s   = sum_k w_k n_k
        A   = (s - mean(s)) / (std(s) + eps)                # over the batch

    (sample stds, ``ddof=1``, as TRL's). ``term_rewards`` ``[K, B*G]``: each
    term's unweighted values; ``weights`` ``[K]``. Returns ``[B*G]``.
    """
    r = f32(term_rewards)
    check_rank("term_rewards", r, 2, "[K, B*G]")
    w = f32(weights)
    if w.shape != (r.shape[0],):
        raise ValueError(f"weights must have shape [K]=({r.shape[0]},), got {w.shape}")
    normed = jnp.stack([group_advantages(r[k], group_size, scale="group", eps=eps) for k in range(r.shape[0])])
    total = jnp.sum(w[:, None] * normed, axis=0)
    return (total - jnp.mean(total)) / (jnp.std(total, ddof=1) + eps)


def advantages_of(rewards, group_size: int, kind: str):
    """``[B*G]`` advantages of contiguous groups' rewards: ``grpo`` (:func:`group_advantages`), ``dr_grpo``
    (the same unscaled), ``grpo_batch_std`` (scaled by the batch's std) or ``rloo`` (:func:`rloo_advantages`)."""
    if kind == "rloo":
        return rloo_advantages(rewards, group_size)
    scales = {"grpo": "group", "dr_grpo": "none", "grpo_batch_std": "batch"}
    if kind in scales:
        return group_advantages(rewards, group_size, scale=scales[kind])
    if kind == "gdpo":
        raise ValueError("the 'gdpo' advantage normalises each reward term on its own: call gdpo_advantages with "
                         "the terms' values, not their sum")
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


def off_policy_sequence_mask(logp, sampling_logp, advantages, mask, threshold: float):
    """``[B,1]`` float: 0 on the sequences that both lost (``A < 0``) and drifted off-policy, else 1.

    DeepSeek-V3.2's off-policy sequence masking (TRL's
    ``off_policy_mask_threshold``): a sequence is dropped from the policy
    term when ``A_b < 0`` and ``mean_t m_t (sampling_logp - logp) > threshold``,
    the per-token mean of the sampler-to-policy KL estimate over its
    completion. Negative samples the policy has already moved far from
    teach it little and destabilise it most. No gradient.
    """
    check_same_shape(("logp", "sampling_logp", "mask"), (logp, sampling_logp, mask), "[B,L]")
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    mask = f32(mask)
    kl = jnp.where(mask != 0, f32(sampling_logp) - jax.lax.stop_gradient(f32(logp)), 0.0)
    mean_kl = jnp.sum(kl, axis=1, keepdims=True) / jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1.0)
    adv = f32(advantages)
    adv = adv[:, None] if adv.ndim == 1 else adv
    return ((adv >= 0) | (mean_kl <= threshold)).astype(jnp.float32)


def vespo_weights(token_log_ratio, advantages, mask, gamma: tuple[float, float, float, float] = (2.0, 3.0, 3.0, 2.0)):
    """VESPO's sequence weights ``phi(w) = exp(lam + k log w - lam w)`` ``[B,1]``, no gradient (arXiv 2602.10693).

    ``w = exp(sum_t m_t clip(logp_t - old_t, -20, 20))``, the *summed*
    sequence log-ratio, clipped to ``[log 1e-8, 20]`` in log space;
    ``(k, lam) = gamma[0:2]`` where ``A >= 0``, ``gamma[2:4]`` where
    ``A < 0`` (TRL's ``vespo_k_pos, vespo_lambda_pos, vespo_k_neg,
    vespo_lambda_neg``: 2, 3, 3, 2). ``phi(1) = 1``: on-policy it is
    REINFORCE. Non-finite weights become 0, as TRL's ``nan_to_num``.
    """
    k_pos, lam_pos, k_neg, lam_neg = gamma
    m = f32(mask)
    log_w = jnp.sum(jnp.clip(f32(token_log_ratio), -20.0, 20.0) * m, axis=1, keepdims=True)
    log_w = jnp.clip(log_w, math.log(1e-8), 20.0)
    adv = f32(advantages)
    adv = adv[:, None] if adv.ndim == 1 else adv[:, :1]
    k = jnp.where(adv >= 0, k_pos, k_neg)
    lam = jnp.maximum(jnp.where(adv >= 0, lam_pos, lam_neg), 1e-4)
    phi = jnp.exp(lam + k * log_w - lam * jnp.exp(log_w))
    return jax.lax.stop_gradient(jnp.where(jnp.isfinite(phi), phi, 0.0))


def _surrogate(kind: str, ratio, adv, logp, *, clip_eps_low, eps_high, delta, cispo_max_ratio, sapo_temperatures):
    """Per-token policy term ``l_t`` of :func:`grpo_loss` (its docstring has the formulas), but VESPO's."""
    if kind == "cispo":
        return -jax.lax.stop_gradient(jnp.minimum(ratio, cispo_max_ratio)) * adv * logp
    if kind == "sapo":
        tau_pos, tau_neg = sapo_temperatures
        tau = jnp.where(adv > 0, tau_pos, tau_neg)
        return -jax.nn.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau) * adv
    clipped = jnp.clip(ratio, 1.0 - clip_eps_low, 1.0 + eps_high)
    capped = ratio if delta is None else jnp.minimum(ratio, delta)
    return -jnp.minimum(capped * adv, clipped * adv)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, *, clip_eps_low: float = 0.2,
              clip_eps_high: float | None = None, beta: float = 0.0, aggregation: str = "sequence",
              max_len: int | None = None, ratio_level: str = "token", delta: float | None = None,
              policy_weights=None, surrogate: str = "clip", cispo_max_ratio: float = 5.0,
              sapo_temperatures: tuple[float, float] = (1.0, 1.05), kl_ratio_correction: bool = False,
              vespo_gamma: tuple[float, float, float, float] = (2.0, 3.0, 3.0, 2.0)):
    """GRPO clipped surrogate (or CISPO's, SAPO's or VESPO's) with optional k3 KL to the reference.

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

    ``surrogate`` replaces the clipped term (TRL's ``loss_type``):

    - ``"cispo"`` (MiniMax-M1; ``cispo_max_ratio`` is ScaleRL's
      ``eps_max``, TRL's ``epsilon_high`` under ``loss_type="cispo"``):
      ``l_t = -sg(min(ratio, cispo_max_ratio)) * A * logp_t``. The weight is
      clipped, not the update, so every token keeps a gradient, ``-w * A``.
    - ``"sapo"`` (arXiv 2511.20347): ``l_t = -sigmoid(tau (ratio - 1)) * 4 / tau * A``
      with ``tau = sapo_temperatures[0]`` where ``A > 0``, else ``[1]``. At
      ``ratio = 1`` its gradient is the plain surrogate's; away from 1 it fades
      smoothly instead of stopping at a clip edge.
    - ``"vespo"`` (arXiv 2602.10693): ``l_t = -phi * A * logp_t``, ``phi``
      :func:`vespo_weights` of the sequence (``vespo_gamma``), a smooth,
      asymmetric weight in place of the clip; TRL pairs it with its
      ``dapo`` normaliser (``aggregation='token'``).

    ``kl_ratio_correction`` (DeepSeek-V3.2; TRL's ``use_bias_correction_kl``,
    default True there) multiplies the k3 term by ``ratio``, which makes its
    gradient the unbiased reverse-KL gradient under samples from the old
    policy. The ratio carries gradient, so this changes the KL gradient even
    on-policy, where the ratio's value is 1.

    ``policy_weights`` ``[B,L]`` or ``[B,1]`` (None: 1) multiplies each token's
    surrogate term, not its KL term nor the normalisers below: TRL's
    ``top_entropy_quantile`` passes its high-entropy mask so (Wang et al.
    2025, "Beyond the 80/20 rule": train on the forking tokens only), and
    its ``off_policy_mask_threshold`` :func:`off_policy_sequence_mask`.

    aggregated over the ``mask`` by ``aggregation``:

    - ``"sequence"`` (GRPO paper): ``mean_b( sum_t l * m / max(sum_t m, 1) )``;
    - ``"token"`` (DAPO; TRL ``bnpo``): ``sum(l * m) / max(sum(m), 1)``;
    - ``"dr_grpo"`` (Dr. GRPO): ``sum(l * m) / (B * max_len)``, a constant
      normaliser (``max_len`` defaults to ``L``, set it to the generation
      budget so the scale does not depend on padding);
    - ``"luspo"`` (LUSPO, arXiv 2602.05261; with ``ratio_level="sequence"``
      as the paper): ``mean_b( sum_t l * m )``, each sequence's loss scaled
      by its length.

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
    (either; these three for ``surrogate="clip"``), ``cispo_clip_ratio``
    (``ratio > cispo_max_ratio`` and ``A > 0``; ``"cispo"``),
    ``vespo/phi_seq_mean`` (``"vespo"``), ``loss_tokens``.
    """
    check_rank("logp", logp, 2, "[B,L]")
    check_same_shape(("logp", "old_logp", "ref_logp", "mask"), (logp, old_logp, ref_logp, mask), "[B,L]")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"Unknown aggregation {aggregation!r}; choose one of {AGGREGATIONS}")
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"Unknown ratio_level {ratio_level!r}; choose one of {RATIO_LEVELS}")
    if surrogate not in SURROGATES:
        raise ValueError(f"Unknown surrogate {surrogate!r}; choose one of {SURROGATES}")
    if delta is not None and surrogate != "clip":
        raise ValueError(f"delta caps the clipped surrogate's ratio; surrogate={surrogate!r} has none")
    if min(vespo_gamma[0], vespo_gamma[2]) < 0 or min(vespo_gamma[1], vespo_gamma[3]) <= 0:
        raise ValueError(f"vespo_gamma (k_pos, lambda_pos, k_neg, lambda_neg) needs k >= 0 and lambda > 0, "
                         f"got {vespo_gamma}")
    if not cispo_max_ratio > 0 or min(sapo_temperatures) <= 0:
        raise ValueError(f"cispo_max_ratio and sapo_temperatures must be > 0, got {cispo_max_ratio}, "
                         f"{sapo_temperatures}")
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
    token_log_ratio = jnp.where(valid, logp - old, 0.0)
    log_ratio = token_log_ratio
    if ratio_level == "sequence":
        log_ratio = jnp.sum(log_ratio, axis=1, keepdims=True) / jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1.0)
    ratio = jnp.exp(log_ratio)
    if surrogate == "vespo":  # weighted by the sequence's summed token log-ratios, whatever ratio_level says
        phi = vespo_weights(token_log_ratio, adv, mask, vespo_gamma)
        per_token = -phi * adv * logp
    else:
        per_token = _surrogate(surrogate, ratio, adv, logp, clip_eps_low=clip_eps_low, eps_high=eps_high,
                               delta=delta, cispo_max_ratio=cispo_max_ratio, sapo_temperatures=sapo_temperatures)
    if policy_weights is not None:
        w = f32(policy_weights)
        if w.shape not in (logp.shape, (logp.shape[0], 1)):
            raise ValueError(f"policy_weights must have shape [B,L]={logp.shape} or [B,1], got {w.shape}")
        per_token = per_token * w
    metrics = {}
    if ref_logp is not None:
        d = jnp.where(valid, f32(ref_logp) - logp, 0.0)
        kl = jnp.expm1(d) - d
        per_token = per_token + beta * (kl * ratio if kl_ratio_correction else kl)
        metrics["kl"] = masked_mean(kl, mask)
    per_token = jnp.where(valid, per_token, 0.0)
    if aggregation == "sequence":
        loss = jnp.mean(jnp.sum(per_token, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0))
    elif aggregation == "token":
        loss = jnp.sum(per_token) / jnp.maximum(jnp.sum(mask), 1.0)
    elif aggregation == "luspo":
        loss = jnp.mean(jnp.sum(per_token, axis=1))
    else:
        length = logp.shape[1] if max_len is None else max_len
        loss = jnp.sum(per_token) / (logp.shape[0] * length)
    metrics.update({"loss": loss, "loss_tokens": jnp.sum(mask)})
    share = lambda flags: masked_mean(jnp.broadcast_to(flags.astype(jnp.float32), mask.shape), mask)  # noqa: E731
    if surrogate == "clip":
        low_clip, high_clip = (ratio < 1.0 - clip_eps_low) & (adv < 0), (ratio > 1.0 + eps_high) & (adv > 0)
        metrics.update({"clip_ratio/low_mean": share(low_clip), "clip_ratio/high_mean": share(high_clip),
                        "clip_ratio/region_mean": share(low_clip | high_clip)})
    elif surrogate == "cispo":
        metrics["cispo_clip_ratio"] = share((ratio > cispo_max_ratio) & (adv > 0))
    elif surrogate == "vespo":
        metrics["vespo/phi_seq_mean"] = share(phi)
    return loss, metrics
