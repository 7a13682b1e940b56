"""Supervised fine-tuning: masked next-token negative log-likelihood.

Normalisation is explicit. :func:`masked_token_nll` returns the *sum* of the
NLL over trained tokens and the *count* of those tokens, so that gradient
accumulation over micro-batches can divide the total summed NLL by the total
token count (``sum_k nll_k / sum_k n_k``), which equals the loss of one big
batch. Averaging per-micro-batch means instead would weight short
micro-batches more. :func:`sft_loss` is the one-batch mean.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxpost.losses.checks import check_rank, check_same_shape, f32


def masked_token_nll(token_logps, loss_mask):
    """Summed NLL and token count: ``(sum(-logp * mask), sum(mask))``.

    Args:
      token_logps: ``[B,L]`` log p(target token) per position.
      loss_mask: ``[B,L]`` float {0,1}; 1 where the prediction is trained.

    Returns:
      ``(sum_nll, n_tokens)``, both float32 scalars.
    """
    check_rank("token_logps", token_logps, 2, "[B,L]")
    check_same_shape(("token_logps", "loss_mask"), (token_logps, loss_mask), "[B,L]")
    mask = f32(loss_mask)
    return jnp.sum(-f32(token_logps) * mask), jnp.sum(mask)


def sft_loss(token_logps, loss_mask):
    """Mean NLL per trained token: ``sum(-logp * mask) / max(sum(mask), 1)``.

    Returns ``(loss, metrics)`` with metrics ``loss`` and ``loss_tokens`` (the
    token count, for accumulation as described in the module docstring).
    """
    total, n = masked_token_nll(token_logps, loss_mask)
    loss = total / jnp.maximum(n, 1.0)
    return loss, {"loss": loss, "loss_tokens": n}


def token_accuracy(predictions, targets, loss_mask):
    """Fraction of trained tokens predicted exactly: ``sum((pred == target) * mask) / max(sum(mask), 1)``.

    Args:
      predictions: ``[B,L]`` int, e.g. ``argmax`` of the logits.
      targets: ``[B,L]`` int target tokens.
      loss_mask: ``[B,L]`` float {0,1}.

    TRL logs the same quantity as ``mean_token_accuracy``.
    """
    check_rank("predictions", predictions, 2, "[B,L]")
    check_same_shape(("predictions", "targets", "loss_mask"), (predictions, targets, loss_mask), "[B,L]")
    mask = f32(loss_mask)
    correct = (jnp.asarray(predictions) == jnp.asarray(targets)).astype(jnp.float32)
    return jnp.sum(correct * mask) / jnp.maximum(jnp.sum(mask), 1.0)
