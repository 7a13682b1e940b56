"""Knowledge distillation: per-token divergences and a chunked driver.

Every divergence maps ``(student_logits [..., V], teacher_logits [..., V])``
to a per-token value ``[...]`` in float32. Distributions are softened by a
temperature ``T`` (``softmax(z / T)``) and the divergence is multiplied by
``T^2`` (Hinton et al. 2015), which keeps gradient magnitudes comparable
across temperatures; at the default ``T = 1`` this is the plain divergence.
Bind hyperparameters with ``functools.partial`` (or gin) to obtain the
two-argument ``divergence_fn`` that :func:`chunked_distill_loss` takes.

Terms where the left distribution has probability 0 contribute 0
(``0 log 0 = 0``), so masked vocabulary entries (logit ``-inf``) are safe.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from jaxpost.losses.checks import check_rank, check_same_shape, f32
from jaxpost.losses.stats import masked_sum
from jaxpost.models.heads import map_position_chunks


def _kl(log_p, log_q):
    """``sum_v p_v (log p_v - log q_v)`` over the last axis, with ``0 log 0 = 0``."""
    p = jnp.exp(log_p)
    return jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)


def _soft(logits, temperature):
    return jax.nn.log_softmax(f32(logits) / temperature, axis=-1)


def forward_kl(student_logits, teacher_logits, temperature: float = 1.0):
    """``T^2 KL(p_t || p_s) = T^2 sum_v p_t (log p_t - log p_s)`` (Hinton et al. 2015; mode-covering)."""
    check_same_shape(("student_logits", "teacher_logits"), (student_logits, teacher_logits), "[..., V]")
    return temperature ** 2 * _kl(_soft(teacher_logits, temperature), _soft(student_logits, temperature))


def reverse_kl(student_logits, teacher_logits, temperature: float = 1.0):
    """``T^2 KL(p_s || p_t) = T^2 sum_v p_s (log p_s - log p_t)`` (mode-seeking; Gu et al. 2024, MiniLLM)."""
    check_same_shape(("student_logits", "teacher_logits"), (student_logits, teacher_logits), "[..., V]")
    return temperature ** 2 * _kl(_soft(student_logits, temperature), _soft(teacher_logits, temperature))


def generalized_jsd(student_logits, teacher_logits, beta: float = 0.5, temperature: float = 1.0):
    """Generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024), TRL's convention.

    With ``m = beta p_t + (1 - beta) p_s``::

        JSD_beta = beta KL(p_t || m) + (1 - beta) KL(p_s || m)

    times ``T^2``. Both limits of this expression are 0, so, as TRL's
    ``GKDTrainer`` does, the endpoints are defined by the limits of
    ``JSD_beta / beta`` and ``JSD_beta / (1 - beta)``: ``beta = 0`` gives
    forward ``KL(p_t || p_s)``, ``beta = 1`` gives reverse
    ``KL(p_s || p_t)`` (only when ``beta`` is a Python number; a traced
    ``beta`` always uses the mixture formula). Symmetric in teacher and
    student at ``beta = 0.5``. TRL does not apply the ``T^2`` factor
    (identical at ``T = 1``).
    """
    check_same_shape(("student_logits", "teacher_logits"), (student_logits, teacher_logits), "[..., V]")
    if isinstance(beta, (int, float)):
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"generalized_jsd needs 0 <= beta <= 1, got {beta}")
        if beta == 0.0:
            return forward_kl(student_logits, teacher_logits, temperature)
        if beta == 1.0:
            return reverse_kl(student_logits, teacher_logits, temperature)
    ls, lt = _soft(student_logits, temperature), _soft(teacher_logits, temperature)
    beta = f32(beta)
    log_m = jnp.logaddexp(lt + jnp.log(beta), ls + jnp.log1p(-beta))
    return temperature ** 2 * (beta * _kl(lt, log_m) + (1.0 - beta) * _kl(ls, log_m))


def topk_forward_kl(student_logits, teacher_topk_logps, teacher_topk_ids, temperature: float = 1.0):
    """Forward KL from only the teacher's top-k tokens (for stored/offline teacher outputs).

    The teacher's top-k log-probs are renormalised over the k kept tokens,
    ``q_i = softmax_i(teacher_topk_logps / T)`` (entries of ``-inf`` get
    ``q = 0``, for padded lists); the student keeps its full-vocabulary
    ``log p_s = log_softmax(student_logits / T)``::

        loss = T^2 sum_{i in topk} q_i (log q_i - log p_s(id_i))
             = T^2 [ KL(q || p_s restricted to top-k and renormalised) - log p_s(top-k) ]

    so it is >= 0 and zero only when the student puts all its mass on the
    teacher's top-k in the teacher's proportions.

    Args:
      student_logits: ``[..., V]``.
      teacher_topk_logps: ``[..., k]`` teacher log-probs of its top-k tokens.
      teacher_topk_ids: ``[..., k]`` int token ids, in ``[0, V)``.
    """
    check_same_shape(("teacher_topk_logps", "teacher_topk_ids"), (teacher_topk_logps, teacher_topk_ids), "[..., k]")
    if jnp.shape(student_logits)[:-1] != jnp.shape(teacher_topk_ids)[:-1]:
        raise ValueError(f"student_logits {jnp.shape(student_logits)} and teacher_topk_ids "
                         f"{jnp.shape(teacher_topk_ids)} must share leading dims [...]")
    log_q = _soft(teacher_topk_logps, temperature)
    log_ps = jnp.take_along_axis(_soft(student_logits, temperature), jnp.asarray(teacher_topk_ids), axis=-1)
    return temperature ** 2 * _kl(log_q, log_ps)


DIVERGENCES: Mapping[str, Callable] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": generalized_jsd,
}
"""Full-distribution divergences by name, for configuration."""


def teacher_topk(logits, k: int):
    """``(top-k of log_softmax(logits), their ids)`` over the last axis, float32 and int32 ``[..., k]``.

    What a teacher cache stores per position, and what ``topk_forward_kl``
    reads: ``values_i = log softmax(z)_{id_i}`` for the ``k`` largest logits.
    """
    values, ids = jax.lax.top_k(jax.nn.log_softmax(f32(logits), axis=-1), k)
    return values, ids.astype(jnp.int32)


def masked_divergence(student_logits, teacher_logits, mask, divergence_fn: Callable = forward_kl):
    """Divergence summed over masked tokens, and the token count: ``(sum_t m_t D(s_t, z_t), sum_t m_t)``.

    ``D = divergence_fn(student_logits, teacher_logits)`` per token (e.g.
    :func:`forward_kl`, :func:`reverse_kl`, :func:`generalized_jsd` with its
    hyperparameters bound by ``functools.partial``); the token mean is
    ``sum / max(count, 1)``. Positions with ``m_t = 0`` are selected away,
    not multiplied by 0, so padding (even inf/NaN logits there) cannot leak
    into the sum. Returning the sum and the count (as :func:`masked_token_nll`
    does) lets chunks and micro-batches be added before the one division.

    Args:
      student_logits, teacher_logits: ``[..., V]``.
      mask: ``[...]`` float {0,1}: 1 on the tokens to distil (responses).

    Returns float32 scalars ``(div_sum, n_tokens)``.
    """
    div = divergence_fn(student_logits, teacher_logits)
    if tuple(div.shape) != tuple(jnp.shape(mask)):
        raise ValueError(f"divergence_fn must return per-token values of shape {tuple(jnp.shape(mask))}, "
                         f"got {tuple(div.shape)}")
    return masked_sum(div, mask), jnp.sum(f32(mask))


def _hard_ce(logits, targets):
    """Per-token cross-entropy with hard labels: ``logsumexp(s) - s_y`` over the last axis."""
    return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def chunked_distill_loss(student_hidden, student_head_w, teacher_hidden, teacher_head_w, mask,
                         divergence_fn: Callable = forward_kl, chunk_size: int = 128,
                         hard_targets=None, alpha: float = 1.0):
    """Token-mean distillation loss computed over chunks of positions.

    Per position ``t`` with student logits ``s_t = h^s_t W_s`` and teacher
    logits ``z_t = h^t_t W_t``::

        l_t  = alpha * D(s_t, z_t) + (1 - alpha) * CE(s_t, y_t)
        loss = sum_t mask_t l_t / max(sum_t mask_t, 1)

    with ``D = divergence_fn`` and ``CE(s, y) = logsumexp(s) - s_y`` the
    hard-label cross-entropy on ``hard_targets``. The masked sums of ``D``
    (:func:`masked_divergence`) and ``CE`` are accumulated over
    ``ceil(L / chunk_size)`` chunks of positions by
    :func:`jaxpost.models.heads.map_position_chunks`, with the chunk body
    rematerialised (``jax.checkpoint``), so only ``[B, chunk_size, V]``
    logits of each model exist at once, in the forward and backward passes.
    The teacher gets no gradient (``stop_gradient`` on its logits).
    Matmuls run in the input dtype and accumulate in float32.

    Args:
      student_hidden: ``[B,L,D_s]``; student_head_w: ``[D_s,V]``.
      teacher_hidden: ``[B,L,D_t]``; teacher_head_w: ``[D_t,V]`` (same ``V``).
      mask: ``[B,L]`` float {0,1}.
      divergence_fn: ``(student_logits, teacher_logits) -> [B,C]`` per token.
      hard_targets: optional ``[B,L]`` int labels; required when ``alpha < 1``.

    Returns ``(loss, metrics)``; metrics: ``loss``, ``distill_loss`` (token
    mean of ``D``), ``ce_loss`` (token mean of CE, when targets are given),
    ``loss_tokens``.
    """
    check_rank("student_hidden", student_hidden, 3, "[B,L,D]")
    check_rank("teacher_hidden", teacher_hidden, 3, "[B,L,D]")
    check_rank("student_head_w", student_head_w, 2, "[D,V]")
    check_rank("teacher_head_w", teacher_head_w, 2, "[D,V]")
    check_rank("mask", mask, 2, "[B,L]")
    (b, length, ds), dt = student_hidden.shape, teacher_hidden.shape[2]
    if student_head_w.shape[1] != teacher_head_w.shape[1]:
        raise ValueError(f"student_head_w has vocab size {student_head_w.shape[1]} but teacher_head_w "
                         f"has vocab size {teacher_head_w.shape[1]}; distillation needs a shared vocabulary")
    if student_head_w.shape[0] != ds:
        raise ValueError(f"student_head_w must have shape [D_s={ds}, V], got {student_head_w.shape}")
    if teacher_head_w.shape[0] != dt:
        raise ValueError(f"teacher_head_w must have shape [D_t={dt}, V], got {teacher_head_w.shape}")
    if teacher_hidden.shape[:2] != (b, length) or tuple(mask.shape) != (b, length):
        raise ValueError(f"teacher_hidden {teacher_hidden.shape[:2]} and mask {tuple(mask.shape)} must match "
                         f"student_hidden's [B,L]=({b}, {length})")
    if hard_targets is not None and tuple(hard_targets.shape) != (b, length):
        raise ValueError(f"hard_targets must have shape [B,L]=({b}, {length}), got {tuple(hard_targets.shape)}")
    if hard_targets is None and (not isinstance(alpha, (int, float)) or alpha != 1.0):
        raise ValueError(f"chunked_distill_loss with alpha={alpha} needs hard_targets ([B,L] int)")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    targets = jnp.zeros((b, length), jnp.int32) if hard_targets is None else jnp.asarray(hard_targets, jnp.int32)

    def body(hs, ht, m, y):
        s = jnp.einsum("bcd,dv->bcv", hs, student_head_w, preferred_element_type=jnp.float32)
        z = jax.lax.stop_gradient(jnp.einsum("bcd,dv->bcv", ht, teacher_head_w, preferred_element_type=jnp.float32))
        div_sum, _ = masked_divergence(s, z, m, divergence_fn)
        if hard_targets is None:
            return div_sum, jnp.zeros((), jnp.float32)
        return div_sum, masked_sum(_hard_ce(s, y), m)

    div_total, ce_total = map_position_chunks(body, student_hidden, teacher_hidden, f32(mask), targets,
                                              chunk_size=chunk_size, sum_chunks=True)
    n_tokens = jnp.sum(f32(mask))
    denom = jnp.maximum(n_tokens, 1.0)
    loss = (alpha * div_total + (1.0 - alpha) * ce_total) / denom
    metrics = {"loss": loss, "distill_loss": div_total / denom, "loss_tokens": n_tokens}
    if hard_targets is not None:
        metrics["ce_loss"] = ce_total / denom
    return loss, metrics


def chunked_topk_distill_loss(student_hidden, student_head_w, topk_logps, topk_ids, mask, targets,
                              temperature: float = 1.0, alpha: float = 1.0, chunk_size: int = 128):
    """Token-mean distillation loss against stored teacher top-k, chunked over positions.

    Per position ``t`` with student logits ``s_t = h_t W``::

        l_t  = alpha topk_forward_kl(s_t, topk_logps_t, topk_ids_t) + (1 - alpha) CE(s_t, y_t)
        loss = sum_t mask_t l_t / max(sum_t mask_t, 1)

    Like :func:`chunked_distill_loss`: the masked sums are accumulated over
    chunks of positions by :func:`jaxpost.models.heads.map_position_chunks`
    with a rematerialised body, so only ``[B, chunk_size, V]`` student
    logits exist at once.

    Args:
      student_hidden ``[B,L,D]``, student_head_w ``[D,V]``, topk_logps float
      ``[B,L,k]``, topk_ids int ``[B,L,k]`` in ``[0, V)``, mask ``[B,L]``,
      targets int ``[B,L]``.

    Returns ``(loss, metrics)``; metrics: ``loss``, ``distill_loss``,
    ``ce_loss`` (token means of each term), ``loss_tokens``.
    """
    b, length, _ = student_hidden.shape
    for name, x in (("teacher_topk_logps", topk_logps), ("teacher_topk_ids", topk_ids)):
        if x.ndim != 3 or tuple(x.shape[:2]) != (b, length):
            raise ValueError(f"{name} must have shape [B,L,k] with [B,L]=({b}, {length}), got {tuple(x.shape)}")
    if topk_logps.shape != topk_ids.shape:
        raise ValueError(f"teacher_topk_logps {tuple(topk_logps.shape)} and teacher_topk_ids "
                         f"{tuple(topk_ids.shape)} must have the same shape [B,L,k]")

    def body(h, lq, ids, m, y):
        s = jnp.einsum("bcd,dv->bcv", h, student_head_w, preferred_element_type=jnp.float32)
        return masked_sum(topk_forward_kl(s, lq, ids, temperature), m), masked_sum(_hard_ce(s, y), m)

    div_total, ce_total = map_position_chunks(
        body, student_hidden, jnp.asarray(topk_logps, jnp.float32), jnp.asarray(topk_ids, jnp.int32),
        jnp.asarray(mask, jnp.float32), jnp.asarray(targets, jnp.int32), chunk_size=chunk_size, sum_chunks=True)
    n_tokens = jnp.sum(jnp.asarray(mask, jnp.float32))
    denom = jnp.maximum(n_tokens, 1.0)
    loss = (alpha * div_total + (1.0 - alpha) * ce_total) / denom
    return loss, {"loss": loss, "distill_loss": div_total / denom, "ce_loss": ce_total / denom,
                  "loss_tokens": n_tokens}
