"""PPO for RLHF: KL estimators and control, per-token rewards, GAE, clipped losses.

References: Schulman et al. 2017 (PPO), Schulman et al. 2016 (GAE), Ziegler
et al. 2019 (KL-penalised reward and adaptive KL coefficient), Schulman 2020
"Approximating KL divergence" (k1/k2/k3 estimators), Huang et al. 2024
"The N+ implementation details of RLHF with PPO" (TRL conventions).

All per-token arrays are ``[B,L]`` with a float {0,1} ``mask`` marking the
response tokens that are actions; losses are token means over the mask and
also report ``loss_tokens``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxpost.losses.checks import check_rank, check_same_shape, f32
from jaxpost.losses.reward import last_token_index
from jaxpost.losses.stats import entropy_from_logits, masked_mean, masked_var, whiten

__all__ = [
    "kl_estimate", "adaptive_kl_coef", "AdaptiveKLController", "ppo_token_rewards", "gae",
    "ppo_policy_loss", "ppo_value_loss", "masked_mean", "masked_var", "whiten", "entropy_from_logits",
]

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logp, ref_logp, kind: str = "k1"):
    """Per-token estimate of KL(policy || reference) from samples of the policy.

    With ``d = logp - ref_logp`` (log-ratio at the sampled token):

    - ``k1 = d`` (unbiased, high variance, can be negative);
    - ``k2 = d^2 / 2`` (biased, low variance, >= 0);
    - ``k3 = exp(-d) + d - 1 = exp(ref - logp) - (ref - logp) - 1`` (unbiased, >= 0).

    The caller must keep padding positions finite (``k3`` exponentiates).
    """
    check_same_shape(("logp", "ref_logp"), (logp, ref_logp), "as logp")
    d = f32(logp) - f32(ref_logp)
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * jnp.square(d)
    if kind == "k3":
        return jnp.expm1(-d) + d
    raise ValueError(f"Unknown KL estimator {kind!r}; choose one of {KL_ESTIMATORS}")


def adaptive_kl_coef(kl_coef, current_kl, n_steps, target: float, horizon: float):
    """Ziegler et al. 2019 proportional controller for the KL coefficient.

    ``kl_coef * (1 + clip(current_kl / target - 1, -0.2, 0.2) * n_steps / horizon)``,
    where ``n_steps`` is the number of samples (episodes) in the batch that
    produced ``current_kl`` and ``horizon`` the controller's time constant.
    """
    err = jnp.clip(f32(current_kl) / target - 1.0, -0.2, 0.2)
    return f32(kl_coef) * (1.0 + err * f32(n_steps) / horizon)


@dataclasses.dataclass(frozen=True)
class AdaptiveKLController:
    """Holds the controller's constants; the coefficient itself lives in the train state.

    ``target=None`` gives a fixed coefficient (``update`` returns it unchanged).
    """

    target: float | None = 6.0
    horizon: float = 10000.0

    def update(self, kl_coef, current_kl, n_steps):
        """Returns the next coefficient; see :func:`adaptive_kl_coef`."""
        if self.target is None:
            return f32(kl_coef)
        return adaptive_kl_coef(kl_coef, current_kl, n_steps, self.target, self.horizon)


def ppo_token_rewards(logp, ref_logp, scores, mask, kl_coef, kl_estimator: str = "k1",
                      missing_eos=None, missing_eos_penalty: float = 0.0):
    """KL-penalised per-token rewards (Ziegler et al. 2019).

    ``score'_b = score_b - missing_eos_penalty * missing_eos_b`` and::

        rewards[b, t] = -kl_coef * kl[b, t] * mask[b, t] + score'_b * [t == last_b]

    where ``kl`` is :func:`kl_estimate` and ``last_b`` the last response token
    (last index with ``mask == 1``). Rows with an empty mask get no score.

    Args:
      logp, ref_logp: ``[B,L]`` log-probs of the sampled tokens.
      scores: ``[B]`` reward-model scores.
      mask: ``[B,L]`` float {0,1} response mask.
      kl_coef: scalar KL coefficient.
      missing_eos: optional ``[B]`` bool/float, 1 where the response was cut
        before EOS (the caller decides, e.g. from the sampler's ``done``).
      missing_eos_penalty: subtracted from such scores.

    Returns ``(rewards [B,L], metrics)``; metrics (TRL): ``objective/kl``
    (mean over rows of summed KL), ``objective/non_score_reward`` (mean of
    summed ``-kl_coef * kl``), ``objective/scores`` (mean penalised score),
    ``objective/rlhf_reward`` (sum of the two).
    """
    check_rank("logp", logp, 2, "[B,L]")
    check_same_shape(("logp", "ref_logp", "mask"), (logp, ref_logp, mask), "[B,L]")
    check_rank("scores", scores, 1, "[B]")
    check_same_shape(("scores", "missing_eos"), (scores, missing_eos), "[B]")
    if jnp.shape(scores)[0] != jnp.shape(logp)[0]:
        raise ValueError(f"scores must have shape [B]=({logp.shape[0]},), got {jnp.shape(scores)}")
    mask = f32(mask)
    kl = jnp.where(mask != 0, kl_estimate(logp, ref_logp, kl_estimator), 0.0)
    non_score = -f32(kl_coef) * kl
    s = f32(scores)
    if missing_eos is not None:
        s = s - missing_eos_penalty * f32(missing_eos)
    has_tokens = (jnp.sum(mask, axis=1) > 0).astype(jnp.float32)
    at_last = jax.nn.one_hot(last_token_index(mask), mask.shape[1], dtype=jnp.float32)
    rewards = non_score + at_last * (s * has_tokens)[:, None]
    metrics = {
        "objective/kl": jnp.mean(jnp.sum(kl, axis=1)),
        "objective/non_score_reward": jnp.mean(jnp.sum(non_score, axis=1)),
        "objective/scores": jnp.mean(s),
    }
    metrics["objective/rlhf_reward"] = metrics["objective/non_score_reward"] + metrics["objective/scores"]
    return rewards, metrics


def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation (Schulman et al. 2016) by a reverse ``lax.scan``.

    Over the action tokens of a row (``mask == 1``), with ``t'`` the next
    action token after ``t``::

        delta_t = r_t + gamma * V_{t'} - V_t
        A_t     = delta_t + gamma * lam * A_{t'}
        returns = A + V

    and ``V_{t'} = A_{t'} = 0`` after the last action token (the episode
    ends). Positions with ``mask == 0`` are skipped: their rewards/values are
    ignored, their outputs are 0, and the recursion passes over them. For
    right-padded responses this is the usual terminal-at-last-token GAE; for
    masked gaps inside a row (e.g. tool output in multi-turn rollouts) the
    gap is treated as environment time, not as an episode boundary. One row
    holds one episode.

    Returns ``(advantages, returns)``, both ``[B,L]``, zero outside ``mask``.
    """
    check_rank("rewards", rewards, 2, "[B,L]")
    check_same_shape(("rewards", "values", "mask"), (rewards, values, mask), "[B,L]")
    r, v, m = f32(rewards), f32(values), f32(mask)
    gamma, lam = f32(gamma), f32(lam)

    def step(carry, x):
        next_v, next_a = carry
        r_t, v_t, m_t = x
        a_t = r_t + gamma * next_v - v_t + gamma * lam * next_a
        keep = m_t != 0
        return (jnp.where(keep, v_t, next_v), jnp.where(keep, a_t, next_a)), jnp.where(keep, a_t, 0.0)

    zeros = jnp.zeros(r.shape[0], jnp.float32)
    _, adv = jax.lax.scan(step, (zeros, zeros), (r.T, v.T, m.T), reverse=True)
    adv = adv.T
    return adv, jnp.where(m != 0, adv + v, 0.0)


def ppo_policy_loss(logp, old_logp, advantages, mask, clip_eps: float = 0.2,
                    clip_eps_high: float | None = None):
    """PPO clipped surrogate (Schulman et al. 2017), token mean over ``mask``.

    ``ratio = exp(logp - old_logp)``;
    ``loss = mean_mask( max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps_high)) )``
    with ``eps_high = clip_eps_high`` or ``clip_eps`` (asymmetric clipping,
    "clip-higher" of DAPO, Yu et al. 2025).

    Returns ``(loss, metrics)``; metrics: ``loss``, ``loss/policy``,
    ``policy/approxkl`` (``0.5 * mean_mask((logp - old_logp)^2)``, as TRL),
    ``policy/clipfrac`` (fraction of tokens where the clipped term is
    strictly larger, i.e. the gradient is cut), ``val/ratio`` (mean ratio),
    ``loss_tokens``.
    """
    check_rank("logp", logp, 2, "[B,L]")
    check_same_shape(("logp", "old_logp", "advantages", "mask"), (logp, old_logp, advantages, mask), "[B,L]")
    mask = f32(mask)
    # Masked before exp so garbage at padding cannot overflow (and NaN the gradient).
    logratio = jnp.where(mask != 0, f32(logp) - f32(old_logp), 0.0)
    ratio = jnp.exp(logratio)
    adv = f32(advantages)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + high)
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
    metrics = {
        "loss": loss,
        "loss/policy": loss,
        "policy/approxkl": 0.5 * masked_mean(jnp.square(logratio), mask),
        "policy/clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
        "val/ratio": masked_mean(ratio, mask),
        "loss_tokens": jnp.sum(mask),
    }
    return loss, metrics


def ppo_value_loss(values, old_values, returns, mask, clip: float = 0.2):
    """Clipped value loss (TRL / Huang et al. 2024), token mean over ``mask``.

    ``v_clip = old_values + clip(values - old_values, -clip, clip)``;
    ``loss = 0.5 * mean_mask( max((values - returns)^2, (v_clip - returns)^2) )``.

    Returns ``(loss, metrics)``; metrics: ``loss``, ``loss/value``,
    ``val/clipfrac`` (fraction where the clipped error is strictly larger),
    ``val/vpred`` (mean prediction), ``loss_tokens``.
    """
    check_rank("values", values, 2, "[B,L]")
    check_same_shape(("values", "old_values", "returns", "mask"), (values, old_values, returns, mask), "[B,L]")
    v, ov, ret, mask = f32(values), f32(old_values), f32(returns), f32(mask)
    v_clip = ov + jnp.clip(v - ov, -clip, clip)
    sq = jnp.square(v - ret)
    sq_clip = jnp.square(v_clip - ret)
    loss = 0.5 * masked_mean(jnp.maximum(sq, sq_clip), mask)
    metrics = {
        "loss": loss,
        "loss/value": loss,
        "val/clipfrac": masked_mean((sq_clip > sq).astype(jnp.float32), mask),
        "val/vpred": masked_mean(v, mask),
        "loss_tokens": jnp.sum(mask),
    }
    return loss, metrics
