"""Pieces shared by the preference losses of :mod:`jaxpost.losses.dpo` and :mod:`jaxpost.losses.dpo_relatives`.

Input checks, cDPO's smoothed sigmoid, RPO's chosen-NLL term, the f-DPO
scores (Wang et al. 2023, "Beyond Reverse KL") and the metrics every
preference loss returns (TRL's names).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxpost.losses.checks import check_rank, check_same_shape, f32
from jaxpost.losses.sequence import average_logps
from jaxpost.losses.stats import masked_mean

NAMES = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps",
         "ref_rejected_logps", "chosen_lengths", "rejected_lengths", "pair_mask")

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
"""``f_divergence_type`` values (TRL's names); ``reverse_kl`` is plain DPO."""


def check_pair_inputs(kind, pc, pr, rc, rr, lc, lr, mask, need_ref: bool, need_lengths: bool):
    """Raises ``ValueError`` unless the inputs are ``[B]`` alike and hold the reference and lengths ``kind`` needs."""
    check_rank("policy_chosen_logps", pc, 1, "[B]")
    check_same_shape(NAMES, (pc, pr, rc, rr, lc, lr, mask), "[B]")
    if need_ref and (rc is None or rr is None):
        raise ValueError(f"{kind} loss needs ref_chosen_logps and ref_rejected_logps ([B] each)")
    if need_lengths and (lc is None or lr is None):
        raise ValueError(f"{kind} loss needs chosen_lengths and rejected_lengths ([B] token counts)")


def check_smoothing(label_smoothing, low_open: bool, limit: float, kind: str):
    """``label_smoothing`` in ``[0, limit)`` (``(0, limit)`` when ``low_open``), when it is a Python number.

    Traced values cannot be checked here; they are the caller's job.
    """
    if not isinstance(label_smoothing, (int, float)):
        return
    if not (0.0 < label_smoothing < limit if low_open else 0.0 <= label_smoothing < limit):
        raise ValueError(f"{kind} loss needs 0 {'<' if low_open else '<='} label_smoothing < {limit}, "
                         f"got {label_smoothing}")


def smoothed_sigmoid(z, label_smoothing):
    """cDPO (Mitchell 2023): ``-(1 - eps) log sigma(z) - eps log sigma(-z)``."""
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)


def check_f_divergence(f_divergence_type: str, f_alpha_divergence_coef: float, kind: str):
    if f_divergence_type not in F_DIVERGENCES:
        raise ValueError(f"{kind} loss: f_divergence_type must be one of {', '.join(map(repr, F_DIVERGENCES))}, "
                         f"got {f_divergence_type!r}")
    if isinstance(f_alpha_divergence_coef, (int, float)) and not 0.0 < f_alpha_divergence_coef <= 1.0:
        raise ValueError(f"{kind} loss: f_alpha_divergence_coef must be in (0, 1], got {f_alpha_divergence_coef}")


def divergence_scores(logratio, f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5):
    """f-DPO's score ``f'(t)`` of a policy/reference log-ratio ``u = log t`` (Wang et al. 2023, Table 1).

    * ``reverse_kl``: ``u`` (DPO);
    * ``forward_kl``: ``1 - exp(-u)``;
    * ``js_divergence``: ``log 2 + log sigma(u)``;
    * ``alpha_divergence`` (``a = f_alpha_divergence_coef``):
      ``(exp((a - 1) u) - 1) / (a - 1)``, with ``(a - 1) u`` capped at 80
      as TRL does, so the exponential stays finite; its limit ``u`` at
      ``a = 1`` (``|a - 1| < 1e-6``).

    A pair's DPO-style margin is then ``f'(t_c) - f'(t_r)``: the
    normaliser ``log Z(x)`` cancels only in that difference.
    """
    u = f32(logratio)
    if f_divergence_type == "reverse_kl":
        return u
    if f_divergence_type == "forward_kl":
        return 1.0 - jnp.exp(-u)
    if f_divergence_type == "js_divergence":
        return math.log(2.0) + jax.nn.log_sigmoid(u)
    if f_divergence_type == "alpha_divergence":
        a = f_alpha_divergence_coef
        if abs(a - 1.0) < 1e-6:
            return u
        return (jnp.exp(jnp.minimum((a - 1.0) * u, 80.0)) - 1.0) / (a - 1.0)
    raise ValueError(f"f_divergence_type must be one of {', '.join(map(repr, F_DIVERGENCES))}, "
                     f"got {f_divergence_type!r}")


def pair_margin(pc, pr, rc, rr, f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5):
    """``h = (pi_c - pi_r) - (ref_c - ref_r)``, or ``f'(t_c) - f'(t_r)`` under another f-divergence."""
    if f_divergence_type == "reverse_kl":
        return (pc - pr) - (rc - rr)
    score = lambda u: divergence_scores(u, f_divergence_type, f_alpha_divergence_coef)
    return score(pc - rc) - score(pr - rr)


def pair_metrics(losses, chosen_rewards, rejected_rewards, logps_c, logps_r, mask, extra=None, weights=None):
    """``(loss, metrics)``: the pair-masked mean of ``losses`` plus each ``extra`` term, and TRL's metrics.

    ``extra``: ``{name: (term added to the loss, value logged as name)}``.
    ``weights``: per-pair weights of ``losses`` (WPO's, :func:`~jaxpost.losses.wpo_weights`), inside the mean:
    ``sum_i w_i l_i m_i / sum_i m_i``; the ``extra`` terms are not weighted.
    """
    m = jnp.ones_like(losses) if mask is None else f32(mask)
    loss = masked_mean(losses if weights is None else losses * jax.lax.stop_gradient(f32(weights)), m)
    extra_metrics = {}
    for k, v in (extra or {}).items():
        loss = loss + v[0]
        extra_metrics[k] = v[1]
    metrics = {"loss": loss, **extra_metrics}
    metrics.update({
        "rewards/chosen": masked_mean(chosen_rewards, m),
        "rewards/rejected": masked_mean(rejected_rewards, m),
        "rewards/margins": masked_mean(chosen_rewards - rejected_rewards, m),
        "rewards/accuracies": masked_mean((chosen_rewards > rejected_rewards).astype(jnp.float32), m),
        "logps/chosen": masked_mean(logps_c, m),
        "logps/rejected": masked_mean(logps_r, m),
    })
    return loss, metrics


def rpo_term(rpo_alpha, pc, lc, mask, kind):
    """RPO (Pang et al. 2024): ``alpha * mean_pairs(-pi_c / |y_c|)`` added to the loss (None: no term)."""
    if rpo_alpha is None:
        return None
    if lc is None:
        raise ValueError(f"{kind} loss with rpo_alpha needs chosen_lengths ([B] token counts)")
    m = jnp.ones_like(f32(pc)) if mask is None else f32(mask)
    nll = masked_mean(-average_logps(pc, lc), m)
    return {"nll_loss": (rpo_alpha * nll, nll)}
