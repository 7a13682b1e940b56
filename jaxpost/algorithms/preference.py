"""Preference algorithms: the DPO family and reward models.

Both take any preference layout of :mod:`jaxpost.algorithms.batch`: one
pair per row (``PREFERENCE_KEYS``), packed rows (``PACKED_PREFERENCE_KEYS``)
or one row per pair with the prompt run once for both replies
(``SHARED_PROMPT_KEYS``). Either way the model is run once and reduced to
per-pair arrays, flattened to ``[N]`` (``N = B``, or ``B * K`` packed, empty
slots masked by ``pair_mask``), which the loss math in :mod:`jaxpost.losses`
reads unchanged.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable

import gin
import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.algorithms.batch import (PACKED_PREFERENCE_KEYS, PREFERENCE_KEYS, SHARED_PROMPT_KEYS, check_batch,
                                      is_packed_preference)
from jaxpost.algorithms.lm import pair_scores, pair_token_logprobs
from jaxpost.algorithms.packed_pairs import packed_pair_logps, packed_pair_scores
from jaxpost.algorithms.shared_prompt import (check_shared_shapes, is_shared_prompt, shared_pair_logps,
                                              shared_pair_scores)
from jaxpost.config import checks_values_of
from jaxpost.errors import UserError, require
from jaxpost.losses.dpo import PREFERENCE_LOSSES
from jaxpost.losses.reward import bradley_terry_loss
from jaxpost.losses.sequence import sequence_logps
from jaxpost.models.config import ModelConfig
from jaxpost.models.lora import has_adapters, without_adapters

REFERENCE_FREE = ("simpo", "orpo")


def pair_column(batch, key: str):
    """A per-pair entry of either layout as ``[N]`` (packed ``[B, K]`` flattened), or None if absent."""
    value = batch.get(key)
    return None if value is None else jnp.reshape(value, (-1,))


def check_preference_batch(batch, what: str) -> bool:
    """Checks ``batch`` against the spec of its layout; returns True when it is packed."""
    if is_shared_prompt(batch):
        check_batch(batch, SHARED_PROMPT_KEYS, what)
        check_shared_shapes(batch)
        return False
    packed = is_packed_preference(batch)
    check_batch(batch, PACKED_PREFERENCE_KEYS if packed else PREFERENCE_KEYS, what)
    return packed


def pair_sequence_logps(graphdef, config: ModelConfig, params, batch, *, chunk_size: int = 512):
    """Summed response log-probs and lengths per pair, any layout: ``(pi_c, pi_r, len_c, len_r)`` ``[N]``.

    ``pi = sum_t log p(target_t) loss_mask_t`` over one response,
    ``len = sum_t loss_mask_t``; one forward over all sequences of the batch.
    """
    if is_shared_prompt(batch):
        return shared_pair_logps(graphdef, config, params, batch, chunk_size=chunk_size)
    if is_packed_preference(batch):
        out = packed_pair_logps(graphdef, config, params, batch, chunk_size=chunk_size)
        return tuple(jnp.reshape(x, (-1,)) for x in out)
    c_tok, r_tok = pair_token_logprobs(graphdef, config, params, batch, chunk_size=chunk_size)
    pc, lc = sequence_logps(c_tok, batch["chosen_loss_mask"])
    pr, lr = sequence_logps(r_tok, batch["rejected_loss_mask"])
    return pc, pr, lc, lr


def dpo_loss_options(kind: str) -> tuple[Callable, dict[str, inspect.Parameter]]:
    """The loss ``kind`` names, and its parameters that ``make_dpo_loss.<name>`` binds (``gamma``...).

    Those are the loss's keyword-only parameters but ``beta`` (a parameter
    of ``make_dpo_loss`` itself) and ``pair_mask`` (from the batch).
    """
    loss = PREFERENCE_LOSSES[kind]
    return loss, {n: p for n, p in inspect.signature(loss).parameters.items()
                  if p.kind is p.KEYWORD_ONLY and n not in ("beta", "pair_mask")}


@checks_values_of("make_dpo_loss", passes_on=lambda values: dpo_loss_options(values["kind"]))
def check_dpo_loss_values(kind: str = "sigmoid", beta: float = 0.1, **hparams) -> None:
    """Raises :class:`~jaxpost.errors.UserError` naming the ``make_dpo_loss`` key of a value the loss cannot use.

    ``kind`` must name a loss of :data:`PREFERENCE_LOSSES`, ``beta > 0``, and
    each of ``hparams`` must be a parameter of that loss (a misspelt
    ``label_smothing`` would otherwise reach the loss only at its first
    trace). The loss then runs once on one made-up pair, so that its own
    checks (``0 <= label_smoothing < 1``...) apply now.
    """
    require("make_dpo_loss.kind", kind, kind in PREFERENCE_LOSSES, "one of " + ", ".join(map(repr, PREFERENCE_LOSSES)))
    require("make_dpo_loss.beta", beta, beta > 0, "> 0")
    loss, takes = dpo_loss_options(kind)
    for name in hparams:
        if name not in takes:
            raise UserError(f"make_dpo_loss.{name} is not a parameter of the {kind!r} loss; it takes "
                            f"{', '.join('make_dpo_loss.' + n for n in ['beta', *takes])}")
    one = np.full((1,), -1.0, np.float32)  # log-probs < 0, lengths 1, as a real pair has
    try:
        loss(one, one, one, one, -one, -one, beta=beta, pair_mask=-one, **hparams)
    except ValueError as e:
        raise UserError(f"make_dpo_loss (kind={kind!r}): {e}") from None


@gin.configurable(denylist=["graphdef", "config"])
def make_dpo_loss(graphdef, config: ModelConfig, kind: str = "sigmoid", beta: float = 0.1,
                  chunk_size: int = 512, **hparams):
    """``loss(params, batch, frozen)`` for any loss in :data:`PREFERENCE_LOSSES`.

    Policy log-probs of chosen and rejected come from one concatenated
    forward. The reference log-probs come, in order of preference, from the
    batch (``ref_chosen_logps``/``ref_rejected_logps``, precomputed once by
    :func:`jaxpost.algorithms.reference.precompute_reference_logps`), or from
    ``frozen["reference"]`` (a frozen params tree on the same mesh, run under
    ``stop_gradient``). SimPO and ORPO need no reference. ``hparams`` go to
    the loss (``label_smoothing``, ``gamma``, ``rpo_alpha``, ``tau``...).

    Packed batches give the same loss, metrics and gradients as the same
    pairs unpacked; they also return ``loss_tokens`` = the number of real
    pairs (what the loss averages over), so gradient accumulation weights
    micro-batches, which hold different numbers of pairs, exactly.
    """
    check_dpo_loss_values(kind, beta, **hparams)
    loss_math = PREFERENCE_LOSSES[kind]

    def loss_fn(params, batch, frozen=None):
        packed = check_preference_batch(batch, f"DPO ({kind})")
        pc, pr, lc, lr = pair_sequence_logps(graphdef, config, params, batch, chunk_size=chunk_size)
        rc = rr = None
        if "ref_chosen_logps" in batch:
            rc, rr = pair_column(batch, "ref_chosen_logps"), pair_column(batch, "ref_rejected_logps")
        elif kind not in REFERENCE_FREE:
            if not frozen or "reference" not in frozen:
                raise ValueError(f"{kind} DPO needs a reference: frozen['reference'] params or precomputed "
                                 "ref_chosen_logps/ref_rejected_logps in the batch")
            ref = jax.lax.stop_gradient(frozen["reference"])
            rc, rr, _, _ = pair_sequence_logps(graphdef, config, ref, batch, chunk_size=chunk_size)
        pair_mask = pair_column(batch, "pair_mask")
        loss, metrics = loss_math(pc, pr, rc, rr, lc, lr, beta=beta, pair_mask=pair_mask, **hparams)
        if packed:
            metrics["loss_tokens"] = jnp.sum(pair_mask)
        return loss, metrics

    loss_fn.kind = kind
    loss_fn.needs_reference = kind not in REFERENCE_FREE
    return loss_fn


@gin.configurable(denylist=["graphdef", "config"])
def make_reward_loss(graphdef, config: ModelConfig, center_coef: float = 0.0):
    """Bradley-Terry ``loss(params, batch, frozen)`` for a ``head="score"`` model.

    ``-log sigmoid(r_c - r_r - margin) + center_coef * mean((r_c + r_r)^2)``
    with ``r`` the score at each sequence's last real token; ``margin`` is
    the optional ``batch["margin"]`` column. Either batch layout; packed
    batches read each sequence's last token by ``(pair_ids, pair_sides)``
    and return ``loss_tokens`` = the number of real pairs (see
    :func:`make_dpo_loss`).
    """
    if config.head != "score":
        raise ValueError(f"A reward model needs ModelConfig.head='score', got {config.head!r}")

    def loss_fn(params, batch, frozen=None):
        packed = check_preference_batch(batch, "reward")
        if is_shared_prompt(batch):
            rc, rr = shared_pair_scores(graphdef, params, batch)
        else:
            rc, rr = packed_pair_scores(graphdef, params, batch) if packed else pair_scores(graphdef, params, batch)
        pair_mask = pair_column(batch, "pair_mask")
        loss, metrics = bradley_terry_loss(jnp.reshape(rc, (-1,)), jnp.reshape(rr, (-1,)),
                                           margin=pair_column(batch, "margin"), center_coef=center_coef,
                                           pair_mask=pair_mask)
        if packed:
            metrics["loss_tokens"] = jnp.sum(pair_mask)
        return loss, metrics

    return loss_fn


def with_base_reference(loss_fn: Callable) -> Callable:
    """DPO-style loss whose reference policy is the trained model's own base (LoRA adapters off).

    ``wrapped(params, batch, frozen) = loss_fn(params, batch, {**frozen,
    "reference": without_adapters(params)})``. The reference reads the same
    base arrays as the policy (frozen under LoRA), so no second copy of the
    weights exists; :func:`make_dpo_loss` puts it under ``stop_gradient``.
    Attributes of ``loss_fn`` (``kind``, ``needs_reference``) are kept.
    """
    @functools.wraps(loss_fn)
    def wrapped(params, batch, frozen=None):
        if not has_adapters(params):
            raise ValueError("with_base_reference needs params with LoRA adapters (see apply_lora)")
        return loss_fn(params, batch, {**(frozen or {}), "reference": without_adapters(params)})

    return wrapped
