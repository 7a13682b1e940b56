"""Preference pairs whose prompt is run once for both replies (``SHARED_PROMPT_KEYS``).

A pair becomes one row ``prompt | chosen | rejected`` of ``P + 2R`` slots,
run under :class:`~jaxpost.models.attention.Branches`: the prompt (left-padded
to ``P``) is computed once, and each reply (right-padded to ``R``) attends
to the prompt and to itself only, with positions continuing the prompt.
That is exactly the model's view of ``prompt + chosen`` and
``prompt + rejected`` as two rows, at ``P + 2R`` tokens instead of
``2 (P + R)``; and the LM head runs on the ``2R`` reply predictions only,
never on prompt slots.

Slot ``P - 1`` (the prompt's last token) predicts both replies' first
token; reply slot ``t`` predicts the reply's token ``t + 1``.
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp

from jaxpost.losses.sequence import ld_sequence_logps, sequence_logps, wpo_weights
from jaxpost.models import Branches, forward, inputs_from_attention_mask
from jaxpost.models.config import ModelConfig
from jaxpost.models.heads import scores, token_logprobs

SIDES = ("chosen", "rejected")


def shared_rows(batch: Mapping):
    """``(tokens, positions, segment_ids)`` ``[B, P + 2R]`` and the :class:`Branches` of a shared-prompt batch.

    Prompt positions count its real tokens from 0 (padding slots get 0);
    each reply's positions continue from the prompt's length.
    """
    prompt_pos, prompt_mask = inputs_from_attention_mask(batch["prompt_mask"])
    P, R = prompt_mask.shape[1], batch["chosen_mask"].shape[1]
    n_prompt = jnp.sum(prompt_mask, axis=1, keepdims=True)
    reply_pos = n_prompt + jnp.arange(R, dtype=jnp.int32)[None]
    tokens = jnp.concatenate([batch["prompt_tokens"]] + [batch[f"{s}_tokens"] for s in SIDES], axis=1)
    positions = jnp.concatenate([prompt_pos, reply_pos, reply_pos], axis=1)
    segments = jnp.concatenate([prompt_mask] + [batch[f"{s}_mask"].astype(jnp.int32) for s in SIDES], axis=1)
    return tokens.astype(jnp.int32), positions.astype(jnp.int32), segments, Branches(prefix=P, count=2)


def _reply_hidden(hidden, P: int, R: int):
    """Hidden states that predict each reply's tokens: ``[2B, R, D]``, chosen rows first.

    Reply token ``t`` is predicted at slot ``P - 1`` (``t = 0``) or at the
    reply's own slot ``t - 1``.
    """
    last_prompt = hidden[:, P - 1:P]
    chosen = jnp.concatenate([last_prompt, hidden[:, P:P + R - 1]], axis=1)
    rejected = jnp.concatenate([last_prompt, hidden[:, P + R:P + 2 * R - 1]], axis=1)
    return jnp.concatenate([chosen, rejected], axis=0)


def shared_pair_logps(graphdef, config: ModelConfig, params, batch: Mapping, *, chunk_size: int = 512,
                      ld_alpha: float | None = None, wpo: bool = False):
    """Summed reply log-probs and lengths per pair: ``(pi_c, pi_r, len_c, len_r)`` ``[B]``.

    ``pi_side = sum_t log p(side_tokens[t] | prompt, side_tokens[:t]) side_loss_mask[t]``,
    ``len_side = sum_t side_loss_mask[t]``; one forward over ``[B, P + 2R]``.
    ``ld_alpha``: LD-DPO's weighted sums (:func:`~jaxpost.losses.sequence.ld_sequence_logps`).
    ``wpo``: also each pair's WPO weight ``w_c w_r`` ``[B]`` (:func:`~jaxpost.losses.sequence.wpo_weights`).
    """
    tokens, positions, segments, branches = shared_rows(batch)
    hidden, _ = forward(graphdef, params, tokens, positions, segments, branches=branches)
    B, P, R = tokens.shape[0], branches.prefix, batch["chosen_tokens"].shape[1]
    targets = jnp.concatenate([batch[f"{s}_tokens"] for s in SIDES], axis=0).astype(jnp.int32)
    out = token_logprobs(params, config, _reply_hidden(hidden, P, R), targets, chunk_size=chunk_size,
                         return_log_sum_sq=wpo)
    logp = out[0] if wpo else out
    mask = jnp.concatenate([batch[f"{s}_loss_mask"] for s in SIDES], axis=0)
    if ld_alpha is not None:
        sums = ld_sequence_logps(logp[:B], mask[:B], logp[B:], mask[B:], ld_alpha)
    else:
        total, length = sequence_logps(logp, mask)
        sums = total[:B], total[B:], length[:B], length[B:]
    if not wpo:
        return sums
    w = wpo_weights(logp, out[1], mask)
    return (*sums, w[:B] * w[B:])


def shared_pair_scores(graphdef, params, batch: Mapping):
    """Scalar scores at each reply's last real token (``head="score"`` model): ``(r_c, r_r)`` ``[B]``.

    The last real token of a reply of ``n`` tokens sits at slot ``P + n - 1``
    (chosen) or ``P + R + n - 1`` (rejected); an empty reply reads the
    prompt's last slot.
    """
    tokens, positions, segments, branches = shared_rows(batch)
    hidden, _ = forward(graphdef, params, tokens, positions, segments, branches=branches)
    s = scores(params, hidden).astype(jnp.float32)
    P, R = branches.prefix, batch["chosen_tokens"].shape[1]
    out = []
    for i, side in enumerate(SIDES):
        n = jnp.sum(batch[f"{side}_mask"].astype(jnp.int32), axis=1)
        idx = jnp.where(n > 0, P + i * R + n - 1, P - 1)
        out.append(jnp.take_along_axis(s, idx[:, None], axis=1)[:, 0])
    return tuple(out)


def is_shared_prompt(batch: Mapping) -> bool:
    """True for the shared-prompt preference layout (it has ``prompt_tokens``)."""
    return "prompt_tokens" in batch


def check_shared_shapes(batch: Mapping) -> None:
    """Raises ``ValueError`` unless the prompt arrays are ``[B, P >= 1]`` and every reply array ``[B, R]``."""
    B, P = batch["prompt_tokens"].shape
    R = batch["chosen_tokens"].shape[1]
    bad = {k: tuple(batch[k].shape) for s in SIDES for k in (f"{s}_tokens", f"{s}_mask", f"{s}_loss_mask")
           if tuple(batch[k].shape) != (B, R)}
    if bad or P < 1 or tuple(batch["prompt_mask"].shape) != (B, P):
        raise ValueError(f"shared-prompt batch: prompt arrays must be [B, P >= 1] and every reply array "
                         f"[B, R] = {(B, R)}; got prompt {tuple(batch['prompt_tokens'].shape)}, "
                         f"prompt_mask {tuple(batch['prompt_mask'].shape)}, mismatched {bad}")

