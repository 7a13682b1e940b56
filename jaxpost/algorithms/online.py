"""Online RL algorithms over rollout batches: PPO (policy + value) and GRPO/RLOO.

A rollout batch is the LM batch of prompt + sampled completion (``LM_KEYS``,
``loss_mask`` = 1 on the sampled completion tokens, the actions) plus what
the rollout measured before any update (``ROLLOUT_KEYS``, ``GRPO_KEYS`` and
``PPO_KEYS`` in :mod:`jaxpost.algorithms.batch`). Every
per-token array is aligned with ``targets``: entry ``t`` belongs to the
action ``targets[t]`` taken from the state that ends at ``tokens[t]``.

The math lives in :mod:`jaxpost.losses.ppo` and :mod:`jaxpost.losses.grpo`;
this module runs the models and feeds it.
"""

from __future__ import annotations

from typing import Mapping

import gin
import jax
import jax.numpy as jnp

from jaxpost.algorithms.batch import GRPO_KEYS, PPO_KEYS, check_batch
from jaxpost.algorithms.lm import lm_token_logprobs
from jaxpost.config import checks_values_of
from jaxpost.errors import UserError, require
from jaxpost.losses.grpo import (ADVANTAGES, AGGREGATIONS, RATIO_LEVELS, SURROGATES, grpo_loss,
                                 high_entropy_mask, off_policy_sequence_mask)
from jaxpost.losses.ppo import gae, ppo_policy_loss, ppo_token_rewards, ppo_value_loss
from jaxpost.losses.stats import masked_mean, whiten
from jaxpost.models import forward
from jaxpost.models.config import ModelConfig
from jaxpost.models.heads import scores as score_head


def token_values(graphdef, params, batch: Mapping) -> jax.Array:
    """Value-model estimates ``V(s_t)`` ``[B,L]``: the ``score`` head at every position.

    ``V[b, t]`` is read at the last token of the state ``tokens[b, :t+1]``,
    the same hidden state whose LM head predicts ``targets[b, t]``.
    """
    hidden, _ = forward(graphdef, params, batch["tokens"], batch["positions"], batch["segment_ids"])
    return score_head(params, hidden)


def make_rollout_logprobs(graphdef, config: ModelConfig, value_graphdef=None, chunk_size: int = 512):
    """``measure(policy, reference, value, batch) -> dict`` of ``[B,L]`` rollout quantities.

    ``old_logp = log pi(targets)`` and ``ref_logp = log pi_ref(targets)``
    from training forwards (not the sampler), so the first update's ratio
    ``exp(logp - old_logp)`` is exactly 1; ``old_values`` from the value
    model when ``value_graphdef`` is given (``value`` may be None
    otherwise); ``token_entropy`` of the policy. All zero outside
    ``loss_mask``. Pure; jit it.
    """
    def measure(policy, reference, value, batch):
        mask = batch["loss_mask"]
        logp, ent = lm_token_logprobs(graphdef, config, policy, batch, chunk_size=chunk_size, return_entropy=True)
        ref = lm_token_logprobs(graphdef, config, reference, batch, chunk_size=chunk_size)
        out = {"old_logp": logp * mask, "ref_logp": ref * mask, "token_entropy": ent * mask}
        if value_graphdef is not None:
            out["old_values"] = token_values(value_graphdef, value, batch) * mask
        return out

    return measure


def ppo_advantages(old_logp, ref_logp, old_values, scores, mask, kl_coef, *, kl_estimator: str = "k1",
                   gamma: float = 1.0, lam: float = 0.95, whiten_rewards: bool = False,
                   whiten_advantages: bool = True):
    """Per-token rewards, GAE and whitening of one rollout batch (TRL's PPO recipe).

    ``rewards = -kl_coef * kl_estimator(old_logp, ref_logp) + score at the last token``
    (:func:`ppo_token_rewards`; ``scores`` ``[B]`` already carry any
    missing-EOS penalty), optionally whitened without shifting the mean;
    ``adv, returns = gae(rewards, old_values, mask, gamma, lam)``; ``adv``
    whitened over all masked tokens of the batch when ``whiten_advantages``.

    Returns ``(advantages [B,L], returns [B,L], metrics)``; metrics are those
    of :func:`ppo_token_rewards` (``objective/kl``, ``objective/scores``,
    ``objective/non_score_reward``, ``objective/rlhf_reward``).
    """
    rewards, metrics = ppo_token_rewards(old_logp, ref_logp, scores, mask, kl_coef, kl_estimator)
    if whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False)
    adv, returns = gae(rewards, old_values, mask, gamma, lam)
    if whiten_advantages:
        adv = whiten(adv, mask)
    return adv, returns, metrics


@checks_values_of("make_ppo_loss")
def check_ppo_loss_values(clip_eps: float = 0.2, clip_eps_high: float | None = None, vf_coef: float = 0.1,
                          value_clip: float = 0.2) -> None:
    """Raises :class:`~jaxpost.errors.UserError` naming the ``make_ppo_loss`` key of an out-of-range value."""
    require("make_ppo_loss.clip_eps", clip_eps, 0 < clip_eps < 1, "in (0, 1)")
    require("make_ppo_loss.clip_eps_high", clip_eps_high, clip_eps_high is None or clip_eps_high > 0,
            "None (= clip_eps) or > 0")
    require("make_ppo_loss.vf_coef", vf_coef, vf_coef >= 0, ">= 0")
    require("make_ppo_loss.value_clip", value_clip, value_clip > 0, "> 0")


@gin.configurable(denylist=["graphdef", "config", "value_graphdef"])
def make_ppo_loss(graphdef, config: ModelConfig, value_graphdef, clip_eps: float = 0.2,
                  clip_eps_high: float | None = None, vf_coef: float = 0.1, value_clip: float = 0.2,
                  chunk_size: int = 512):
    """``loss(params, batch, frozen)`` with ``params = {"policy": ..., "value": ...}``.

    ``loss = ppo_policy_loss(logp, old_logp, advantages) + vf_coef * ppo_value_loss(V, old_values, returns)``,
    both token means over ``loss_mask`` (clip ranges ``clip_eps`` /
    ``clip_eps_high`` for the ratio, ``value_clip`` for the value). Batch
    spec :data:`PPO_KEYS`. Metrics (TRL names): ``loss/policy``,
    ``loss/value``, ``policy/approxkl``, ``policy/clipfrac``,
    ``policy/entropy`` (token mean), ``val/clipfrac``, ``val/vpred``,
    ``val/ratio``, ``loss_tokens``.
    """
    check_ppo_loss_values(clip_eps, clip_eps_high, vf_coef, value_clip)

    def loss_fn(params, batch, frozen=None):
        check_batch(batch, PPO_KEYS, "PPO")
        mask = batch["loss_mask"]
        logp, ent = lm_token_logprobs(graphdef, config, params["policy"], batch, chunk_size=chunk_size,
                                      return_entropy=True)
        values = token_values(value_graphdef, params["value"], batch)
        pl, pm = ppo_policy_loss(logp, batch["old_logp"], batch["advantages"], mask, clip_eps, clip_eps_high)
        vl, vm = ppo_value_loss(values, batch["old_values"], batch["returns"], mask, value_clip)
        loss = pl + vf_coef * vl
        metrics = {**pm, **vm, "loss": loss, "policy/entropy": masked_mean(ent, mask)}
        return loss, metrics

    return loss_fn


def check_grpo_advantage(advantage: str, group_size: int, environment: bool) -> None:
    """Raises :class:`~jaxpost.errors.UserError` for a ``grpo.advantage`` the run cannot compute: an unknown
    one, any with groups of one completion, ``gdpo`` (per-term normalisation) on an environment's single score."""
    if advantage not in ADVANTAGES:
        raise UserError(f"grpo.advantage={advantage!r} is unknown; choose one of {ADVANTAGES}")
    if advantage == "gdpo" and environment:
        raise UserError("grpo.advantage='gdpo' normalises each reward term on its own; an environment's episodes "
                        "have one score (use 'grpo')")
    if group_size < 2:
        raise UserError(f"grpo.advantage={advantage!r} needs RolloutConfig.group_size >= 2, got {group_size}")


@checks_values_of("make_grpo_loss")
def check_grpo_loss_values(clip_eps_low: float = 0.2, clip_eps_high: float | None = None, beta: float = 0.0,
                           aggregation: str = "sequence", max_len: int | None = None,
                           ratio_level: str = "token", delta: float | None = None,
                           top_entropy_quantile: float = 1.0, surrogate: str = "clip", cispo_max_ratio: float = 5.0,
                           sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05,
                           off_policy_mask_threshold: float | None = None, kl_ratio_correction: bool = False,
                           entropy_coef: float = 0.0, vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0,
                           vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0) -> None:
    """Raises :class:`~jaxpost.errors.UserError` naming the ``make_grpo_loss`` key of an out-of-range value."""
    require("make_grpo_loss.aggregation", aggregation, aggregation in AGGREGATIONS,
            "one of " + ", ".join(map(repr, AGGREGATIONS)))
    require("make_grpo_loss.ratio_level", ratio_level, ratio_level in RATIO_LEVELS,
            "one of " + ", ".join(map(repr, RATIO_LEVELS)))
    require("make_grpo_loss.clip_eps_low", clip_eps_low, 0 < clip_eps_low < 1, "in (0, 1)")
    require("make_grpo_loss.clip_eps_high", clip_eps_high, clip_eps_high is None or clip_eps_high > 0,
            "None (= clip_eps_low) or > 0")
    require("make_grpo_loss.beta", beta, beta >= 0, ">= 0 (0: no KL term)")
    require("make_grpo_loss.max_len", max_len, max_len is None or max_len >= 1, "None or >= 1")
    high = clip_eps_low if clip_eps_high is None else clip_eps_high
    require("make_grpo_loss.delta", delta, delta is None or delta > 1 + high,
            f"None (off) or > 1 + the upper clip range = {1 + high:g}")
    require("make_grpo_loss.top_entropy_quantile", top_entropy_quantile, 0 < top_entropy_quantile <= 1,
            "in (0, 1] (1 = every token)")
    require("make_grpo_loss.surrogate", surrogate, surrogate in SURROGATES, "one of " + ", ".join(map(repr, SURROGATES)))
    require("make_grpo_loss.delta", delta, delta is None or surrogate == "clip",
            f"None with surrogate={surrogate!r} (delta caps the clipped surrogate's ratio)")
    require("make_grpo_loss.cispo_max_ratio", cispo_max_ratio, cispo_max_ratio > 0, "> 0")
    for key, tau in (("sapo_temperature_pos", sapo_temperature_pos), ("sapo_temperature_neg", sapo_temperature_neg)):
        require(f"make_grpo_loss.{key}", tau, tau > 0, "> 0")
    require("make_grpo_loss.off_policy_mask_threshold", off_policy_mask_threshold,
            off_policy_mask_threshold is None or off_policy_mask_threshold > 0, "None (off) or > 0")
    require("make_grpo_loss.entropy_coef", entropy_coef, entropy_coef >= 0, ">= 0 (0: no entropy bonus)")
    for key, k in (("vespo_k_pos", vespo_k_pos), ("vespo_k_neg", vespo_k_neg)):
        require(f"make_grpo_loss.{key}", k, k >= 0, ">= 0")
    for key, lam in (("vespo_lambda_pos", vespo_lambda_pos), ("vespo_lambda_neg", vespo_lambda_neg)):
        require(f"make_grpo_loss.{key}", lam, lam > 0, "> 0")


@gin.configurable(denylist=["graphdef", "config"])
def make_grpo_loss(graphdef, config: ModelConfig, clip_eps_low: float = 0.2, clip_eps_high: float | None = None,
                   beta: float = 0.0, aggregation: str = "sequence", max_len: int | None = None,
                   ratio_level: str = "token", delta: float | None = None, top_entropy_quantile: float = 1.0,
                   surrogate: str = "clip", cispo_max_ratio: float = 5.0, sapo_temperature_pos: float = 1.0,
                   sapo_temperature_neg: float = 1.05, off_policy_mask_threshold: float | None = None,
                   kl_ratio_correction: bool = False, entropy_coef: float = 0.0, vespo_k_pos: float = 2.0,
                   vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0,
                   chunk_size: int = 512):
    """``loss(params, batch, frozen)`` = :func:`grpo_loss` of the policy on a rollout batch.

    Batch spec :data:`~jaxpost.algorithms.batch.GRPO_KEYS`: rollout keys plus ``advantages`` ``[B]`` (GRPO,
    Dr. GRPO or RLOO, computed per rollout). ``beta`` weighs the k3 KL to
    the reference (``ref_logp``); ``aggregation`` is ``sequence``, ``token``,
    ``dr_grpo`` (normaliser ``B * max_len``: set ``max_len`` to the
    generation budget) or ``luspo`` (each sequence's summed loss, averaged
    over sequences: LUSPO, with ``ratio_level='sequence'``); ``ratio_level``
    is ``token`` (GRPO) or ``sequence`` (GSPO: one length-normalised ratio
    per sequence); ``delta`` caps the
    unclipped ratio (two-sided clipping, TRL's ``delta``);
    ``top_entropy_quantile < 1`` (TRL's; Wang et al. 2025) trains the
    surrogate on that top fraction of the batch's tokens by the current
    policy's entropy only (:func:`~jaxpost.losses.grpo.high_entropy_mask`,
    over the global batch, or each micro-batch under gradient
    accumulation), the KL term and the normaliser on every token.
    ``surrogate`` is ``clip`` (GRPO/DAPO), ``cispo``, ``sapo`` or ``vespo``
    (TRL's ``loss_type``; the formulas are :func:`grpo_loss`'s; pair
    ``cispo`` and ``vespo`` with ``aggregation='token'``, as TRL does).
    ``cispo_max_ratio`` caps CISPO's weight ``min(ratio, max)``, which
    carries no gradient (TRL's
    ``epsilon_high`` under ``loss_type='cispo'``; ScaleRL's 5.0).
    ``sapo_temperature_pos`` is SAPO's gate temperature where ``A > 0``.
    ``sapo_temperature_neg`` is SAPO's gate temperature where ``A <= 0``.
    ``vespo_k_pos`` is the exponent ``k`` of VESPO's weight where ``A >= 0``.
    ``vespo_lambda_pos`` is its rate ``lambda`` where ``A >= 0``.
    ``vespo_k_neg`` is the exponent ``k`` where ``A < 0``.
    ``vespo_lambda_neg`` is the rate ``lambda`` where ``A < 0``.
    ``off_policy_mask_threshold``
    (DeepSeek-V3.2, TRL's) drops from the policy term the sequences with
    ``A < 0`` whose mean KL from the rollout's log-probs to the current
    policy exceeds it (:func:`~jaxpost.losses.grpo.off_policy_sequence_mask`);
    ``kl_ratio_correction`` multiplies the KL term by the ratio (TRL's
    ``use_bias_correction_kl``). ``entropy_coef`` (TRL's, verl's
    ``entropy_coeff``) subtracts ``entropy_coef * H``, ``H`` the policy's mean
    per-token entropy over the completion tokens (those the entropy mask
    keeps, when it is on), whatever the aggregation: an exploration bonus
    that keeps the policy from collapsing. Metrics: those of
    :func:`grpo_loss` plus ``policy/approxkl`` (``0.5 *
    mean_mask((logp - old_logp)^2)``), with the entropy mask
    ``policy/entropy_kept_fraction``, with the off-policy mask
    ``policy/off_policy_masked_fraction`` (of the sequences), with the bonus
    ``policy/entropy`` (``H``) and ``policy_loss`` (the loss before it).
    """
    check_grpo_loss_values(clip_eps_low, clip_eps_high, beta, aggregation, max_len, ratio_level, delta,
                           top_entropy_quantile, surrogate, cispo_max_ratio, sapo_temperature_pos,
                           sapo_temperature_neg, off_policy_mask_threshold, kl_ratio_correction, entropy_coef,
                           vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg)

    def loss_fn(params, batch, frozen=None):
        check_batch(batch, GRPO_KEYS, "GRPO")
        mask = batch["loss_mask"]
        masked, bonus = top_entropy_quantile < 1.0, entropy_coef > 0
        out = lm_token_logprobs(graphdef, config, params, batch, chunk_size=chunk_size,
                                return_entropy=masked or bonus)
        logp, entropy = out if masked or bonus else (out, None)
        weights = high_entropy_mask(entropy, mask, top_entropy_quantile) if masked else None
        bonus_mask = mask if weights is None else mask * weights  # TRL's: the entropy mask's tokens, if any
        kept = {}
        if weights is not None:
            kept["policy/entropy_kept_fraction"] = jnp.sum(weights) / jnp.maximum(jnp.sum(mask), 1.0)
        if off_policy_mask_threshold is not None:
            keep = off_policy_sequence_mask(logp, batch["old_logp"], batch["advantages"], mask,
                                            off_policy_mask_threshold)
            rows = (jnp.sum(mask, axis=1, keepdims=True) > 0).astype(jnp.float32)
            kept["policy/off_policy_masked_fraction"] = jnp.sum((1.0 - keep) * rows) / jnp.maximum(jnp.sum(rows), 1.0)
            weights = keep if weights is None else weights * keep
        loss, metrics = grpo_loss(logp, batch["old_logp"], batch["ref_logp"], batch["advantages"], mask,
                                  clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high, beta=beta,
                                  aggregation=aggregation, max_len=max_len, ratio_level=ratio_level, delta=delta,
                                  policy_weights=weights, surrogate=surrogate, cispo_max_ratio=cispo_max_ratio,
                                  sapo_temperatures=(sapo_temperature_pos, sapo_temperature_neg),
                                  kl_ratio_correction=kl_ratio_correction,
                                  vespo_gamma=(vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg))
        metrics.update(kept)
        if bonus:
            metrics["policy/entropy"] = masked_mean(entropy, bonus_mask)
            metrics["policy_loss"] = loss
            loss = metrics["loss"] = loss - entropy_coef * metrics["policy/entropy"]
        d = jnp.where(mask != 0, logp - batch["old_logp"], 0.0)
        metrics["policy/approxkl"] = 0.5 * masked_mean(jnp.square(d), mask)
        return loss, metrics

    loss_fn.beta = beta  # 0: the loss reads no reference, and ReferenceSync refuses to follow the policy
    return loss_fn
