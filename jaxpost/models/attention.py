"""Grouped-query self-attention with segment masking and a KV cache.

Masking rule (shared by training and sampling): a query at slot ``i`` may
attend to a key at slot ``j`` iff ``j <= i`` and both carry the same segment
id (and ``i - j < sliding_window`` when the config has one). Segment 0 is
padding; padding attends to earlier-or-equal padding (at least itself), so no
row of the softmax is empty and nothing is NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxpost.models.config import ModelConfig
from jaxpost.models.layers import Linear, RMSNorm, apply_rope, lora_kwargs
from jaxpost.models.splash import SPLASH_BLOCK_MULTIPLE, splash_attention


@struct.dataclass
class KVCache:
    """Keys and values of every layer for incremental decoding.

    ``k[l]``, ``v[l]``: ``[B, S, Nkv, Hd]`` for layer ``l``; ``segment_ids``:
    ``[B, S]`` int32 segment id of each filled slot (0 = padding or empty);
    ``index``: int32 scalar, the number of filled slots (the same for every
    row: prompts are left-padded to one length).
    """

    k: tuple
    v: tuple
    segment_ids: jax.Array
    index: jax.Array

    @property
    def max_len(self) -> int:
        return self.segment_ids.shape[1]


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache of ``max_len`` slots (``dtype`` defaults to ``config.dtype``)."""
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (batch, max_len, config.num_kv_heads, config.dim_per_head)
    zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
    return KVCache(k=zeros(), v=zeros(), segment_ids=jnp.zeros((batch, max_len), jnp.int32),
                   index=jnp.zeros((), jnp.int32))


def cache_logical_axes(config: ModelConfig) -> KVCache:
    """Logical axis names of every leaf of :func:`init_cache`'s result."""
    kv = ("batch", "length", "kv_heads", "head_dim")
    return KVCache(k=(kv,) * config.num_layers, v=(kv,) * config.num_layers,
                   segment_ids=("batch", "length"), index=())


def attention_mask(q_segments: jax.Array, k_segments: jax.Array, q_start: jax.Array | int,
                   sliding_window: int | None = None, k_start: int = 0) -> jax.Array:
    """Boolean ``[B, 1, T, S]`` mask: ``mask[b, 0, t, s]`` = may query t see key s.

    Query ``t`` sits at slot ``q_start + t``, key ``s`` at slot ``k_start + s``.
    The rule is ``k_slot <= q_slot`` and ``k_segments[b, s] == q_segments[b, t]``
    (and ``q_slot - k_slot < sliding_window`` when given).
    """
    T, S = q_segments.shape[1], k_segments.shape[1]
    q_slot = q_start + jnp.arange(T, dtype=jnp.int32)[:, None]
    k_slot = k_start + jnp.arange(S, dtype=jnp.int32)[None, :]
    allowed = k_slot <= q_slot
    if sliding_window is not None:
        allowed = allowed & (q_slot - k_slot < sliding_window)
    same = q_segments[:, :, None] == k_segments[:, None, :]
    return (allowed[None] & same)[:, None]


def query_block(length: int) -> int:
    """Query block of :func:`blocked_causal_attention`: 128, or ``length / 16`` when longer (at most 16 blocks)."""
    return max(128, -(-length // 16))


def blocked_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                             sliding_window: int | None = None, block: int | None = None) -> jax.Array:
    """Causal attention of a whole sequence with XLA, ``block`` queries at a time.

    Query block ``[s, e)`` attends only keys ``[k0, e)`` (``k0 = 0``, or
    ``max(0, s - sliding_window + 1)`` with a window): the key blocks above
    the diagonal, which the mask would zero anyway, are never multiplied.
    With 4 blocks that skips 3/8 of the score and value matmuls (forward
    and backward). Same result as one call under :func:`attention_mask`;
    ``q [B, T, N, Hd]``, ``k, v [B, T, Nkv, Hd]``, ``block`` defaults to
    :func:`query_block`.

    Queries, keys and values are moved to a heads-major layout once
    (``q [B, Nkv, G, T, Hd]`` with ``G = N / Nkv`` query heads per key head,
    so grouped heads share their keys without a copy) and every block's
    matmuls slice it; on CPU that is a quarter faster, forward and backward,
    than per-block ``jax.nn.dot_product_attention`` calls, which relayout
    each block's operands.
    """
    B, T, N, Hd = q.shape
    K = k.shape[2]
    block = query_block(T) if block is None else block
    qt = jnp.transpose(q.reshape(B, T, K, N // K, Hd), (0, 2, 3, 1, 4)) * jnp.asarray(Hd ** -0.5, q.dtype)
    kt, vt = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, Nkv, T, Hd]
    outs = []
    for s in range(0, T, block):
        e = min(s + block, T)
        k0 = 0 if sliding_window is None else max(0, s - sliding_window + 1)
        mask = attention_mask(segment_ids[:, s:e], segment_ids[:, k0:e], s, sliding_window, k_start=k0)
        scores = jnp.einsum("bkgth,bksh->bkgts", qt[:, :, :, s:e], kt[:, :, k0:e],
                            preferred_element_type=jnp.float32)
        scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        outs.append(jnp.einsum("bkgts,bksh->bkgth", probs, vt[:, :, k0:e]))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(B, T, N, Hd)


def attention_kernel(config: ModelConfig, dtype, length: int | None = None) -> str:
    """The kernel ``config.attention`` resolves to: ``"xla"``, ``"cudnn"`` or ``"splash"``.

    ``"auto"`` picks cuDNN on a GPU where its fused kernel applies (bf16/fp16
    compute, head dim a multiple of 8 up to 128), the Pallas splash kernel
    on a TPU where the sequence ``length`` is a multiple of 128 (its block
    size), and XLA otherwise.
    """
    if config.attention != "auto":
        return config.attention
    backend = jax.default_backend()
    h = config.dim_per_head
    if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and h % 8 == 0 and h <= 128:
        return "cudnn"
    if backend == "tpu" and length is not None and length % SPLASH_BLOCK_MULTIPLE == 0:
        return "splash"
    return "xla"


def single_segment_lengths(segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(lengths [B], ok)``: ``ok`` when every row is one document then padding.

    Such a row's segment ids are ``1`` on its first ``lengths[b]`` slots and
    ``0`` after; causal attention within the first ``lengths[b]`` slots is
    then exactly the segment rule. Unpacked SFT, preference and reward
    batches are all of this form; packed rows are not.
    """
    T = segment_ids.shape[1]
    lengths = jnp.sum(segment_ids > 0, axis=1, dtype=jnp.int32)
    leading = jnp.arange(T, dtype=jnp.int32)[None, :] < lengths[:, None]
    return lengths, jnp.all(segment_ids == leading.astype(segment_ids.dtype))


def cudnn_attention(q, k, v, segment_ids, sliding_window, implementation="cudnn"):
    """cuDNN fused attention: causal (and sliding window) in the kernel.

    When every row is one document then padding (:func:`single_segment_lengths`)
    the padding goes to cuDNN as sequence lengths, so the kernel needs no
    mask at all. Otherwise (packed rows) the segment mask ``[B, 1, T, T]``
    is passed, which cuDNN adds as a bias and differentiates (a ``[B, 1, T, T]``
    bias gradient in every layer's backward pass); ``lax.cond`` picks the
    branch on the device, per batch. Outputs at padding slots are 0 on the
    lengths branch (they attend padding on the mask branch); losses never
    read them. ``implementation="xla"`` runs the same branches through
    XLA (how CPU tests check them).
    """
    window = None if sliding_window is None else (sliding_window - 1, 0)
    common = dict(scale=q.shape[-1] ** -0.5, is_causal=True, local_window_size=window,
                  implementation=implementation)
    lengths, single = single_segment_lengths(segment_ids)

    def by_lengths(q, k, v):
        n = jnp.maximum(lengths, 1)  # an all-padding row keeps its first slot, so no row is empty
        out = jax.nn.dot_product_attention(q, k, v, query_seq_lengths=n, key_value_seq_lengths=n, **common)
        return jnp.where((segment_ids > 0)[:, :, None, None], out, jnp.zeros((), out.dtype))

    def by_mask(q, k, v):
        same = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
        return jax.nn.dot_product_attention(q, k, v, mask=same, **common)

    return jax.lax.cond(single, by_lengths, by_mask, q, k, v)


class Attention(nnx.Module):
    """Multi-head attention with ``num_kv_heads`` shared key/value heads (GQA).

    ``q = rope(norm_q(x Wq + bq))``, ``k = rope(norm_k(x Wk + bk))``,
    ``v = x Wv + bv``, ``out = softmax(q k^T / sqrt(Hd) + mask) v Wo``;
    the norms exist only with ``qk_norm`` (Qwen3), the biases only with
    ``qkv_bias`` (Qwen2).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        d, n, k, h = c.hidden_size, c.num_heads, c.num_kv_heads, c.dim_per_head
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        self.q_proj = Linear(d, n * h, ("embed", "heads"), bias=c.qkv_bias, **kw, **lora_kwargs(c, "q_proj"))
        self.k_proj = Linear(d, k * h, ("embed", "kv_heads"), bias=c.qkv_bias, **kw, **lora_kwargs(c, "k_proj"))
        self.v_proj = Linear(d, k * h, ("embed", "kv_heads"), bias=c.qkv_bias, **kw, **lora_kwargs(c, "v_proj"))
        self.o_proj = Linear(n * h, d, ("heads", "embed"), **kw, **lora_kwargs(c, "o_proj"))
        if c.qk_norm:
            self.q_norm = RMSNorm(h, c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)
            self.k_norm = RMSNorm(h, c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], segment_ids: jax.Array,
                 kv: tuple[jax.Array, jax.Array, jax.Array, jax.Array] | None = None):
        """``x`` ``[B, T, D]``; ``rope`` = :func:`rope_tables` of the positions;
        ``kv`` = (k cache, v cache, cache segment ids, index) or None.

        Returns ``(out [B, T, D], (k cache, v cache) or None)``. With a cache
        the new keys/values are written at slots ``[index, index + T)`` and
        the queries attend over the whole cache under :func:`attention_mask`.
        """
        c = self.config
        B, T, _ = x.shape
        h = c.dim_per_head
        q = self.q_proj(x).reshape(B, T, c.num_heads, h)
        k = self.k_proj(x).reshape(B, T, c.num_kv_heads, h)
        v = self.v_proj(x).reshape(B, T, c.num_kv_heads, h)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if kv is None:
            attend = {"xla": blocked_causal_attention, "cudnn": cudnn_attention,
                      "splash": splash_attention}[attention_kernel(c, q.dtype, T)]
            out = attend(q, k, v, segment_ids, c.sliding_window)
            return self.o_proj(out.reshape(B, T, c.num_heads * h)), None
        k_cache, v_cache, cache_segments, index = kv
        k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
        mask = attention_mask(segment_ids, cache_segments, index, c.sliding_window)
        out = jax.nn.dot_product_attention(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), mask=mask,
                                           scale=h ** -0.5)
        return self.o_proj(out.reshape(B, T, c.num_heads * h)), (k_cache, v_cache)
