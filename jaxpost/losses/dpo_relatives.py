"""More of DPO's relatives: the preference losses TRL 1.16 names that :mod:`jaxpost.losses.dpo` does not hold.

Same signature, notation and metrics as :mod:`jaxpost.losses.dpo`; each
is reachable by its TRL ``loss_type`` name in
:data:`~jaxpost.losses.dpo.PREFERENCE_LOSSES`. Below, ``u_c = pi_c -
ref_c`` and ``u_r = pi_r - ref_r`` are the chosen and rejected log-ratios,
``h = u_c - u_r``, and every ``mean`` is over the real pairs
(``pair_mask``).

The rewards logged are ``beta * u`` (``beta * pi / |y|`` for ``sft``
alone, which reads no reference), as TRL logs them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpost.losses.checks import f32
from jaxpost.losses.preference_math import (check_f_divergence, check_pair_inputs, check_smoothing,
                                            divergence_scores, pair_margin, pair_metrics, smoothed_sigmoid)
from jaxpost.losses.sequence import average_logps
from jaxpost.losses.stats import masked_mean


def _inputs(kind, args, pair_mask, need_ref=True, need_lengths=False):
    pc, pr, rc, rr, lc, lr = (f32(x) for x in args)
    check_pair_inputs(kind, pc, pr, rc, rr, lc, lr, pair_mask, need_ref, need_lengths)
    return pc, pr, rc, rr, lc, lr


def exo_pair_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None,
                  ref_rejected_logps=None, chosen_lengths=None, rejected_lengths=None, *,
                  beta: float = 0.1, label_smoothing: float = 1e-3, f_divergence_type: str = "reverse_kl",
                  f_alpha_divergence_coef: float = 0.5, pair_mask=None, pair_weights=None):
    """EXO-pref (Ji et al. 2024, eq. 16): ``KL(p_theta || p_label)`` over the two replies.

    ``p_theta = (sigma(beta h), sigma(-beta h))``, ``p_label = (1 - eps, eps)``
    with ``eps = label_smoothing`` in ``(0, 1)``; the default is the
    paper's 1e-3 (TRL's default, 0, is refused there as here)::

        loss = mean( sigma(z) (log sigma(z) - log(1 - eps)) + sigma(-z) (log sigma(-z) - log eps) ),  z = beta h

    ``f_divergence_type``/``f_alpha_divergence_coef``: ``h`` under another
    f-divergence, as in :func:`~jaxpost.losses.dpo.sigmoid_loss`.
    """
    pc, pr, rc, rr, _, _ = _inputs("exo_pair", (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                                ref_rejected_logps, chosen_lengths, rejected_lengths), pair_mask)
    check_smoothing(label_smoothing, True, 1.0, "exo_pair")
    check_f_divergence(f_divergence_type, f_alpha_divergence_coef, "exo_pair")
    z = beta * pair_margin(pc, pr, rc, rr, f_divergence_type, f_alpha_divergence_coef)
    eps = label_smoothing
    losses = (jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - jnp.log1p(-eps))
              + jax.nn.sigmoid(-z) * (jax.nn.log_sigmoid(-z) - jnp.log(eps)))
    return pair_metrics(losses, beta * (pc - rc), beta * (pr - rr), pc, pr, pair_mask, weights=pair_weights)


def nca_pair_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None,
                  ref_rejected_logps=None, chosen_lengths=None, rejected_lengths=None, *,
                  beta: float = 0.1, pair_mask=None, pair_weights=None):
    """NCA (Chen et al. 2024, noise-contrastive alignment), pairwise.

    ``loss = mean( -log sigma(beta u_c) - 1/2 log sigma(-beta u_c) - 1/2 log sigma(-beta u_r) )``:
    the chosen reply's own likelihood is raised, not only its margin.
    """
    pc, pr, rc, rr, _, _ = _inputs("nca_pair", (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                                ref_rejected_logps, chosen_lengths, rejected_lengths), pair_mask)
    c, r = beta * (pc - rc), beta * (pr - rr)
    losses = -jax.nn.log_sigmoid(c) - 0.5 * jax.nn.log_sigmoid(-c) - 0.5 * jax.nn.log_sigmoid(-r)
    return pair_metrics(losses, c, r, pc, pr, pair_mask, weights=pair_weights)


def bco_pair_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None,
                  ref_rejected_logps=None, chosen_lengths=None, rejected_lengths=None, *,
                  beta: float = 0.1, pair_mask=None, pair_weights=None):
    """BCO on pairs (Jung et al. 2024), as TRL's ``bco_pair``: each reply classified on its own.

    ``loss = mean( -log sigma(beta u_c) - log sigma(-beta u_r) )`` (TRL 1.16's
    form, without the paper's running reward shift).
    """
    pc, pr, rc, rr, _, _ = _inputs("bco_pair", (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                                ref_rejected_logps, chosen_lengths, rejected_lengths), pair_mask)
    c, r = beta * (pc - rc), beta * (pr - rr)
    return pair_metrics(-jax.nn.log_sigmoid(c) - jax.nn.log_sigmoid(-r), c, r, pc, pr, pair_mask,
                        weights=pair_weights)


def sppo_hard_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None,
                   ref_rejected_logps=None, chosen_lengths=None, rejected_lengths=None, *,
                   beta: float = 0.1, pair_mask=None, pair_weights=None):
    """SPPO (Wu et al. 2024, eq. 4.7) with hard win probabilities 1 and 0.

    ``loss = mean( (u_c - 1/(2 beta))^2 + (u_r + 1/(2 beta))^2 )``: each
    log-ratio is pulled to its own target, ``+-1/(2 beta)``.
    """
    pc, pr, rc, rr, _, _ = _inputs("sppo_hard", (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                                 ref_rejected_logps, chosen_lengths, rejected_lengths), pair_mask)
    uc, ur = pc - rc, pr - rr
    losses = jnp.square(uc - 0.5 / beta) + jnp.square(ur + 0.5 / beta)
    return pair_metrics(losses, beta * uc, beta * ur, pc, pr, pair_mask, weights=pair_weights)


def _sorted_real(x, pair_mask):
    """``x`` sorted ascending with padding pairs last, and the mask of the sorted real positions."""
    if pair_mask is None:
        return jnp.sort(x), jnp.ones_like(x)
    real = f32(pair_mask) > 0
    big = jnp.finfo(jnp.float32).max  # padding sorts last; finite, so big - big = 0, not NaN
    n = jnp.sum(real)
    return jnp.sort(jnp.where(real, x, big)), (jnp.arange(x.shape[0]) < n).astype(jnp.float32)


def _refuse_weights(kind, pair_weights):
    if pair_weights is not None:
        raise ValueError(f"{kind} averages sorted margins, which belong to no one pair: per-pair weights (WPO) "
                         f"cannot apply")


def _aot(a, b, beta, label_smoothing, pc, pr, rc, rr, pair_mask):
    sa, real = _sorted_real(a, pair_mask)
    sb, _ = _sorted_real(b, pair_mask)
    losses = smoothed_sigmoid(beta * jnp.where(real > 0, sa - sb, 0.0), label_smoothing)
    # The loss averages sorted positions; the rewards and log-probs are the pairs' own, under their mask.
    _, metrics = pair_metrics(jnp.zeros_like(pc), beta * (pc - rc), beta * (pr - rr), pc, pr, pair_mask)
    loss = masked_mean(losses, real)
    return loss, {**metrics, "loss": loss}


def aot_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None,
             ref_rejected_logps=None, chosen_lengths=None, rejected_lengths=None, *,
             beta: float = 0.1, label_smoothing: float = 0.0, pair_mask=None, pair_weights=None):
    """AOT, paired (Melnyk et al. 2024): DPO on the sorted margins, a distributional dominance constraint.

    With ``s = sort(pi_c - pi_r)`` and ``t = sort(ref_c - ref_r)`` over the
    batch's real pairs (ascending), ``loss = mean_i( -(1 - eps) log
    sigma(beta (s_i - t_i)) - eps log sigma(-beta (s_i - t_i)) )``. The sort
    is over the whole global batch (each micro-batch under gradient
    accumulation; TRL sorts each device's batch). ``label_smoothing``: ``eps``.
    """
    _refuse_weights("aot", pair_weights)
    pc, pr, rc, rr, _, _ = _inputs("aot", (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                           ref_rejected_logps, chosen_lengths, rejected_lengths), pair_mask)
    check_smoothing(label_smoothing, False, 1.0, "aot")
    return _aot(pc - pr, rc - rr, beta, label_smoothing, pc, pr, rc, rr, pair_mask)


def aot_unpaired_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None,
                      ref_rejected_logps=None, chosen_lengths=None, rejected_lengths=None, *,
                      beta: float = 0.1, label_smoothing: float = 0.0, pair_mask=None, pair_weights=None):
    """AOT, unpaired (Melnyk et al. 2024): the chosen log-ratios' distribution dominates the rejected ones'.

    ``s = sort(u_c)``, ``t = sort(u_r)`` over the real pairs; the loss is
    :func:`aot_loss`'s on ``s_i - t_i``.
    """
    _refuse_weights("aot_unpaired", pair_weights)
    pc, pr, rc, rr, _, _ = _inputs("aot_unpaired", (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                                    ref_rejected_logps, chosen_lengths, rejected_lengths), pair_mask)
    check_smoothing(label_smoothing, False, 1.0, "aot_unpaired")
    return _aot(pc - rc, pr - rr, beta, label_smoothing, pc, pr, rc, rr, pair_mask)


def apo_zero_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None,
                  ref_rejected_logps=None, chosen_lengths=None, rejected_lengths=None, *,
                  beta: float = 0.1, pair_mask=None, pair_weights=None):
    """APO-zero (D'Oosterlinck et al. 2024, eq. 7), for chosen replies better than the model's own.

    ``loss = mean( 1 - sigma(beta u_c) + sigma(beta u_r) )``: raises the
    chosen likelihood and lowers the rejected one.
    """
    pc, pr, rc, rr, _, _ = _inputs("apo_zero", (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                                ref_rejected_logps, chosen_lengths, rejected_lengths), pair_mask)
    c, r = beta * (pc - rc), beta * (pr - rr)
    return pair_metrics(1.0 - jax.nn.sigmoid(c) + jax.nn.sigmoid(r), c, r, pc, pr, pair_mask,
                        weights=pair_weights)


def apo_down_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None,
                  ref_rejected_logps=None, chosen_lengths=None, rejected_lengths=None, *,
                  beta: float = 0.1, pair_mask=None, pair_weights=None):
    """APO-down (D'Oosterlinck et al. 2024, eq. 8), for chosen replies worse than the model's own.

    ``loss = mean( sigma(beta u_c) + 1 - sigma(beta (u_c - u_r)) )``: lowers
    both likelihoods, the rejected one more.
    """
    pc, pr, rc, rr, _, _ = _inputs("apo_down", (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                                ref_rejected_logps, chosen_lengths, rejected_lengths), pair_mask)
    c, r = beta * (pc - rc), beta * (pr - rr)
    return pair_metrics(jax.nn.sigmoid(c) + 1.0 - jax.nn.sigmoid(c - r), c, r, pc, pr, pair_mask,
                        weights=pair_weights)


def discopop_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None,
                  ref_rejected_logps=None, chosen_lengths=None, rejected_lengths=None, *,
                  beta: float = 0.1, discopop_tau: float = 0.05, f_divergence_type: str = "reverse_kl",
                  f_alpha_divergence_coef: float = 0.5, pair_mask=None, pair_weights=None):
    """DiscoPOP (Chris Lu et al. 2024, eq. 5), the log-ratio modulated loss found by LLM-driven search.

    With ``z = beta h`` and ``m = sigma(z / tau)`` (``tau = discopop_tau``,
    0.05 in the paper): ``loss = mean( (1 - m) (-log sigma(z)) + m exp(-z) )``.
    ``m exp(-z)`` is evaluated as ``exp(-z + log sigma(z / tau))``, the
    same value, finite where ``exp(-z)`` alone would overflow.
    ``f_divergence_type``/``f_alpha_divergence_coef``: ``h`` under another
    f-divergence, as in :func:`~jaxpost.losses.dpo.sigmoid_loss`.
    """
    pc, pr, rc, rr, _, _ = _inputs("discopop", (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                                ref_rejected_logps, chosen_lengths, rejected_lengths), pair_mask)
    if isinstance(discopop_tau, (int, float)) and not discopop_tau > 0:
        raise ValueError(f"discopop loss needs discopop_tau > 0, got {discopop_tau}")
    check_f_divergence(f_divergence_type, f_alpha_divergence_coef, "discopop")
    z = beta * pair_margin(pc, pr, rc, rr, f_divergence_type, f_alpha_divergence_coef)
    m = jax.nn.sigmoid(z / discopop_tau)
    losses = (1.0 - m) * -jax.nn.log_sigmoid(z) + jnp.exp(-z + jax.nn.log_sigmoid(z / discopop_tau))
    return pair_metrics(losses, beta * (pc - rc), beta * (pr - rr), pc, pr, pair_mask, weights=pair_weights)


def sigmoid_norm_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None,
                      ref_rejected_logps=None, chosen_lengths=None, rejected_lengths=None, *,
                      beta: float = 0.1, f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5,
                      pair_mask=None, pair_weights=None):
    """DPO on length-normalised log-ratios (TRL's ``sigmoid_norm``).

    ``loss = mean( -log sigma(beta (f'(t_c)/|y_c| - f'(t_r)/|y_r|)) )``;
    ``f'(t) = u`` under ``reverse_kl`` (the default), so ``u_c/|y_c| -
    u_r/|y_r|``. Lengths are clamped to at least 1.
    """
    pc, pr, rc, rr, lc, lr = _inputs("sigmoid_norm", (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                                      ref_rejected_logps, chosen_lengths, rejected_lengths),
                                     pair_mask, need_lengths=True)
    check_f_divergence(f_divergence_type, f_alpha_divergence_coef, "sigmoid_norm")
    score = lambda u: divergence_scores(u, f_divergence_type, f_alpha_divergence_coef)
    delta = average_logps(score(pc - rc), lc) - average_logps(score(pr - rr), lr)
    return pair_metrics(-jax.nn.log_sigmoid(beta * delta), beta * (pc - rc), beta * (pr - rr), pc, pr, pair_mask,
                        weights=pair_weights)


def chosen_nll_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None,
                    ref_rejected_logps=None, chosen_lengths=None, rejected_lengths=None, *,
                    beta: float = 0.1, pair_mask=None, pair_weights=None):
    """TRL's ``sft`` loss type: the chosen reply's NLL, ``mean( -pi_c / |y_c| )``, reference-free.

    Meant as one term of a combination (``make_dpo_loss.kind = ['sigmoid',
    'bco_pair', 'sft']``, MPO). Averaged per pair, as RPO's term is (TRL
    averages over all chosen tokens of the batch; equal when the lengths
    are). ``beta`` only scales the logged rewards, ``beta * pi / |y|``.
    """
    pc, pr, _, _, lc, lr = _inputs("sft", (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                           ref_rejected_logps, chosen_lengths, rejected_lengths), pair_mask,
                                   need_ref=False, need_lengths=True)
    apc, apr = average_logps(pc, lc), average_logps(pr, lr)
    return pair_metrics(-apc, beta * apc, beta * apr, apc, apr, pair_mask, weights=pair_weights)


RELATIVES = {
    "exo_pair": exo_pair_loss,
    "nca_pair": nca_pair_loss,
    "bco_pair": bco_pair_loss,
    "sppo_hard": sppo_hard_loss,
    "aot": aot_loss,
    "aot_unpaired": aot_unpaired_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
    "discopop": discopop_loss,
    "sigmoid_norm": sigmoid_norm_loss,
    "sft": chosen_nll_loss,
}
"""These losses by their TRL ``loss_type`` names (merged into :data:`~jaxpost.losses.dpo.PREFERENCE_LOSSES`)."""
