"""Knowledge distillation losses: a trainable student, a frozen teacher (live or cached top-k).

Batch spec: the LM keys (``LM_KEYS``); the loss is on ``loss_mask`` tokens
(responses). Live teacher: ``frozen = {"teacher": teacher_params}``, and the
teacher may have another size (layers, width) and its own shardings, but
the same vocabulary. Cached teacher: the batch also carries
``teacher_topk_logps`` float32 ``[B,L,k]`` and ``teacher_topk_ids`` int32
``[B,L,k]`` (see :mod:`jaxpost.algorithms.teacher_cache`), and ``frozen`` is
unused. This module only wires models to the math of :mod:`jaxpost.losses.distill`
(forward -> hidden states -> chunked loss); ``chunked_topk_distill_loss`` and
``teacher_topk`` are re-exported from there.
"""

from __future__ import annotations

import functools
from typing import Callable

import gin
import jax
import jax.numpy as jnp

from jaxpost.algorithms.batch import CACHED_KEYS, LM_KEYS, check_batch
from jaxpost.errors import UserError
from jaxpost.losses.distill import (DIVERGENCES, chunked_distill_loss, chunked_topk_distill_loss, generalized_jsd,
                                    teacher_topk, topk_forward_kl)
from jaxpost.models import forward
from jaxpost.models.config import ModelConfig
from jaxpost.models.heads import lm_head_weight, map_position_chunks

__all__ = ["CACHED_KEYS", "check_same_vocab", "make_divergence", "make_distill_loss", "make_cached_distill_loss",
           "make_teacher_topk_fn", "chunked_topk_distill_loss", "teacher_topk"]


def check_same_vocab(student: ModelConfig, teacher: ModelConfig) -> None:
    """Raises :class:`~jaxpost.errors.UserError` (a ``ValueError``) naming both unless they share ``vocab_size``."""
    if student.vocab_size != teacher.vocab_size:
        raise UserError(f"student vocab_size {student.vocab_size} != teacher vocab_size {teacher.vocab_size}: "
                        "distillation compares distributions token by token, so both models need the same "
                        "tokenizer and vocabulary")
    for name, c in (("student", student), ("teacher", teacher)):
        if c.head != "lm":
            raise UserError(f"the {name} model needs an LM head for distillation, got head={c.head!r}")


def make_divergence(divergence: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5,
                    top_k: int = 0) -> Callable:
    """The per-token ``D(student_logits, teacher_logits) -> [...]`` a run is configured with.

    ``divergence``: ``forward_kl`` (``T^2 KL(p_t||p_s)``), ``reverse_kl``
    (``T^2 KL(p_s||p_t)``) or ``jsd`` (generalised JSD with ``beta``). With
    ``top_k > 0`` the teacher is cut to its top-k tokens first,
    ``D = topk_forward_kl(s, top-k of log_softmax(z))`` (forward KL only):
    exactly what training from a top-k teacher cache computes.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"Unknown divergence {divergence!r}; choose one of {sorted(DIVERGENCES)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k:
        if divergence != "forward_kl":
            raise ValueError(f"top_k={top_k} restricts the teacher to its top-k tokens, which only forward_kl "
                             f"supports; got divergence={divergence!r}")

        def topk_div(s, z):
            return topk_forward_kl(s, *teacher_topk(z, top_k), temperature=temperature)
        return topk_div
    if divergence == "jsd":
        return functools.partial(generalized_jsd, beta=beta, temperature=temperature)
    return functools.partial(DIVERGENCES[divergence], temperature=temperature)


@gin.configurable(denylist=["graphdef", "config", "teacher_graphdef", "teacher_config"])
def make_distill_loss(graphdef, config: ModelConfig, teacher_graphdef, teacher_config: ModelConfig,
                      divergence: str = "forward_kl", temperature: float = 1.0, alpha: float = 1.0,
                      beta: float = 0.5, top_k: int = 0, chunk_size: int = 128):
    """``loss(params, batch, frozen)`` of a student against the live teacher ``frozen["teacher"]``.

    Per response token ``t`` (``m_t = loss_mask``), with student logits
    ``s_t`` and teacher logits ``z_t``::

        loss = sum_t m_t [alpha D(s_t, z_t) + (1 - alpha) CE(s_t, y_t)] / sum_t m_t

    ``D`` from :func:`make_divergence` (``divergence``, ``temperature``,
    ``beta``, ``top_k``); ``CE`` the hard-label cross-entropy on
    ``targets``, so ``alpha = 0`` is SFT. Both models run forward to hidden
    states; :func:`jaxpost.losses.distill.chunked_distill_loss` then forms
    the two ``[B, chunk, V]`` logits one chunk at a time. The teacher gets
    no gradient. Metrics: ``loss``, ``distill_loss``, ``ce_loss``,
    ``loss_sum``, ``loss_tokens``.
    """
    check_same_vocab(config, teacher_config)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (weight of the distillation term) must be in [0, 1], got {alpha}")
    div = make_divergence(divergence, temperature, beta, top_k)

    def loss_fn(params, batch, frozen):
        check_batch(batch, LM_KEYS, "distillation")
        if not isinstance(frozen, dict) or "teacher" not in frozen:
            raise KeyError("distillation loss needs frozen={'teacher': teacher_params}")
        args = (batch["tokens"], batch["positions"], batch["segment_ids"])
        hs, _ = forward(graphdef, params, *args)
        ht, _ = forward(teacher_graphdef, frozen["teacher"], *args)
        ws = lm_head_weight(params, config).astype(hs.dtype)
        wt = lm_head_weight(frozen["teacher"], teacher_config).astype(ht.dtype)
        loss, metrics = chunked_distill_loss(hs, ws, jax.lax.stop_gradient(ht), jax.lax.stop_gradient(wt),
                                             batch["loss_mask"], div, chunk_size, hard_targets=batch["targets"],
                                             alpha=alpha)
        metrics["loss_sum"] = loss * metrics["loss_tokens"]
        return loss, metrics

    return loss_fn


@gin.configurable(denylist=["graphdef", "config"])
def make_cached_distill_loss(graphdef, config: ModelConfig, temperature: float = 1.0, alpha: float = 1.0,
                             chunk_size: int = 128):
    """``loss(params, batch, frozen)`` against a teacher's stored top-k (batch spec :data:`CACHED_KEYS`).

    Same formula as :func:`make_distill_loss` with ``top_k = k``
    (``D = topk_forward_kl``), the teacher's top-k read from the batch
    instead of computed: with a cache built from the same teacher the two
    give the same values. ``frozen`` is unused (no teacher in memory).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (weight of the distillation term) must be in [0, 1], got {alpha}")

    def loss_fn(params, batch, frozen=None):
        check_batch(batch, CACHED_KEYS, "cached distillation")
        hs, _ = forward(graphdef, params, batch["tokens"], batch["positions"], batch["segment_ids"])
        w = lm_head_weight(params, config).astype(hs.dtype)
        loss, metrics = chunked_topk_distill_loss(hs, w, batch["teacher_topk_logps"], batch["teacher_topk_ids"],
                                                  batch["loss_mask"], batch["targets"], temperature, alpha,
                                                  chunk_size)
        metrics["loss_sum"] = loss * metrics["loss_tokens"]
        return loss, metrics

    return loss_fn


def make_teacher_topk_fn(graphdef, config: ModelConfig, k: int, chunk_size: int = 128):
    """``fn(params, batch) -> (logps [B,L,k], ids [B,L,k])``: the teacher's top-k per position.

    ``logps`` are ``log_softmax(z)`` at the teacher's temperature 1 (what
    :func:`make_divergence` with ``top_k`` computes live); chunked over
    positions (:func:`~jaxpost.models.heads.map_position_chunks`) so only ``[B, chunk, V]`` logits
    exist. Pure; jit it.
    """
    if k < 1 or k > config.vocab_size:
        raise ValueError(f"top_k must be in [1, vocab_size={config.vocab_size}], got {k}")

    def fn(params, batch):
        hidden, _ = forward(graphdef, params, batch["tokens"], batch["positions"], batch["segment_ids"])
        w = lm_head_weight(params, config).astype(hidden.dtype)
        return map_position_chunks(
            lambda h: teacher_topk(jnp.einsum("bcd,dv->bcv", h, w, preferred_element_type=jnp.float32), k),
            hidden, chunk_size=chunk_size, checkpoint=False)

    return fn
