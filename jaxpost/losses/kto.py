"""KTO (Ethayarajh et al. 2024): unpaired desirable / undesirable feedback, from per-sequence log-probs.

Every example is one completion ``y`` of a prompt ``x`` with a binary label
(desirable, e.g. thumbs up; undesirable, thumbs down). Inputs are ``[B]``
arrays: the *summed* completion log-probs under the policy
(``policy_logps``) and the reference (``ref_logps``), the same for the
*mismatched* KL sequences (``policy_kl_logps``, ``ref_kl_logps``: prompt
``x_i`` with another example's completion, see below), and ``labels``
(1.0 desirable, 0.0 undesirable).

Formula (the paper's Eq. 7-8, as TRL 1.16's ``KTOTrainer`` computes it)::

    r_i  = pi(y_i | x_i) - ref(y_i | x_i)                      (log-ratio)
    z0   = max(0, mean_j( pi(y'_j | x_j) - ref(y'_j | x_j) ))  (KL estimate, no gradient)
    v_i  = 1 - sigma(beta (r_i - z0))    if y_i desirable
           1 - sigma(beta (z0 - r_i))    if y_i undesirable
    loss = mean_i( w_i v_i ),  w_i = desirable_weight or undesirable_weight

``loss_type='apo_zero_unpaired'`` (APO-zero, D'Oosterlinck et al. 2024,
unpaired): ``v_i = 1 - sigma(beta r_i)`` desirable, ``sigma(beta r_i)``
undesirable, and no KL term (``z0 = 0``, the KL inputs may be None).

The KL sequences: TRL rotates the completions by one within each batch,
``(x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1})``, so the mismatched
completions are the batch's own completions under other prompts;
:func:`jaxpost.data.unpaired.make_unpaired_pipeline` builds the same rotation
over the real rows of each batch. ``z0`` is the mean over the batch; TRL
takes the mean over each device's batch and then over devices, which equals
jaxpost's mean over the global batch when the devices hold equal numbers of
examples.

``example_mask`` (``[B]`` float {0,1}) drops padding rows from every mean,
the KL mean included.

Metrics (TRL names): ``loss``, ``kl`` (``z0``), ``rewards/chosen`` and
``logps/chosen`` (means of ``beta r_i`` and of ``pi(y_i | x_i)`` over the
desirable examples), ``rewards/rejected`` and ``logps/rejected`` (over the
undesirable ones), ``rewards/margins`` (chosen minus rejected). TRL skips a
metric whose group is empty in a batch; here it is 0 (fixed keys under
``jit``), and ``count/chosen``, ``count/rejected`` say how many examples
each group had.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpost.losses.checks import check_rank, check_same_shape, f32
from jaxpost.losses.stats import masked_mean

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")

_NAMES = ("policy_logps", "ref_logps", "policy_kl_logps", "ref_kl_logps", "labels", "example_mask")


def kl_estimate(policy_kl_logps, ref_kl_logps, example_mask=None):
    """KTO's reference point ``z0 = max(0, mean(pi_kl - ref_kl))`` over the real rows, without gradient."""
    pk, rk = f32(policy_kl_logps), f32(ref_kl_logps)
    m = jnp.ones_like(pk) if example_mask is None else f32(example_mask)
    return jax.lax.stop_gradient(jnp.maximum(masked_mean(pk - rk, m), 0.0))


def kto_loss(policy_logps, ref_logps, policy_kl_logps, ref_kl_logps, labels, *, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0, loss_type: str = "kto",
             example_mask=None):
    """KTO loss and TRL's metrics; see the module docstring for the formula. Returns ``(loss, metrics)``."""
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"Unknown KTO loss_type {loss_type!r}; choose one of {KTO_LOSS_TYPES}")
    pi, ref = f32(policy_logps), f32(ref_logps)
    check_rank("policy_logps", pi, 1, "[B]")
    check_same_shape(_NAMES, (pi, ref, policy_kl_logps, ref_kl_logps, labels, example_mask), "[B]")
    if loss_type == "kto" and (policy_kl_logps is None or ref_kl_logps is None):
        raise ValueError("kto loss needs policy_kl_logps and ref_kl_logps ([B] each, the mismatched pairs)")
    m = jnp.ones_like(pi) if example_mask is None else f32(example_mask)
    desirable = (f32(labels) > 0.5).astype(jnp.float32)
    logratio = pi - ref
    if loss_type == "kto":
        z0 = kl_estimate(policy_kl_logps, ref_kl_logps, m)
        losses = jnp.where(desirable > 0, 1.0 - jax.nn.sigmoid(beta * (logratio - z0)),
                           1.0 - jax.nn.sigmoid(beta * (z0 - logratio)))
    else:
        z0 = jnp.float32(0.0)
        losses = jnp.where(desirable > 0, 1.0 - jax.nn.sigmoid(beta * logratio), jax.nn.sigmoid(beta * logratio))
    weights = desirable * desirable_weight + (1.0 - desirable) * undesirable_weight
    loss = masked_mean(weights * losses, m)
    rewards = jax.lax.stop_gradient(beta * logratio)
    chosen, rejected = m * desirable, m * (1.0 - desirable)
    metrics = {
        "loss": loss,
        "kl": z0,
        "rewards/chosen": masked_mean(rewards, chosen),
        "rewards/rejected": masked_mean(rewards, rejected),
        "logps/chosen": masked_mean(jax.lax.stop_gradient(pi), chosen),
        "logps/rejected": masked_mean(jax.lax.stop_gradient(pi), rejected),
        "count/chosen": jnp.sum(chosen),
        "count/rejected": jnp.sum(rejected),
    }
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return loss, metrics
