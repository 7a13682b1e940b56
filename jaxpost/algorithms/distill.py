"""Knowledge distillation losses: a trainable student, a frozen teacher (live or cached top-k).

Batch spec: the LM keys (``LM_KEYS``); the loss is on ``loss_mask`` tokens
(responses). Live teacher: ``frozen = {"teacher": teacher_params}``, and the
teacher may have another size (layers, width) and its own shardings, but
the same vocabulary. Cached teacher: the batch also carries
``teacher_topk_logps`` float32 ``[B,L,k]`` and ``teacher_topk_ids`` int32
``[B,L,k]`` (see :mod:`jaxpost.pipelines.teacher_cache`), and ``frozen`` is
unused. The math lives in :mod:`jaxpost.losses.distill`.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import gin
import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.algorithms.batch import LM_KEYS, check_batch
from jaxpost.losses.distill import DIVERGENCES, chunked_distill_loss, generalized_jsd, topk_forward_kl
from jaxpost.models import forward
from jaxpost.models.config import ModelConfig
from jaxpost.models.heads import lm_head_weight

CACHED_KEYS = {**LM_KEYS, "teacher_topk_logps": np.float32, "teacher_topk_ids": np.int32}
"""An LM batch plus the teacher's stored top-k log-probs and ids per position ``[B,L,k]``."""


def check_same_vocab(student: ModelConfig, teacher: ModelConfig) -> None:
    """Raises ``ValueError`` naming both sizes unless student and teacher share ``vocab_size``."""
    if student.vocab_size != teacher.vocab_size:
        raise ValueError(f"student vocab_size {student.vocab_size} != teacher vocab_size {teacher.vocab_size}: "
                         "distillation compares distributions token by token, so both models need the same "
                         "tokenizer and vocabulary")
    for name, c in (("student", student), ("teacher", teacher)):
        if c.head != "lm":
            raise ValueError(f"the {name} model needs an LM head for distillation, got head={c.head!r}")


def teacher_topk(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``(top-k of log_softmax(logits), their ids)`` over the last axis, float32 and int32 ``[..., k]``."""
    values, ids = jax.lax.top_k(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), k)
    return values, ids.astype(jnp.int32)


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


def chunked_topk_distill_loss(student_hidden, student_head_w, topk_logps, topk_ids, mask, targets,
                              temperature: float = 1.0, alpha: float = 1.0, chunk_size: int = 128):
    """Token-mean distillation loss against stored teacher top-k, chunked over positions.

    ``l_t = alpha topk_forward_kl(s_t, topk_logps_t, topk_ids_t) + (1 - alpha) CE(s_t, y_t)``;
    ``loss = sum_t mask_t l_t / max(sum_t mask_t, 1)``. Like
    :func:`chunked_distill_loss`: a rematerialised ``lax.scan`` over chunks,
    so only ``[B, chunk_size, V]`` student logits exist at once.

    Args:
      student_hidden ``[B,L,D]``, student_head_w ``[D,V]``, topk_logps float
      ``[B,L,k]``, topk_ids int ``[B,L,k]`` in ``[0, V)``, mask ``[B,L]``,
      targets int ``[B,L]``.
    """
    b, length, _ = student_hidden.shape
    for name, x in (("teacher_topk_logps", topk_logps), ("teacher_topk_ids", topk_ids)):
        if x.ndim != 3 or tuple(x.shape[:2]) != (b, length):
            raise ValueError(f"{name} must have shape [B,L,k] with [B,L]=({b}, {length}), got {tuple(x.shape)}")
    if topk_logps.shape != topk_ids.shape:
        raise ValueError(f"teacher_topk_logps {tuple(topk_logps.shape)} and teacher_topk_ids "
                         f"{tuple(topk_ids.shape)} must have the same shape [B,L,k]")
    chunk = max(1, min(chunk_size, length))
    n = math.ceil(length / chunk)
    pad = n * chunk - length

    def chunks(x):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape((b, n, chunk) + x.shape[2:]), 1, 0)

    xs = (chunks(student_hidden), chunks(jnp.asarray(topk_logps, jnp.float32)),
          chunks(jnp.asarray(topk_ids, jnp.int32)), chunks(jnp.asarray(mask, jnp.float32)),
          chunks(jnp.asarray(targets, jnp.int32)))

    @jax.checkpoint
    def body(w, h, lq, ids, m, y):
        s = jnp.einsum("bcd,dv->bcv", h, w, preferred_element_type=jnp.float32)
        valid = m != 0
        div = topk_forward_kl(s, lq, ids, temperature)
        ce = jax.nn.logsumexp(s, axis=-1) - jnp.take_along_axis(s, y[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(valid, div, 0.0)), jnp.sum(jnp.where(valid, ce, 0.0))

    def step(carry, x):
        d, c = body(student_head_w, *x)
        return (carry[0] + d, carry[1] + c), None

    zero = jnp.zeros((), jnp.float32)
    (div_total, ce_total), _ = jax.lax.scan(step, (zero, zero), xs)
    n_tokens = jnp.sum(jnp.asarray(mask, jnp.float32))
    denom = jnp.maximum(n_tokens, 1.0)
    loss = (alpha * div_total + (1.0 - alpha) * ce_total) / denom
    return loss, {"loss": loss, "distill_loss": div_total / denom, "ce_loss": ce_total / denom,
                  "loss_tokens": n_tokens}


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
    positions with ``lax.map`` so only ``[B, chunk, V]`` logits exist. Pure; jit it.
    """
    if k < 1 or k > config.vocab_size:
        raise ValueError(f"top_k must be in [1, vocab_size={config.vocab_size}], got {k}")

    def fn(params, batch):
        hidden, _ = forward(graphdef, params, batch["tokens"], batch["positions"], batch["segment_ids"])
        w = lm_head_weight(params, config).astype(hidden.dtype)
        B, L, D = hidden.shape
        c = max(1, min(chunk_size, L))
        n = -(-L // c)
        h = jnp.pad(hidden, ((0, 0), (0, n * c - L), (0, 0))).reshape(B, n, c, D).swapaxes(0, 1)
        lp, ids = jax.lax.map(
            lambda x: teacher_topk(jnp.einsum("bcd,dv->bcv", x, w, preferred_element_type=jnp.float32), k), h)
        unchunk = lambda x: x.swapaxes(0, 1).reshape(B, n * c, k)[:, :L]
        return unchunk(lp), unchunk(ids)

    return fn
