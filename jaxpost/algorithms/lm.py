"""Running the model over a batch: per-token log-probs, paired forwards, predictions."""

from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp

from jaxpost.models import forward
from jaxpost.models.config import ModelConfig
from jaxpost.models.heads import lm_head_weight, map_position_chunks, scores, token_logprobs


def lm_token_logprobs(graphdef, config: ModelConfig, params, batch: Mapping, *, prefix: str = "",
                      chunk_size: int = 512, return_entropy: bool = False, return_log_sum_sq: bool = False):
    """``log p(targets | tokens)`` ``[B, L]`` for the keys ``{prefix}tokens`` etc. of ``batch``
    (and the extras of :func:`~jaxpost.models.heads.token_logprobs` asked for)."""
    hidden, _ = forward(graphdef, params, batch[prefix + "tokens"], batch[prefix + "positions"],
                        batch[prefix + "segment_ids"])
    return token_logprobs(params, config, hidden, batch[prefix + "targets"], chunk_size=chunk_size,
                          return_entropy=return_entropy, return_log_sum_sq=return_log_sum_sq)


def _concat_pair(batch: Mapping, key: str) -> jax.Array:
    return jnp.concatenate([batch["chosen_" + key], batch["rejected_" + key]], axis=0)


def pair_token_logprobs(graphdef, config: ModelConfig, params, batch: Mapping, *, chunk_size: int = 512,
                        return_log_sum_sq: bool = False):
    """Token log-probs of chosen and rejected, from ONE forward over ``[2B, L]``.

    Concatenating the pair into one batch halves the number of forward calls
    (and weight reads) against two separate passes. Returns
    ``(chosen [B, L], rejected [B, L])``, then with ``return_log_sum_sq``
    their ``log sum_v p_v^2`` (WPO) the same way.
    """
    joint = {k: _concat_pair(batch, k) for k in ("tokens", "positions", "segment_ids", "targets")}
    out = lm_token_logprobs(graphdef, config, params, joint, chunk_size=chunk_size,
                            return_log_sum_sq=return_log_sum_sq)
    b = batch["chosen_tokens"].shape[0]
    halves = lambda x: (x[:b], x[b:])  # noqa: E731
    return (*halves(out[0]), *halves(out[1])) if return_log_sum_sq else halves(out)


def pair_scores(graphdef, params, batch: Mapping):
    """Scalar scores of chosen and rejected at each sequence's last real token, one forward.

    For a ``head="score"`` model (reward or value model). Returns ``([B], [B])``.
    """
    from jaxpost.losses.reward import gather_last

    joint = {k: _concat_pair(batch, k) for k in ("tokens", "positions", "segment_ids")}
    hidden, _ = forward(graphdef, params, joint["tokens"], joint["positions"], joint["segment_ids"])
    r = gather_last(scores(params, hidden), joint["segment_ids"])
    b = batch["chosen_tokens"].shape[0]
    return r[:b], r[b:]


def _chunk_argmax(weight, h, dtype):
    z = jnp.einsum("bcd,dv->bcv", h.astype(dtype), weight.astype(dtype), preferred_element_type=jnp.float32)
    return jnp.argmax(z, axis=-1).astype(jnp.int32)


def predictions(params, config: ModelConfig, hidden: jax.Array, chunk_size: int = 512) -> jax.Array:
    """Greedy next-token predictions ``argmax_v logits[b, t, v]`` ``[B, L]``, chunked over positions."""
    weight = lm_head_weight(params, config)
    return map_position_chunks(functools.partial(_chunk_argmax, weight, dtype=jnp.dtype(config.dtype)), hidden,
                               chunk_size=chunk_size, checkpoint=False)
