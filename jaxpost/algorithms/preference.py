"""Preference algorithms over ``PREFERENCE_KEYS`` batches: the DPO family and reward models."""

from __future__ import annotations

import gin
import jax
import jax.numpy as jnp

from jaxpost.algorithms.batch import PREFERENCE_KEYS, check_batch
from jaxpost.algorithms.lm import pair_scores, pair_token_logprobs
from jaxpost.losses.dpo import PREFERENCE_LOSSES
from jaxpost.losses.reward import bradley_terry_loss
from jaxpost.models.config import ModelConfig

REFERENCE_FREE = ("simpo", "orpo")


def sequence_logps(token_logps, loss_mask):
    """Summed response log-prob and response length per row: ``([B], [B])``."""
    return jnp.sum(token_logps * loss_mask, axis=-1), jnp.sum(loss_mask, axis=-1)


@gin.configurable(denylist=["graphdef", "config"])
def make_dpo_loss(graphdef, config: ModelConfig, kind: str = "sigmoid", beta: float = 0.1,
                  chunk_size: int = 512, **hparams):
    """``loss(params, batch, frozen)`` for any loss in :data:`PREFERENCE_LOSSES`.

    Policy log-probs of chosen and rejected come from one concatenated
    forward. The reference log-probs come, in order of preference, from the
    batch (``ref_chosen_logps``/``ref_rejected_logps``, precomputed once by
    :func:`jaxpost.pipelines.reference.precompute_reference_logps`), or from
    ``frozen["reference"]`` (a frozen params tree on the same mesh, run under
    ``stop_gradient``). SimPO and ORPO need no reference. ``hparams`` go to
    the loss (``label_smoothing``, ``gamma``, ``rpo_alpha``, ``tau``...).
    """
    if kind not in PREFERENCE_LOSSES:
        raise ValueError(f"Unknown preference loss {kind!r}; choose one of {sorted(PREFERENCE_LOSSES)}")
    loss_math = PREFERENCE_LOSSES[kind]

    def loss_fn(params, batch, frozen=None):
        check_batch(batch, PREFERENCE_KEYS, f"DPO ({kind})")
        pc_tok, pr_tok = pair_token_logprobs(graphdef, config, params, batch, chunk_size=chunk_size)
        pc, lc = sequence_logps(pc_tok, batch["chosen_loss_mask"])
        pr, lr = sequence_logps(pr_tok, batch["rejected_loss_mask"])
        rc = rr = None
        if "ref_chosen_logps" in batch:
            rc, rr = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        elif kind not in REFERENCE_FREE:
            if not frozen or "reference" not in frozen:
                raise ValueError(f"{kind} DPO needs a reference: frozen['reference'] params or precomputed "
                                 "ref_chosen_logps/ref_rejected_logps in the batch")
            ref = jax.lax.stop_gradient(frozen["reference"])
            rc_tok, rr_tok = pair_token_logprobs(graphdef, config, ref, batch, chunk_size=chunk_size)
            rc, _ = sequence_logps(rc_tok, batch["chosen_loss_mask"])
            rr, _ = sequence_logps(rr_tok, batch["rejected_loss_mask"])
        loss, metrics = loss_math(pc, pr, rc, rr, lc, lr, beta=beta, pair_mask=batch.get("pair_mask"), **hparams)
        return loss, metrics

    loss_fn.kind = kind
    loss_fn.needs_reference = kind not in REFERENCE_FREE
    return loss_fn


@gin.configurable(denylist=["graphdef", "config"])
def make_reward_loss(graphdef, config: ModelConfig, center_coef: float = 0.0):
    """Bradley-Terry ``loss(params, batch, frozen)`` for a ``head="score"`` model.

    ``-log sigmoid(r_c - r_r - margin) + center_coef * mean((r_c + r_r)^2)``
    with ``r`` the score at each sequence's last real token; ``margin`` is
    the optional ``batch["margin"]`` column.
    """
    if config.head != "score":
        raise ValueError(f"A reward model needs ModelConfig.head='score', got {config.head!r}")

    def loss_fn(params, batch, frozen=None):
        check_batch(batch, PREFERENCE_KEYS, "reward")
        rc, rr = pair_scores(graphdef, params, batch)
        return bradley_terry_loss(rc, rr, margin=batch.get("margin"), center_coef=center_coef,
                                  pair_mask=batch.get("pair_mask"))

    return loss_fn
