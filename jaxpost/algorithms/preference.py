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
import math
from typing import Callable, Sequence

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
from jaxpost.losses.dpo import PREFERENCE_LOSSES, combined_preference_loss, own_hparams
from jaxpost.losses.reward import bradley_terry_loss
from jaxpost.losses.sequence import ld_sequence_logps, sequence_logps, wpo_weights
from jaxpost.losses.stats import masked_mean
from jaxpost.models.config import ModelConfig
from jaxpost.models.lora import has_adapters, without_adapters

REFERENCE_FREE = ("simpo", "orpo", "sft")


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


def pair_sequence_logps(graphdef, config: ModelConfig, params, batch, *, chunk_size: int = 512,
                        ld_alpha: float | None = None, wpo: bool = False):
    """Summed response log-probs and lengths per pair, any layout: ``(pi_c, pi_r, len_c, len_r)`` ``[N]``.

    ``pi = sum_t log p(target_t) loss_mask_t`` over one response,
    ``len = sum_t loss_mask_t``; one forward over all sequences of the batch.
    ``ld_alpha`` (LD-DPO): the tokens past the shorter reply's length count
    ``ld_alpha`` in ``pi`` (:func:`~jaxpost.losses.sequence.ld_sequence_logps`).
    ``wpo``: a fifth entry, each pair's WPO weight ``w_c w_r`` (TRL's
    ``use_weighting``; :func:`~jaxpost.losses.sequence.wpo_weights`), from
    the same forward.
    """
    if is_shared_prompt(batch):
        return shared_pair_logps(graphdef, config, params, batch, chunk_size=chunk_size, ld_alpha=ld_alpha, wpo=wpo)
    if is_packed_preference(batch):
        out = packed_pair_logps(graphdef, config, params, batch, chunk_size=chunk_size, ld_alpha=ld_alpha, wpo=wpo)
        return tuple(jnp.reshape(x, (-1,)) for x in out)
    out = pair_token_logprobs(graphdef, config, params, batch, chunk_size=chunk_size, return_log_sum_sq=wpo)
    (c_tok, r_tok), mc, mr = out[:2], batch["chosen_loss_mask"], batch["rejected_loss_mask"]
    if ld_alpha is not None:
        sums = ld_sequence_logps(c_tok, mc, r_tok, mr, ld_alpha)
    else:
        (pc, lc), (pr, lr) = sequence_logps(c_tok, mc), sequence_logps(r_tok, mr)
        sums = pc, pr, lc, lr
    return (*sums, wpo_weights(c_tok, out[2], mc) * wpo_weights(r_tok, out[3], mr)) if wpo else sums


def dpo_kinds(kind: str | Sequence[str]) -> tuple[str, ...]:
    """``make_dpo_loss.kind`` as a tuple of loss names: one name, or the terms of a combination."""
    return (kind,) if isinstance(kind, str) else tuple(kind)


def dpo_loss_options(kind: str | Sequence[str]) -> tuple[Callable | tuple[Callable, ...],
                                                         dict[str, inspect.Parameter]]:
    """The loss(es) ``kind`` names, and their parameters that ``make_dpo_loss.<name>`` binds (``gamma``...).

    Those are each loss's keyword-only parameters but ``beta`` (a parameter
    of ``make_dpo_loss`` itself), ``pair_mask`` (from the batch) and
    ``pair_weights`` (``make_dpo_loss.use_weighting``); for a
    combination, their union (a parameter two losses share is bound once,
    for both). One loss is returned alone, several as a tuple.
    """
    losses = tuple(PREFERENCE_LOSSES[k] for k in dpo_kinds(kind))
    takes: dict[str, inspect.Parameter] = {}
    for loss in losses:
        for n, p in inspect.signature(loss).parameters.items():
            if p.kind is p.KEYWORD_ONLY and n not in ("beta", "pair_mask", "pair_weights"):
                takes.setdefault(n, p)
    return (losses[0] if len(losses) == 1 else losses), takes


@checks_values_of("make_dpo_loss", passes_on=lambda values: dpo_loss_options(values["kind"]))
def check_dpo_loss_values(kind: str | list[str] = "sigmoid", beta: float = 0.1,
                          loss_weights: list[float] | None = None, ld_alpha: float | None = None,
                          use_weighting: bool = False, **hparams) -> None:
    """Raises :class:`~jaxpost.errors.UserError` naming the ``make_dpo_loss`` key of a value the loss cannot use.

    ``kind`` must name a loss of :data:`PREFERENCE_LOSSES`, or be a list of
    distinct ones (a combination) with ``loss_weights`` None or one weight
    ``>= 0`` per loss, not all 0; ``beta > 0``; each of ``hparams`` must be
    a parameter of one of the losses (a misspelt ``label_smothing`` would
    otherwise reach the loss only at its first trace). Each loss then runs
    once on one made-up pair, so that its own checks (``0 <=
    label_smoothing < 1``...) apply now.
    """
    names = "one of " + ", ".join(map(repr, PREFERENCE_LOSSES))
    if isinstance(kind, str):
        require("make_dpo_loss.kind", kind, kind in PREFERENCE_LOSSES, names)
    else:
        require("make_dpo_loss.kind", kind, isinstance(kind, (list, tuple)) and len(kind) > 0
                and all(isinstance(k, str) for k in kind), f"{names}, or a non-empty list of them")
        for k in kind:
            require("make_dpo_loss.kind", k, k in PREFERENCE_LOSSES, names + " (each entry of the list)")
        require("make_dpo_loss.kind", kind, len(set(kind)) == len(kind), "a list without repeats")
    require("make_dpo_loss.beta", beta, beta > 0, "> 0")
    require("make_dpo_loss.ld_alpha", ld_alpha, ld_alpha is None or 0 <= ld_alpha <= 1,
            "None (off) or in [0, 1] (1: plain sums)")
    kinds = dpo_kinds(kind)
    require("make_dpo_loss.use_weighting", use_weighting, isinstance(use_weighting, bool), "True or False")
    sorted_kinds = [k for k in kinds if k in ("aot", "aot_unpaired")]
    require("make_dpo_loss.use_weighting", use_weighting, not (use_weighting and sorted_kinds),
            f"False with {sorted_kinds[0] if sorted_kinds else 'aot'!r}, whose terms are sorted margins of no one pair "
            f"(TRL refuses WPO there too)")
    if loss_weights is not None:
        require("make_dpo_loss.loss_weights", loss_weights, not isinstance(kind, str),
                "None when make_dpo_loss.kind names one loss (weights combine a list of kinds)")
        require("make_dpo_loss.loss_weights", loss_weights, len(loss_weights) == len(kinds),
                f"one weight per entry of make_dpo_loss.kind ({len(kinds)})")
        require("make_dpo_loss.loss_weights", loss_weights,
                all(math.isfinite(w) and w >= 0 for w in loss_weights) and any(w > 0 for w in loss_weights),
                "finite weights >= 0, not all 0")
    _, takes = dpo_loss_options(kind)
    for name in hparams:
        if name not in takes:
            what = (f"the {kind!r} loss; it takes" if isinstance(kind, str)
                    else f"any of the losses {list(kinds)}; they take")
            raise UserError(f"make_dpo_loss.{name} is not a parameter of {what} "
                            f"{', '.join('make_dpo_loss.' + n for n in ['beta', *takes])}")
    one = np.full((1,), -1.0, np.float32)  # log-probs < 0, lengths 1, as a real pair has
    for k in kinds:
        loss = PREFERENCE_LOSSES[k]
        try:
            loss(one, one, one, one, -one, -one, beta=beta, pair_mask=-one, **own_hparams(loss, hparams))
        except ValueError as e:
            raise UserError(f"make_dpo_loss (kind={k!r}): {e}") from None


@gin.configurable(denylist=["graphdef", "config"])
def make_dpo_loss(graphdef, config: ModelConfig, kind: str | list[str] = "sigmoid", beta: float = 0.1,
                  chunk_size: int = 512, loss_weights: list[float] | None = None, ld_alpha: float | None = None,
                  use_weighting: bool = False, **hparams):
    """``loss(params, batch, frozen)`` for any loss in :data:`PREFERENCE_LOSSES`, or a weighted sum of several.

    ``kind``: a loss name (TRL's ``loss_type``), or a list of names whose
    losses are summed (:func:`~jaxpost.losses.combined_preference_loss`).
    ``loss_weights``: one weight per entry of a ``kind`` list (None: all 1),
    as MPO's ``[0.8, 0.2, 1.0]`` for ``['sigmoid', 'bco_pair', 'sft']``.
    ``ld_alpha`` (LD-DPO, TRL's ``ld_alpha``): in [0, 1], the weight of
    each reply's tokens past the shorter reply's length in the summed
    log-probs of policy and reference alike (None: plain sums;
    :func:`~jaxpost.losses.sequence.ld_sequence_logps`). ``use_weighting``
    (WPO, Zhou et al. 2024, TRL's ``use_weighting``): each pair's loss is
    weighed by ``w_c w_r`` without gradient, ``w`` the geometric mean over
    a reply's tokens of ``p(y_t) / sum_v p_v^2`` under the policy
    (:func:`~jaxpost.losses.sequence.wpo_weights`, logged as ``wpo/weights``).

    Policy log-probs of chosen and rejected come from one concatenated
    forward. The reference log-probs come, in order of preference, from the
    batch (``ref_chosen_logps``/``ref_rejected_logps``, precomputed once by
    :func:`jaxpost.algorithms.reference.precompute_reference_logps`), or from
    ``frozen["reference"]`` (a frozen params tree on the same mesh, run under
    ``stop_gradient``). SimPO, ORPO and ``sft`` need no reference. ``hparams``
    go to the losses that take them (``label_smoothing``, ``gamma``,
    ``rpo_alpha``, ``f_divergence_type``...).

    Packed batches give the same loss, metrics and gradients as the same
    pairs unpacked; they also return ``loss_tokens`` = the number of real
    pairs (what the loss averages over), so gradient accumulation weights
    micro-batches, which hold different numbers of pairs, exactly.
    """
    check_dpo_loss_values(kind, beta, loss_weights, ld_alpha, use_weighting, **hparams)
    kinds = dpo_kinds(kind)
    if isinstance(kind, str):
        loss_math = PREFERENCE_LOSSES[kind]
    else:
        loss_math = functools.partial(combined_preference_loss, kinds, loss_weights)
    needs_reference = any(k not in REFERENCE_FREE for k in kinds)
    label = kind if isinstance(kind, str) else "+".join(kinds)

    def loss_fn(params, batch, frozen=None):
        packed = check_preference_batch(batch, f"DPO ({label})")
        pc, pr, lc, lr, *wpo = pair_sequence_logps(graphdef, config, params, batch, chunk_size=chunk_size,
                                                   ld_alpha=ld_alpha, wpo=use_weighting)
        rc = rr = None
        if "ref_chosen_logps" in batch:
            rc, rr = pair_column(batch, "ref_chosen_logps"), pair_column(batch, "ref_rejected_logps")
        elif needs_reference:
            if not frozen or "reference" not in frozen:
                raise ValueError(f"{label} DPO needs a reference: frozen['reference'] params or precomputed "
                                 "ref_chosen_logps/ref_rejected_logps in the batch")
            ref = jax.lax.stop_gradient(frozen["reference"])
            rc, rr, _, _ = pair_sequence_logps(graphdef, config, ref, batch, chunk_size=chunk_size, ld_alpha=ld_alpha)
        pair_mask = pair_column(batch, "pair_mask")
        weights = {"pair_weights": wpo[0]} if use_weighting else {}
        loss, metrics = loss_math(pc, pr, rc, rr, lc, lr, beta=beta, pair_mask=pair_mask, **weights, **hparams)
        if use_weighting:
            metrics["wpo/weights"] = masked_mean(wpo[0], jnp.ones_like(wpo[0]) if pair_mask is None else pair_mask)
        if packed:
            metrics["loss_tokens"] = jnp.sum(pair_mask)
        return loss, metrics

    loss_fn.kind, loss_fn.ld_alpha = label, ld_alpha
    loss_fn.needs_reference = needs_reference
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


def dpo_flops(config: ModelConfig, seq_len: int, batch_size: int, with_reference: bool) -> float:
    """Policy forward+backward on 2B sequences, plus a reference forward (1/3 of that) if run online."""
    policy = config.flops_per_token(seq_len) * 2 * batch_size * seq_len
    return policy * (4 / 3 if with_reference else 1.0)
