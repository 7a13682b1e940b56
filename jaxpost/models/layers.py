"""Building blocks of the decoder: linear maps, embedding, RMSNorm, RoPE.

Every parameter is an ``nnx.Param`` carrying ``logical_axes`` metadata (one
name per dimension) so that :mod:`jaxpost.sharding` can place it. Parameters
are stored in ``param_dtype`` and cast to the compute ``dtype`` at use.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpost.models.config import ModelConfig, RopeScaling

INIT_STD = 0.02  # Hugging Face's `initializer_range` default for the Llama family.


class Linear(nnx.Module):
    """``y = x @ kernel (+ bias)`` with ``kernel`` of shape ``[in, out]``.

    The kernel is the transpose of a PyTorch ``nn.Linear.weight`` (``[out, in]``).
    """

    def __init__(self, in_features: int, out_features: int, axes: tuple, *, bias: bool = False,
                 bias_axes: tuple | None = None, dtype: str = "float32", param_dtype: str = "float32",
                 rngs: nnx.Rngs):
        self.dtype = jnp.dtype(dtype)
        init = jax.random.normal(rngs.params(), (in_features, out_features), jnp.float32) * INIT_STD
        self.kernel = nnx.Param(init.astype(param_dtype), logical_axes=axes)
        self.bias = (nnx.Param(jnp.zeros((out_features,), param_dtype), logical_axes=bias_axes or (axes[-1],))
                     if bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding table ``[vocab, embed]``; lookup ``table[tokens]``."""

    def __init__(self, vocab_size: int, features: int, *, dtype: str = "float32",
                 param_dtype: str = "float32", rngs: nnx.Rngs):
        self.dtype = jnp.dtype(dtype)
        init = jax.random.normal(rngs.params(), (vocab_size, features), jnp.float32) * INIT_STD
        self.embedding = nnx.Param(init.astype(param_dtype), logical_axes=("vocab", "embed"))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)


class RMSNorm(nnx.Module):
    """``y = scale * x / sqrt(mean(x**2, -1) + eps)``, normalised in float32.

    Matches Hugging Face's ``LlamaRMSNorm``: the statistics are computed in
    float32, the result is cast back to the compute dtype, then scaled.
    """

    def __init__(self, features: int, eps: float, *, dtype: str = "float32", param_dtype: str = "float32"):
        self.eps = eps
        self.dtype = jnp.dtype(dtype)
        self.scale = nnx.Param(jnp.ones((features,), param_dtype), logical_axes=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * x32.astype(self.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """Inverse frequencies ``theta ** (-2i / head_dim)``, i = 0..head_dim/2-1 (float32).

    With Llama 3.1 scaling (HF ``rope_type="llama3"``), with wavelength
    ``w = 2 pi / f``, ``lo = L / low_freq_factor``, ``hi = L / high_freq_factor``
    (``L = original_max_position_embeddings``):
    ``w < hi``: f unchanged; ``w > lo``: f / factor; otherwise
    ``(1 - s) f / factor + s f`` with ``s = (L / w - low_freq_factor) /
    (high_freq_factor - low_freq_factor)``.
    Computed on the host once per trace: it depends only on the config.
    """
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    inv = inv.astype(np.float32)
    if scaling is None:
        return inv
    L = float(scaling.original_max_position_embeddings)
    lo_wave = L / scaling.low_freq_factor
    hi_wave = L / scaling.high_freq_factor
    wave = (2 * math.pi / inv).astype(np.float32)
    scaled = np.where(wave > lo_wave, inv / scaling.factor, inv)
    smooth = (L / wave - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wave < hi_wave) & ~(wave > lo_wave)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, config: ModelConfig) -> jax.Array:
    """Rotary embedding in the "rotate_half" convention of Hugging Face.

    ``x``: ``[B, T, N, H]``, ``positions``: ``[B, T]``. With ``a = pos * f``
    (``f`` from :func:`rope_inv_freq`, repeated to length H as ``[f, f]``),
    ``y = x * cos(a) + rotate_half(x) * sin(a)`` where
    ``rotate_half([x1, x2]) = [-x2, x1]`` on the two halves of the head dim.
    Angles and the rotation are computed in float32.
    """
    inv = jnp.asarray(rope_inv_freq(x.shape[-1], config.rope_theta, config.rope_scaling))
    angles = positions.astype(jnp.float32)[..., None] * inv  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)
