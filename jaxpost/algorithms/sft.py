"""Supervised fine-tuning: next-token NLL on response tokens (batch spec ``LM_KEYS``)."""

from __future__ import annotations

import jax.numpy as jnp

from jaxpost.algorithms.batch import LM_KEYS, check_batch
from jaxpost.algorithms.lm import predictions
from jaxpost.losses.sft import masked_token_nll, token_accuracy
from jaxpost.models import forward
from jaxpost.models.config import ModelConfig
from jaxpost.models.heads import token_logprobs


def make_sft_loss(graphdef, config: ModelConfig, chunk_size: int = 512):
    """``loss(params, batch, frozen)`` = ``sum_t -log p(y_t) m_t / sum_t m_t``.

    ``m`` is ``batch["loss_mask"]`` (1 on response tokens). Metrics carry
    ``loss_sum`` and ``loss_tokens`` so gradient accumulation normalises by
    the total number of trained tokens (see :mod:`jaxpost.train.step`).
    ``frozen`` is unused.
    """
    def loss_fn(params, batch, frozen=None):
        check_batch(batch, LM_KEYS, "SFT")
        hidden, _ = forward(graphdef, params, batch["tokens"], batch["positions"], batch["segment_ids"])
        logp = token_logprobs(params, config, hidden, batch["targets"], chunk_size=chunk_size)
        nll, n = masked_token_nll(logp, batch["loss_mask"])
        return nll / jnp.maximum(n, 1.0), {"loss_sum": nll, "loss_tokens": n}

    return loss_fn


def make_sft_eval(graphdef, config: ModelConfig, chunk_size: int = 512):
    """``eval(params, batch, frozen) -> metrics``: ``loss``, ``token_accuracy``, ``loss_tokens``."""
    def eval_fn(params, batch, frozen=None):
        hidden, _ = forward(graphdef, params, batch["tokens"], batch["positions"], batch["segment_ids"])
        logp = token_logprobs(params, config, hidden, batch["targets"], chunk_size=chunk_size)
        nll, n = masked_token_nll(logp, batch["loss_mask"])
        acc = token_accuracy(predictions(params, config, hidden, chunk_size), batch["targets"], batch["loss_mask"])
        return {"loss": nll / jnp.maximum(n, 1.0), "token_accuracy": acc, "loss_tokens": n}

    return eval_fn
