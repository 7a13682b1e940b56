"""Building blocks of the decoder: linear maps, embedding, RMSNorm, RoPE.

Every parameter is an ``nnx.Param`` carrying ``logical_axes`` metadata (one
name per dimension) so that :mod:`jaxpost.sharding` can place it. Parameters
are stored in ``param_dtype`` and cast to the compute ``dtype`` at use.
"""

from __future__ import annotations

import functools
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
    With ``lora_rank = r > 0`` the layer also holds LoRA adapters
    ``lora_a [in, r]`` (uniform in ``+-1/sqrt(in)``, PEFT's default) and
    ``lora_b [r, out]`` (zeros, so the adapted layer starts equal to the base)
    and returns ``x W (+ b) + (lora_alpha / r) * (x A) B``, computed as two
    thin matmuls. The rank dimension has no logical axis (replicated).
    """

    def __init__(self, in_features: int, out_features: int, axes: tuple, *, bias: bool = False,
                 bias_axes: tuple | None = None, dtype: str = "float32", param_dtype: str = "float32",
                 rngs: nnx.Rngs, lora_rank: int = 0, lora_alpha: float = 0.0):
        self.dtype = jnp.dtype(dtype)
        key = rngs.params()
        init = jax.random.normal(key, (in_features, out_features), jnp.float32) * INIT_STD
        self.kernel = nnx.Param(init.astype(param_dtype), logical_axes=axes)
        self.bias = (nnx.Param(jnp.zeros((out_features,), param_dtype), logical_axes=bias_axes or (axes[-1],))
                     if bias else None)
        self.lora_scale = lora_alpha / lora_rank if lora_rank else 0.0
        if lora_rank:
            # Derived from the kernel's key so that the base weights draw the same numbers with or without LoRA.
            a = lora_a_init(jax.random.fold_in(key, 1), in_features, lora_rank)
            self.lora_a = nnx.Param(a.astype(param_dtype), logical_axes=(axes[0], None))
            self.lora_b = nnx.Param(jnp.zeros((lora_rank, out_features), param_dtype), logical_axes=(None, axes[-1]))
        else:
            self.lora_a = self.lora_b = None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        kernel = self.kernel[...].astype(self.dtype)
        # Tokens flattened into one matmul dimension: autodiff's weight gradient is then a single
        # [tokens, in] x [tokens, out] contraction, which XLA:CPU runs without first writing the larger
        # operand transposed (8% of the CPU SFT step; benchmarks/README.md).
        y = jnp.dot(x.reshape(-1, x.shape[-1]), kernel).reshape(*x.shape[:-1], kernel.shape[-1])
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return self.add_adapter(x, y)

    def add_adapter(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """``y`` plus the LoRA term ``(lora_alpha / r) * (x A) B`` in ``y``'s shape; ``y`` without adapters.

        Also for this layer's output computed by a stacked matmul (:func:`stacked_linear`, whose kernels
        hold no adapters).
        """
        if self.lora_a is None:
            return y
        x = x.astype(self.dtype)
        # Scaling the rank-r activations is the cheapest place for alpha / r.
        xa = jnp.dot(x, self.lora_a[...].astype(self.dtype)) * jnp.asarray(self.lora_scale, self.dtype)
        return y + jnp.dot(xa, self.lora_b[...].astype(self.dtype)).reshape(y.shape)


def stack_linears(first: Linear, second: Linear) -> jax.Array:
    """Two bias-free layers of one input as one kernel ``[..., in, 2, out]``, in the compute dtype.

    Leading axes (a scanned model's layers) are kept; :func:`stacked_linear`
    applies it. A copy of both kernels: made once before a decode loop, it
    costs their memory for the loop's duration and saves one matmul per step.
    """
    if first.bias is not None or second.bias is not None:
        raise ValueError("stack_linears takes bias-free layers (the MLP's gate and up projections)")
    return jnp.stack([first.kernel[...], second.kernel[...]], axis=-2).astype(first.dtype)


def stacked_linear(first: Linear, second: Linear, x: jax.Array, kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(first(x), second(x))`` in one matmul by ``kernel = stack_linears(first, second)``; adapters added apart."""
    x = x.astype(kernel.dtype)
    y = jnp.einsum("...d,dgf->...gf", x, kernel)
    return first.add_adapter(x, y[..., 0, :]), second.add_adapter(x, y[..., 1, :])


def lora_a_init(key: jax.Array, in_features: int, rank: int) -> jax.Array:
    """``A ~ U(-1/sqrt(in), 1/sqrt(in))`` of shape ``[in, rank]`` (float32).

    PEFT's ``kaiming_uniform_(a=sqrt(5))`` on its ``[rank, in]`` weight: gain
    ``sqrt(2 / (1 + 5))``, bound ``sqrt(3) * gain / sqrt(in) = 1 / sqrt(in)``.
    """
    bound = 1.0 / math.sqrt(in_features)
    return jax.random.uniform(key, (in_features, rank), jnp.float32, -bound, bound)


def lora_kwargs(config: ModelConfig, name: str) -> dict:
    """``Linear`` keyword arguments that add adapters to projection ``name`` if ``config.lora`` targets it."""
    lora = config.lora
    if lora is None or name not in lora.targets:
        return {}
    return {"lora_rank": lora.rank, "lora_alpha": lora.alpha}


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


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """``silu(gate) * up`` with ``silu(g) = g sigmoid(g)``; autodiff keeps only ``gate`` and ``up``.

    Backward, with ``s = sigmoid(g)``: ``d gate = dy * up * s (1 + g (1 - s))``,
    ``d up = dy * g s``, recomputed in float32 from ``gate`` in one
    elementwise pass. Plain autodiff keeps ``sigmoid(g)`` and ``silu(g)`` as
    two more ``[tokens, intermediate]`` residuals per layer; on CPU every
    residual byte is also a fresh page to fault in on each step.
    """
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(residuals, dy):
    gate, up = residuals
    g, u, d = gate.astype(jnp.float32), up.astype(jnp.float32), dy.astype(jnp.float32)
    s = jax.nn.sigmoid(g)
    return (d * u * s * (1 + g * (1 - s))).astype(gate.dtype), (d * g * s).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


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


_ROPE_DIGIT_BITS = 11  # positions as three base-2048 digits: every int32 position (|p| < 2**31)


@functools.lru_cache(maxsize=16)
def _rope_digit_tables(head_dim: int, theta: float, scaling: RopeScaling | None) -> tuple[np.ndarray, ...]:
    """``cos`` and ``sin`` of ``d * 2048**j * f`` for every digit ``d``, ``j = 0, 1, 2`` (float64, stored float32).

    The top digit of a 31-bit position is below ``2**9``, so its tables stop there.
    """
    base = 1 << _ROPE_DIGIT_BITS
    inv = rope_inv_freq(head_dim, theta, scaling).astype(np.float64)
    tables = []
    for j, size in enumerate((base, base, 1 << (31 - 2 * _ROPE_DIGIT_BITS))):
        angles = (np.arange(size, dtype=np.float64) * float(base ** j))[:, None] * inv[None, :]
        tables += [np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)]
    return tuple(tables)


def rope_tables(positions: jax.Array, head_dim: int, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """``(cos(a), sin(a))`` as float32 ``[B, T, 1, H/2]`` with ``a = pos * f``, ``f`` from :func:`rope_inv_freq`.

    Computed once per forward and shared by every layer's queries and keys.
    ``|pos|`` is split into base-2048 digits ``d_j`` and the angle is
    assembled from host-computed tables of ``cos, sin(d_j 2048**j f)`` by
    ``cos(x + y) = cos x cos y - sin x sin y``, ``sin(x + y) = sin x cos y +
    cos x sin y``; ``sin`` changes sign for negative positions. Why tables:
    XLA fuses the tables into each of their consumers (every layer's q and k,
    forward and backward), so ``cos(pos * f)`` written directly is evaluated
    per head and per layer; table lookups make that re-evaluation cheap. The
    products of exact table values are within ~1e-7 of ``cos(p f)``, for any
    position (Hugging Face rounds ``p f`` to float32 first, an error of
    ~6e-8 ``p f``).
    """
    tables = _rope_digit_tables(head_dim, float(config.rope_theta), config.rope_scaling)
    pos = positions.astype(jnp.int32)
    mag = jnp.abs(pos)
    cos = sin = None
    for j in range(3):
        digit = (mag >> (_ROPE_DIGIT_BITS * j)) & ((1 << _ROPE_DIGIT_BITS) - 1)
        c, s = (jnp.take(jnp.asarray(t), digit, axis=0, mode="clip") for t in tables[2 * j:2 * j + 2])
        cos, sin = (c, s) if cos is None else (cos * c - sin * s, sin * c + cos * s)
    sin = jnp.where((pos < 0)[..., None], -sin, sin)
    return cos[:, :, None, :], sin[:, :, None, :]


def apply_rope(x: jax.Array, tables: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotary embedding in the "rotate_half" convention of Hugging Face.

    ``x``: ``[B, T, N, H]``; ``tables`` from :func:`rope_tables`. With
    ``x = [x1, x2]`` the two halves of the head dim,
    ``y = [x1 cos(a) - x2 sin(a), x2 cos(a) + x1 sin(a)]``, which is HF's
    ``x * cos([a, a]) + rotate_half(x) * sin([a, a])``,
    ``rotate_half([x1, x2]) = [-x2, x1]``. Computed in float32.
    """
    cos, sin = tables
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
