"""Masked statistics shared by the losses: mean, variance, whitening, entropy.

Masks are float32 arrays of 0.0/1.0 with the shape of the values. Every
division by a token count is guarded with ``max(count, 1)`` so an all-zero
mask gives 0, not NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpost.losses.checks import check_same_shape, f32


def masked_sum(x, mask, axis=None):
    """``sum(x * mask)`` over ``axis`` (all axes by default), in float32.

    Entries outside the mask are selected away rather than multiplied by 0,
    so inf/NaN values in padding cannot turn the sum into NaN.
    """
    check_same_shape(("x", "mask"), (x, mask), "as x")
    mask = f32(mask)
    return jnp.sum(jnp.where(mask != 0, f32(x) * mask, 0.0), axis=axis)


def masked_mean(x, mask, axis=None):
    """``sum(x * mask) / max(sum(mask), 1)`` over ``axis`` (all axes by default)."""
    return masked_sum(x, mask, axis) / jnp.maximum(jnp.sum(f32(mask), axis=axis), 1.0)


def masked_var(x, mask, unbiased: bool = True):
    """Variance of the entries of ``x`` where ``mask == 1``.

    ``var = sum(mask * (x - mean)^2) / n``, times ``n / (n - 1)`` when
    ``unbiased`` (Bessel's correction, as TRL's ``masked_var``). With fewer
    than two entries the correction is skipped (``n - 1`` clamped to 1).
    """
    x, mask = f32(x), f32(mask)
    mean = masked_mean(x, mask)
    n = jnp.sum(mask)
    var = masked_sum(jnp.square(x - mean), mask) / jnp.maximum(n, 1.0)
    if unbiased:
        var = var * n / jnp.maximum(n - 1.0, 1.0)
    return var


def whiten(x, mask, shift_mean: bool = True, eps: float = 1e-8):
    """Normalises ``x`` over the masked entries: ``(x - mean) / sqrt(var + eps)``.

    ``mean`` and ``var`` (unbiased, see :func:`masked_var`) are taken over the
    entries where ``mask == 1``. With ``shift_mean=False`` the mean is added
    back (only the scale changes, as TRL does for rewards). Entries outside
    the mask are set to 0 so they cannot leak into later sums.
    """
    x, mask = f32(x), f32(mask)
    mean = masked_mean(x, mask)
    out = (x - mean) * jax.lax.rsqrt(masked_var(x, mask) + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def entropy_from_logits(logits):
    """Entropy of ``softmax(logits)`` over the last axis: ``logsumexp(z) - sum(softmax(z) * z)``."""
    logits = f32(logits)
    p = jax.nn.softmax(logits, axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(p * logits, axis=-1)
