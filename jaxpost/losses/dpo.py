"""Offline preference losses: DPO and its relatives, from per-sequence log-probs.

Inputs are per-pair arrays of shape ``[B]``: the *summed* log-probs of the
chosen and rejected responses under the policy (``policy_*_logps``) and the
reference (``ref_*_logps``), and where needed the response lengths in tokens
(``*_lengths``). Every loss here has the same positional signature::

    fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None,
       ref_rejected_logps=None, chosen_lengths=None, rejected_lengths=None,
       *, <hyperparameters>, pair_mask=None, pair_weights=None) -> (loss, metrics)

so a training step can call any entry of :data:`PREFERENCE_LOSSES` (gin binds
the name and the hyperparameters); it also holds the relatives of
:mod:`jaxpost.losses.dpo_relatives`. Reference-free losses (SimPO, ORPO,
``sft``) accept and ignore the reference arguments. ``pair_mask`` (``[B]`` float
{0,1}) drops padding pairs from every mean. ``pair_weights`` (``[B]``, WPO's,
:func:`~jaxpost.losses.wpo_weights`) weigh each pair's loss, without gradient,
inside the mean over pairs (``sum_i w_i l_i / n``); extra terms (RPO's and
ORPO's NLL) stay unweighted, and the AOT losses, whose terms are sorted
margins of no one pair, refuse them.

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

import inspect
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from jaxpost.losses.checks import f32
from jaxpost.losses.dpo_relatives import RELATIVES
from jaxpost.losses.preference_math import (check_f_divergence, check_pair_inputs, check_smoothing,
                                            divergence_scores, pair_margin, pair_metrics, rpo_term,
                                            smoothed_sigmoid)
from jaxpost.losses.sequence import average_logps
from jaxpost.losses.stats import masked_mean

def sigmoid_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None,
                 ref_rejected_logps=None, chosen_lengths=None, rejected_lengths=None, *,
                 beta: float = 0.1, label_smoothing: float = 0.0, rpo_alpha: float | None = None,
                 f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5, pair_mask=None,
                 pair_weights=None):
    """DPO (Rafailov et al. 2023), with cDPO label smoothing (Mitchell 2023).

    ``loss = mean( -(1 - eps) log sigma(beta h) - eps log sigma(-beta h) )``;
    ``eps = label_smoothing`` (0 gives plain DPO). ``label_smoothing``: the
    assumed rate of flipped preference labels, in ``[0, 1)``. The gradient w.r.t.
    ``pi_c`` of one pair's plain DPO loss is ``-beta sigma(-beta h)``.
    With ``rpo_alpha``, adds ``rpo_alpha * mean(-pi_c / |y_c|)`` (RPO,
    Pang et al. 2024; per-sequence length-averaged NLL of the chosen
    response, where TRL averages over all chosen tokens of the batch).
    ``f_divergence_type`` (f-DPO, Wang et al. 2023): ``'reverse_kl'`` (DPO,
    the default), ``'forward_kl'``, ``'js_divergence'`` or
    ``'alpha_divergence'``, under which ``h`` becomes ``f'(t_c) - f'(t_r)``
    (:func:`~jaxpost.losses.divergence_scores`; the rewards stay ``beta *
    (pi - ref)``). ``f_alpha_divergence_coef``: the alpha of
    ``'alpha_divergence'``, in ``(0, 1]``.
    """
    pc, pr, rc, rr = map(f32, (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps))
    check_pair_inputs("sigmoid", pc, pr, rc, rr, chosen_lengths, rejected_lengths, pair_mask, True, False)
    check_smoothing(label_smoothing, False, 1.0, "sigmoid")
    check_f_divergence(f_divergence_type, f_alpha_divergence_coef, "sigmoid")
    h = pair_margin(pc, pr, rc, rr, f_divergence_type, f_alpha_divergence_coef)
    losses = smoothed_sigmoid(beta * h, label_smoothing)
    return pair_metrics(losses, beta * (pc - rc), beta * (pr - rr), pc, pr, pair_mask,
                        rpo_term(rpo_alpha, pc, chosen_lengths, pair_mask, "sigmoid"), weights=pair_weights)


def robust_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None,
                ref_rejected_logps=None, chosen_lengths=None, rejected_lengths=None, *,
                beta: float = 0.1, label_smoothing: float = 0.0, rpo_alpha: float | None = None,
                f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5, pair_mask=None,
                pair_weights=None):
    """rDPO (Chowdhury et al. 2024), unbiased under preference-label flips with rate ``eps``.

    ``loss = mean( (-(1 - eps) log sigma(beta h) + eps log sigma(-beta h)) / (1 - 2 eps) )``,
    ``eps = label_smoothing`` in ``[0, 0.5)``. Equals DPO at ``eps = 0``.
    ``label_smoothing``: the flip rate ``eps``, in ``[0, 0.5)``. ``rpo_alpha``:
    the weight of RPO's chosen NLL term, as in :func:`sigmoid_loss` (None: off).
    ``f_divergence_type``, ``f_alpha_divergence_coef``: ``h`` under another
    f-divergence, as in :func:`sigmoid_loss`.
    """
    pc, pr, rc, rr = map(f32, (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps))
    check_pair_inputs("robust", pc, pr, rc, rr, chosen_lengths, rejected_lengths, pair_mask, True, False)
    check_smoothing(label_smoothing, False, 0.5, "robust")
    check_f_divergence(f_divergence_type, f_alpha_divergence_coef, "robust")
    z = beta * pair_margin(pc, pr, rc, rr, f_divergence_type, f_alpha_divergence_coef)
    eps = label_smoothing
    losses = (-(1.0 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)) / (1.0 - 2.0 * eps)
    return pair_metrics(losses, beta * (pc - rc), beta * (pr - rr), pc, pr, pair_mask,
                        rpo_term(rpo_alpha, pc, chosen_lengths, pair_mask, "robust"), weights=pair_weights)


def hinge_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None,
               ref_rejected_logps=None, chosen_lengths=None, rejected_lengths=None, *,
               beta: float = 0.1, rpo_alpha: float | None = None, f_divergence_type: str = "reverse_kl",
               f_alpha_divergence_coef: float = 0.5, pair_mask=None, pair_weights=None):
    """SLiC hinge (Zhao et al. 2023) on the DPO log-ratio: ``loss = mean( relu(1 - beta h) )``.

    ``rpo_alpha``: the weight of RPO's chosen NLL term, as in :func:`sigmoid_loss` (None: off).
    ``f_divergence_type``, ``f_alpha_divergence_coef``: ``h`` under another
    f-divergence, as in :func:`sigmoid_loss`.
    """
    pc, pr, rc, rr = map(f32, (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps))
    check_pair_inputs("hinge", pc, pr, rc, rr, chosen_lengths, rejected_lengths, pair_mask, True, False)
    check_f_divergence(f_divergence_type, f_alpha_divergence_coef, "hinge")
    losses = jax.nn.relu(1.0 - beta * pair_margin(pc, pr, rc, rr, f_divergence_type, f_alpha_divergence_coef))
    return pair_metrics(losses, beta * (pc - rc), beta * (pr - rr), pc, pr, pair_mask,
                        rpo_term(rpo_alpha, pc, chosen_lengths, pair_mask, "hinge"), weights=pair_weights)


def ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None,
             ref_rejected_logps=None, chosen_lengths=None, rejected_lengths=None, *,
             beta: float = 0.1, rpo_alpha: float | None = None, f_divergence_type: str = "reverse_kl",
             f_alpha_divergence_coef: float = 0.5, pair_mask=None, pair_weights=None):
    """IPO (Azar et al. 2023): ``loss = mean( (h_avg - 1 / (2 beta))^2 )``.

    Following TRL, ``h_avg`` uses *length-averaged* log-probs for both policy
    and reference: ``h_avg = (pi_c/|y_c| - pi_r/|y_r|) - (ref_c/|y_c| - ref_r/|y_r|)``
    (the paper writes summed log-probs; averaging keeps the fixed target
    ``1/(2 beta)`` meaningful across lengths). Rewards and ``logps/*``
    metrics use the averaged log-probs too. ``rpo_alpha``: the weight of
    RPO's chosen NLL term, as in :func:`sigmoid_loss` (None: off). Under
    another ``f_divergence_type`` (see :func:`sigmoid_loss`), ``h_avg =
    f'(t_c)/|y_c| - f'(t_r)/|y_r|``, as TRL.
    """
    pc, pr, rc, rr = map(f32, (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps))
    check_pair_inputs("ipo", pc, pr, rc, rr, chosen_lengths, rejected_lengths, pair_mask, True, True)
    check_f_divergence(f_divergence_type, f_alpha_divergence_coef, "ipo")
    apc, apr = average_logps(pc, chosen_lengths), average_logps(pr, rejected_lengths)
    arc, arr = average_logps(rc, chosen_lengths), average_logps(rr, rejected_lengths)
    if f_divergence_type == "reverse_kl":
        h_avg = (apc - apr) - (arc - arr)
    else:
        score = lambda u: divergence_scores(u, f_divergence_type, f_alpha_divergence_coef)
        h_avg = average_logps(score(pc - rc), chosen_lengths) - average_logps(score(pr - rr), rejected_lengths)
    losses = jnp.square(h_avg - 1.0 / (2.0 * beta))
    return pair_metrics(losses, beta * (apc - arc), beta * (apr - arr), apc, apr, pair_mask,
                   rpo_term(rpo_alpha, pc, chosen_lengths, pair_mask, "ipo"), weights=pair_weights)


def simpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None,
               ref_rejected_logps=None, chosen_lengths=None, rejected_lengths=None, *,
               beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0,
               pair_mask=None, pair_weights=None):
    """SimPO (Meng et al. 2024), reference-free and length-normalised.

    ``z = beta pi_c/|y_c| - beta pi_r/|y_r| - gamma``;
    ``loss = mean( -(1 - eps) log sigma(z) - eps log sigma(-z) )`` with
    ``eps = label_smoothing`` (0 in the paper). ``ref_*`` are ignored.
    Rewards are ``beta * pi/|y|``. ``gamma``: the target reward margin.
    ``label_smoothing``: the flip rate ``eps``, in ``[0, 1)``.
    """
    pc, pr = f32(policy_chosen_logps), f32(policy_rejected_logps)
    check_pair_inputs("simpo", pc, pr, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths,
           pair_mask, False, True)
    check_smoothing(label_smoothing, False, 1.0, "simpo")
    apc, apr = average_logps(pc, chosen_lengths), average_logps(pr, rejected_lengths)
    losses = smoothed_sigmoid(beta * apc - beta * apr - gamma, label_smoothing)
    return pair_metrics(losses, beta * apc, beta * apr, apc, apr, pair_mask, weights=pair_weights)


def _log1mexp(x):
    """``log(1 - exp(x))`` for ``x < 0``, accurate near 0 and for very negative ``x`` (Maechler 2012)."""
    return jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def orpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None,
              ref_rejected_logps=None, chosen_lengths=None, rejected_lengths=None, *,
              beta: float = 0.1, pair_mask=None, pair_weights=None):
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
    check_pair_inputs("orpo", pc, pr, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths,
           pair_mask, False, True)
    apc, apr = average_logps(pc, chosen_lengths), average_logps(pr, rejected_lengths)
    log_odds = (apc - apr) - (_log1mexp(jnp.minimum(apc, -1e-6)) - _log1mexp(jnp.minimum(apr, -1e-6)))
    ratio = jax.nn.log_sigmoid(log_odds)
    m = jnp.ones_like(pc) if pair_mask is None else f32(pair_mask)
    nll = masked_mean(-apc, m)
    loss, metrics = pair_metrics(-beta * ratio, beta * apc, beta * apr, apc, apr, pair_mask,
                                 {"nll_loss": (nll, nll)}, weights=pair_weights)
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
    **RELATIVES,
}
"""Preference losses by name (TRL ``loss_type`` names where TRL has one)."""


def preference_loss(kind: str, *args, **kwargs):
    """Calls ``PREFERENCE_LOSSES[kind](*args, **kwargs)``; see the module docstring for the signature."""
    if kind not in PREFERENCE_LOSSES:
        raise ValueError(f"Unknown preference loss {kind!r}; choose one of {sorted(PREFERENCE_LOSSES)}")
    return PREFERENCE_LOSSES[kind](*args, **kwargs)


def own_hparams(loss: Callable, hparams: dict) -> dict:
    """The entries of ``hparams`` that ``loss`` takes."""
    params = inspect.signature(loss).parameters
    return {k: v for k, v in hparams.items() if k in params}


def combined_preference_loss(kinds: Sequence[str], loss_weights: Sequence[float] | None, *args, beta: float,
                             pair_mask=None, pair_weights=None, **hparams):
    """``sum_k w_k loss_k`` over the losses ``kinds`` names (TRL's multi-``loss_type``; MPO is
    ``['sigmoid', 'bco_pair', 'sft']`` with weights ``[0.8, 0.2, 1.0]``).

    ``args`` are the per-pair arrays of every preference loss; each loss gets
    the ``hparams`` it takes, and ``pair_weights`` (WPO) each. ``loss_weights`` None: all 1. Metrics: the
    first loss's (rewards, log-probs), every loss's extra terms
    (``nll_loss``...), ``loss/<kind>`` of each term unweighted, and ``loss``
    the weighted sum.
    """
    weights = [1.0] * len(kinds) if loss_weights is None else list(loss_weights)
    total, metrics, terms = 0.0, {}, {}
    for k, w in zip(kinds, weights, strict=True):
        fn = PREFERENCE_LOSSES[k]
        value, m = fn(*args, beta=beta, pair_mask=pair_mask, pair_weights=pair_weights, **own_hparams(fn, hparams))
        total = total + w * value
        metrics = {**m, **metrics}  # the first loss's metrics win
        terms[f"loss/{k}"] = value
    return total, {**metrics, **terms, "loss": total}
