"""Offline preference losses: DPO and its relatives, from per-sequence log-probs.

Inputs are per-pair arrays of shape ``[B]``: the *summed* log-probs of the
chosen and rejected responses under the policy (``policy_*_logps``) and the
reference (``ref_*_logps``), and where needed the response lengths in tokens
(``*_lengths``). Every loss here has the same positional signature::

    fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None,
       ref_rejected_logps=None, chosen_lengths=None, rejected_lengths=None,
       *, <hyperparameters>, pair_mask=None) -> (loss, metrics)

so a training step can call any entry of :data:`PREFERENCE_LOSSES` (gin binds
the name and the hyperparameters). Reference-free losses (SimPO, ORPO)
accept and ignore the reference arguments. ``pair_mask`` (``[B]`` float
{0,1}) drops padding pairs from every mean.

Notation: ``h = (pi_c - pi_r) - (ref_c - ref_r)`` (the difference of the
policy/reference log-ratios), ``sigma`` the logistic function.

NaN safety: divisions by lengths use ``max(length, 1)``, so a zero-length
response has average log-prob 0 (its summed log-prob is 0). ORPO's
``log(1 - exp(logp))`` is evaluated with ``logp`` clamped to at most
``-1e-6`` (see :func:`orpo_loss`). Identical chosen and rejected responses
give ``h = 0``, a finite loss (``log 2`` for DPO) and zero-difference
gradients.

Metrics (TRL names): ``loss``, ``rewards/chosen``, ``rewards/rejected``
(implicit rewards, ``beta * (pi - ref)`` or ``beta * pi`` for
reference-free losses), ``rewards/margins``, ``rewards/accuracies``
(fraction with chosen reward > rejected reward), ``logps/chosen``,
``logps/rejected`` (the policy log-probs the loss uses: summed, or
length-averaged for IPO/SimPO/ORPO), and ``nll_loss`` where an NLL term is
added (RPO, ORPO).
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from jaxpost.losses.checks import check_rank, check_same_shape, f32
from jaxpost.losses.sequence import average_logps
from jaxpost.losses.stats import masked_mean

_NAMES = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps",
          "ref_rejected_logps", "chosen_lengths", "rejected_lengths", "pair_mask")


def _check(kind, pc, pr, rc, rr, lc, lr, mask, need_ref: bool, need_lengths: bool):
    check_rank("policy_chosen_logps", pc, 1, "[B]")
    check_same_shape(_NAMES, (pc, pr, rc, rr, lc, lr, mask), "[B]")
    if need_ref and (rc is None or rr is None):
        raise ValueError(f"{kind} loss needs ref_chosen_logps and ref_rejected_logps ([B] each)")
    if need_lengths and (lc is None or lr is None):
        raise ValueError(f"{kind} loss needs chosen_lengths and rejected_lengths ([B] token counts)")


def _smoothed_sigmoid(z, label_smoothing):
    """cDPO (Mitchell 2023): ``-(1 - eps) log sigma(z) - eps log sigma(-z)``."""
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)


def _finish(losses, chosen_rewards, rejected_rewards, logps_c, logps_r, mask, extra=None):
    m = jnp.ones_like(losses) if mask is None else f32(mask)
    loss = masked_mean(losses, m)
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


def _rpo_term(rpo_alpha, pc, lc, mask, kind):
    """RPO (Pang et al. 2024): ``alpha * mean_pairs(-pi_c / |y_c|)`` added to the loss."""
    if rpo_alpha is None:
        return None
    if lc is None:
        raise ValueError(f"{kind} loss with rpo_alpha needs chosen_lengths ([B] token counts)")
    m = jnp.ones_like(f32(pc)) if mask is None else f32(mask)
    nll = masked_mean(-average_logps(pc, lc), m)
    return {"nll_loss": (rpo_alpha * nll, nll)}


def _check_smoothing(label_smoothing, limit: float, kind: str):
    # Only checkable when given as a Python number; traced values are the caller's job.
    if isinstance(label_smoothing, (int, float)) and not 0.0 <= label_smoothing < limit:
        raise ValueError(f"{kind} loss needs 0 <= label_smoothing < {limit}, got {label_smoothing}")


def sigmoid_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None,
                 ref_rejected_logps=None, chosen_lengths=None, rejected_lengths=None, *,
                 beta: float = 0.1, label_smoothing: float = 0.0, rpo_alpha: float | None = None,
                 pair_mask=None):
    """DPO (Rafailov et al. 2023), with cDPO label smoothing (Mitchell 2023).

    ``loss = mean( -(1 - eps) log sigma(beta h) - eps log sigma(-beta h) )``;
    ``eps = label_smoothing`` (0 gives plain DPO). ``label_smoothing``: the
    assumed rate of flipped preference labels, in ``[0, 1)``. The gradient w.r.t.
    ``pi_c`` of one pair's plain DPO loss is ``-beta sigma(-beta h)``.
    With ``rpo_alpha``, adds ``rpo_alpha * mean(-pi_c / |y_c|)`` (RPO,
    Pang et al. 2024; per-sequence length-averaged NLL of the chosen
    response, where TRL averages over all chosen tokens of the batch).
    """
    pc, pr, rc, rr = map(f32, (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps))
    _check("sigmoid", pc, pr, rc, rr, chosen_lengths, rejected_lengths, pair_mask, True, False)
    _check_smoothing(label_smoothing, 1.0, "sigmoid")
    h = (pc - pr) - (rc - rr)
    losses = _smoothed_sigmoid(beta * h, label_smoothing)
    return _finish(losses, beta * (pc - rc), beta * (pr - rr), pc, pr, pair_mask,
                   _rpo_term(rpo_alpha, pc, chosen_lengths, pair_mask, "sigmoid"))


def robust_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None,
                ref_rejected_logps=None, chosen_lengths=None, rejected_lengths=None, *,
                beta: float = 0.1, label_smoothing: float = 0.0, rpo_alpha: float | None = None,
                pair_mask=None):
    """rDPO (Chowdhury et al. 2024), unbiased under preference-label flips with rate ``eps``.

    ``loss = mean( (-(1 - eps) log sigma(beta h) + eps log sigma(-beta h)) / (1 - 2 eps) )``,
    ``eps = label_smoothing`` in ``[0, 0.5)``. Equals DPO at ``eps = 0``.
    ``label_smoothing``: the flip rate ``eps``, in ``[0, 0.5)``. ``rpo_alpha``:
    the weight of RPO's chosen NLL term, as in :func:`sigmoid_loss` (None: off).
    """
    pc, pr, rc, rr = map(f32, (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps))
    _check("robust", pc, pr, rc, rr, chosen_lengths, rejected_lengths, pair_mask, True, False)
    _check_smoothing(label_smoothing, 0.5, "robust")
    z = beta * ((pc - pr) - (rc - rr))
    eps = label_smoothing
    losses = (-(1.0 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)) / (1.0 - 2.0 * eps)
    return _finish(losses, beta * (pc - rc), beta * (pr - rr), pc, pr, pair_mask,
                   _rpo_term(rpo_alpha, pc, chosen_lengths, pair_mask, "robust"))


def hinge_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None,
               ref_rejected_logps=None, chosen_lengths=None, rejected_lengths=None, *,
               beta: float = 0.1, rpo_alpha: float | None = None, pair_mask=None):
    """SLiC hinge (Zhao et al. 2023) on the DPO log-ratio: ``loss = mean( relu(1 - beta h) )``.

    ``rpo_alpha``: the weight of RPO's chosen NLL term, as in :func:`sigmoid_loss` (None: off).
    """
    pc, pr, rc, rr = map(f32, (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps))
    _check("hinge", pc, pr, rc, rr, chosen_lengths, rejected_lengths, pair_mask, True, False)
    losses = jax.nn.relu(1.0 - beta * ((pc - pr) - (rc - rr)))
    return _finish(losses, beta * (pc - rc), beta * (pr - rr), pc, pr, pair_mask,
                   _rpo_term(rpo_alpha, pc, chosen_lengths, pair_mask, "hinge"))


def ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None,
             ref_rejected_logps=None, chosen_lengths=None, rejected_lengths=None, *,
             beta: float = 0.1, rpo_alpha: float | None = None, pair_mask=None):
    """IPO (Azar et al. 2023): ``loss = mean( (h_avg - 1 / (2 beta))^2 )``.

    Following TRL, ``h_avg`` uses *length-averaged* log-probs for both policy
    and reference: ``h_avg = (pi_c/|y_c| - pi_r/|y_r|) - (ref_c/|y_c| - ref_r/|y_r|)``
    (the paper writes summed log-probs; averaging keeps the fixed target
    ``1/(2 beta)`` meaningful across lengths). Rewards and ``logps/*``
    metrics use the averaged log-probs too. ``rpo_alpha``: the weight of
    RPO's chosen NLL term, as in :func:`sigmoid_loss` (None: off).
    """
    pc, pr, rc, rr = map(f32, (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps))
    _check("ipo", pc, pr, rc, rr, chosen_lengths, rejected_lengths, pair_mask, True, True)
    apc, apr = average_logps(pc, chosen_lengths), average_logps(pr, rejected_lengths)
    arc, arr = average_logps(rc, chosen_lengths), average_logps(rr, rejected_lengths)
    losses = jnp.square((apc - apr) - (arc - arr) - 1.0 / (2.0 * beta))
    return _finish(losses, beta * (apc - arc), beta * (apr - arr), apc, apr, pair_mask,
                   _rpo_term(rpo_alpha, pc, chosen_lengths, pair_mask, "ipo"))


def simpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None,
               ref_rejected_logps=None, chosen_lengths=None, rejected_lengths=None, *,
               beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0,
               pair_mask=None):
    """SimPO (Meng et al. 2024), reference-free and length-normalised.

    ``z = beta pi_c/|y_c| - beta pi_r/|y_r| - gamma``;
    ``loss = mean( -(1 - eps) log sigma(z) - eps log sigma(-z) )`` with
    ``eps = label_smoothing`` (0 in the paper). ``ref_*`` are ignored.
    Rewards are ``beta * pi/|y|``. ``gamma``: the target reward margin.
    ``label_smoothing``: the flip rate ``eps``, in ``[0, 1)``.
    """
    pc, pr = f32(policy_chosen_logps), f32(policy_rejected_logps)
    _check("simpo", pc, pr, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths,
           pair_mask, False, True)
    _check_smoothing(label_smoothing, 1.0, "simpo")
    apc, apr = average_logps(pc, chosen_lengths), average_logps(pr, rejected_lengths)
    losses = _smoothed_sigmoid(beta * apc - beta * apr - gamma, label_smoothing)
    return _finish(losses, beta * apc, beta * apr, apc, apr, pair_mask)


def _log1mexp(x):
    """``log(1 - exp(x))`` for ``x < 0``, accurate near 0 and for very negative ``x`` (Maechler 2012)."""
    return jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def orpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None,
              ref_rejected_logps=None, chosen_lengths=None, rejected_lengths=None, *,
              beta: float = 0.1, pair_mask=None):
    """ORPO (Hong et al. 2024), reference-free odds-ratio preference loss.

    With length-averaged log-probs ``a_c = pi_c/|y_c|``, ``a_r = pi_r/|y_r|``
    and ``log odds(a) = a - log(1 - exp(a))``::

        loss = mean( -a_c ) - beta * mean( log sigma(log odds(a_c) - log odds(a_r)) )

    ``beta`` is the paper's lambda (TRL's ``beta``); the first term is the
    chosen NLL, averaged per sequence (TRL averages over all chosen tokens
    of the batch; equal when lengths are equal). ``a`` is clamped to at most
    ``-1e-6`` inside ``log(1 - exp(a))``, which is ``-inf`` at ``a = 0``
    (zero-length response or probability 1). ``ref_*`` are ignored. Extra
    metrics (TRL): ``log_odds_ratio`` (mean ``log sigma(.)``),
    ``log_odds_chosen`` (mean log-odds difference), ``nll_loss``.
    """
    pc, pr = f32(policy_chosen_logps), f32(policy_rejected_logps)
    _check("orpo", pc, pr, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths,
           pair_mask, False, True)
    apc, apr = average_logps(pc, chosen_lengths), average_logps(pr, rejected_lengths)
    log_odds = (apc - apr) - (_log1mexp(jnp.minimum(apc, -1e-6)) - _log1mexp(jnp.minimum(apr, -1e-6)))
    ratio = jax.nn.log_sigmoid(log_odds)
    m = jnp.ones_like(pc) if pair_mask is None else f32(pair_mask)
    nll = masked_mean(-apc, m)
    loss, metrics = _finish(-beta * ratio, beta * apc, beta * apr, apc, apr, pair_mask,
                            {"nll_loss": (nll, nll)})
    metrics["log_odds_ratio"] = masked_mean(ratio, m)
    metrics["log_odds_chosen"] = masked_mean(log_odds, m)
    return loss, metrics


PREFERENCE_LOSSES: Mapping[str, Callable] = {
    "sigmoid": sigmoid_loss,
    "robust": robust_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
}
"""Preference losses by name (TRL ``loss_type`` names where TRL has one)."""


def preference_loss(kind: str, *args, **kwargs):
    """Calls ``PREFERENCE_LOSSES[kind](*args, **kwargs)``; see the module docstring for the signature."""
    if kind not in PREFERENCE_LOSSES:
        raise ValueError(f"Unknown preference loss {kind!r}; choose one of {sorted(PREFERENCE_LOSSES)}")
    return PREFERENCE_LOSSES[kind](*args, **kwargs)
