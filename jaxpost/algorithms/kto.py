"""KTO on unpaired feedback: the model run over a ``KTO_KEYS`` batch, then :func:`jaxpost.losses.kto.kto_loss`."""

from __future__ import annotations

import gin
import jax
import jax.numpy as jnp

from jaxpost.algorithms.batch import KTO_KEYS, check_batch
from jaxpost.algorithms.lm import lm_token_logprobs
from jaxpost.config import checks_values_of
from jaxpost.errors import require
from jaxpost.losses.kto import KTO_LOSS_TYPES, kto_loss
from jaxpost.losses.sequence import sequence_logps
from jaxpost.models.config import ModelConfig

_LM = ("tokens", "positions", "segment_ids", "targets")


def kto_sequence_logps(graphdef, config: ModelConfig, params, batch, *, with_kl: bool = True,
                       chunk_size: int = 512):
    """Summed completion log-probs ``[B]`` of the matched and (``with_kl``) the KL sequences, one forward.

    ``pi_i = sum_t log p(targets_t) loss_mask_t``; with ``with_kl`` the
    matched and mismatched rows are concatenated into one ``[2B, L]`` forward
    and ``(pi, pi_kl)`` is returned, else ``(pi, None)``.
    """
    if not with_kl:
        tok = lm_token_logprobs(graphdef, config, params, batch, chunk_size=chunk_size)
        return sequence_logps(tok, batch["loss_mask"])[0], None
    joint = {k: jnp.concatenate([batch[k], batch["kl_" + k]], axis=0) for k in _LM}
    tok = lm_token_logprobs(graphdef, config, params, joint, chunk_size=chunk_size)
    b = batch["tokens"].shape[0]
    return sequence_logps(tok[:b], batch["loss_mask"])[0], sequence_logps(tok[b:], batch["kl_loss_mask"])[0]


@checks_values_of("make_kto_loss")
def check_kto_loss_values(beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                          loss_type: str = "kto") -> None:
    """Raises :class:`~jaxpost.errors.UserError` naming the ``make_kto_loss`` key of an out-of-range value."""
    require("make_kto_loss.loss_type", loss_type, loss_type in KTO_LOSS_TYPES,
            "one of " + ", ".join(map(repr, KTO_LOSS_TYPES)))
    require("make_kto_loss.beta", beta, beta > 0, "> 0")
    require("make_kto_loss.desirable_weight", desirable_weight, desirable_weight >= 0, ">= 0")
    require("make_kto_loss.undesirable_weight", undesirable_weight, undesirable_weight >= 0, ">= 0")


@gin.configurable(denylist=["graphdef", "config"])
def make_kto_loss(graphdef, config: ModelConfig, beta: float = 0.1, desirable_weight: float = 1.0,
                  undesirable_weight: float = 1.0, loss_type: str = "kto", chunk_size: int = 512):
    """``loss(params, batch, frozen)`` for KTO (``loss_type='kto'``) or unpaired APO-zero.

    Policy log-probs of the matched and KL sequences come from one forward;
    the reference's from the batch (``ref_logps``/``ref_kl_logps``) when
    precomputed, else from ``frozen["reference"]`` under ``stop_gradient``.
    Returns ``loss_tokens`` = the number of real examples, so gradient
    accumulation and evaluation weigh batches by their examples.
    """
    check_kto_loss_values(beta, desirable_weight, undesirable_weight, loss_type)
    with_kl = loss_type == "kto"

    def loss_fn(params, batch, frozen=None):
        check_batch(batch, KTO_KEYS, "KTO")
        pi, pi_kl = kto_sequence_logps(graphdef, config, params, batch, with_kl=with_kl, chunk_size=chunk_size)
        if "ref_logps" in batch:
            ref, ref_kl = batch["ref_logps"], batch.get("ref_kl_logps")
        else:
            if not frozen or "reference" not in frozen:
                raise ValueError("KTO needs a reference: frozen['reference'] params or precomputed "
                                 "ref_logps/ref_kl_logps in the batch")
            ref_params = jax.lax.stop_gradient(frozen["reference"])
            ref, ref_kl = kto_sequence_logps(graphdef, config, ref_params, batch, with_kl=with_kl,
                                             chunk_size=chunk_size)
        mask = batch["example_mask"]
        loss, metrics = kto_loss(pi, ref, pi_kl, ref_kl, batch["label"], beta=beta,
                                 desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
                                 loss_type=loss_type, example_mask=mask)
        metrics["loss_tokens"] = jnp.sum(mask)
        return loss, metrics

    loss_fn.kind = loss_type
    loss_fn.needs_reference = True
    return loss_fn
