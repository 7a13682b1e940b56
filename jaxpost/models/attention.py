"""Grouped-query self-attention with segment masking and a KV cache.

Masking rule (shared by training and sampling): a query at slot ``i`` may
attend to a key at slot ``j`` iff ``j <= i`` and both carry the same segment
id (and ``i - j < sliding_window`` when the config has one). Segment 0 is
padding; padding attends to earlier-or-equal padding (at least itself), so no
row of the softmax is empty and nothing is NaN.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxpost.models.config import ModelConfig
from jaxpost.models.layers import Linear, RMSNorm, apply_rope, lora_kwargs
from jaxpost.models.splash import SPLASH_BLOCK_MULTIPLE, splash_attention
from jaxpost.sharding import active_partitioner, constrain


@struct.dataclass
class KVCache:
    """Keys and values of every layer for incremental decoding.

    ``k[l]``: ``[B, Nkv, Hd, S]`` and ``v[l]``: ``[B, Nkv, S, Hd]`` for layer
    ``l``: heads-major, keys transposed, so that a decode step's score
    matmul ``q [G, Hd] @ k [Hd, S]`` and value matmul ``p [G, S] @ v [S, Hd]``
    both read the cache in place, as plain (untransposed) matmuls, half the
    time of reading keys as ``[S, Hd]`` on CPU; ``segment_ids``:
    ``[B, S]`` int32 segment id of each filled slot (0 = padding or empty);
    ``index``: int32 scalar, the number of filled slots (the same for every
    row: prompts are left-padded to one length). A step costs in proportion
    to the cache's allocated size ``S``; the sampler keeps ``S`` near the
    filled part by growing the cache in steps (:func:`pad_cache`).
    A model with ``scan_layers`` keeps ``k`` and ``v`` as single arrays
    stacked on a leading layer axis (``[L, B, Nkv, Hd, S]``), scanned with
    the layers; code that handles either counts axes from the end.
    """

    k: tuple | jax.Array
    v: tuple | jax.Array
    segment_ids: jax.Array
    index: jax.Array

    @property
    def max_len(self) -> int:
        return self.segment_ids.shape[1]


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache of ``max_len`` slots (``dtype`` defaults to ``config.dtype``)."""
    dtype = jnp.dtype(dtype or config.dtype)
    K, H = config.num_kv_heads, config.dim_per_head
    if config.scanned:
        zeros = lambda shape: jnp.zeros((config.num_layers,) + shape, dtype)
    else:
        zeros = lambda shape: tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
    return KVCache(k=zeros((batch, K, H, max_len)), v=zeros((batch, K, max_len, H)),
                   segment_ids=jnp.zeros((batch, max_len), jnp.int32), index=jnp.zeros((), jnp.int32))


def cache_logical_axes(config: ModelConfig) -> KVCache:
    """Logical axis names of every leaf of :func:`init_cache`'s result."""
    k, v = ("batch", "kv_heads", "head_dim", "length"), ("batch", "kv_heads", "length", "head_dim")
    if config.scanned:
        return KVCache(k=("layers",) + k, v=("layers",) + v, segment_ids=("batch", "length"), index=())
    return KVCache(k=(k,) * config.num_layers, v=(v,) * config.num_layers,
                   segment_ids=("batch", "length"), index=())


def map_layer_caches(fn_k, fn_v, cache: KVCache) -> KVCache:
    """``cache`` with ``fn_k`` applied to every layer's keys and ``fn_v`` to its values.

    The functions see one array per layer (unrolled) or the stacked
    ``[L, ...]`` array (scanned), so they must index axes from the end
    (batch is axis ``-4`` of both ``k`` and ``v``).
    """
    apply = lambda fn, x: tuple(map(fn, x)) if isinstance(x, tuple) else fn(x)
    return KVCache(k=apply(fn_k, cache.k), v=apply(fn_v, cache.v), segment_ids=cache.segment_ids, index=cache.index)


def pad_cache(cache: KVCache, max_len: int) -> KVCache:
    """``cache`` with its slots extended (empty, segment 0) to ``max_len``; contents unchanged."""
    extra = max_len - cache.max_len
    if extra < 0:
        raise ValueError(f"pad_cache cannot shrink a cache of {cache.max_len} slots to {max_len}")
    if extra == 0:
        return cache
    pad = lambda x, axis: jnp.pad(x, [(0, extra if a == x.ndim + axis else 0) for a in range(x.ndim)])
    grown = map_layer_caches(lambda k: pad(k, -1), lambda v: pad(v, -2), cache)
    return KVCache(k=grown.k, v=grown.v, segment_ids=jnp.pad(cache.segment_ids, ((0, 0), (0, extra))),
                   index=cache.index)


def write_slots(cache: jax.Array, new: jax.Array, index: jax.Array, axis: int) -> jax.Array:
    """``cache`` with ``new`` written at slots ``[index, index + T)`` of ``axis`` (every other axis from 0).

    A one-row cache is written without its batch axis. With it, XLA:CPU
    writes a decode loop's cache twice per step (in place for the loop, and
    into a fresh copy that attention reads), and copies it more besides;
    the decode loop (:mod:`jaxpost.generate.decode`) also carries one-row caches without it.
    """
    if cache.shape[0] == 1:
        return write_slots(cache[0], new[0], index, axis)[None]
    starts = [0] * cache.ndim
    starts[axis] = index
    return jax.lax.dynamic_update_slice(cache, new, starts)


def cached_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, q_segments: jax.Array,
                     k_segments: jax.Array, q_start: jax.Array, sliding_window: int | None = None) -> jax.Array:
    """Queries ``q [B, T, N, Hd]`` at slots ``[q_start, q_start + T)`` over a heads-major cache.

    ``k_cache [B, Nkv, Hd, S]``, ``v_cache [B, Nkv, S, Hd]`` (already
    holding the queries' own keys and values), ``k_segments [B, S]``; the rule of :func:`attention_mask`. The
    arithmetic is that of :func:`blocked_causal_attention` (queries
    pre-scaled in their dtype, float32 scores and softmax, probabilities
    cast to the values' dtype), so cached and training log-probs agree.
    """
    B, T, N, Hd = q.shape
    K = k_cache.shape[1]
    qt = jnp.transpose(q.reshape(B, T, K, N // K, Hd), (0, 2, 3, 1, 4)) * jnp.asarray(Hd ** -0.5, q.dtype)
    kt, vt = k_cache.astype(q.dtype), v_cache.astype(q.dtype)
    mask = attention_mask(q_segments, k_segments, q_start, sliding_window)  # [B, 1, T, S]
    scores = jnp.einsum("bkgth,bkhs->bkgts", qt, kt, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bksh->bkgth", probs.astype(vt.dtype), vt)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(B, T, N, Hd)


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


def _query_blocks(Tq: int, block: int, sliding_window: int | None, q_start: int):
    """``(s, e, k0, ke)`` per query block: queries ``[s, e)`` (slots ``q_start + s ...``) attend keys ``[k0, ke)``."""
    out = []
    for s in range(0, Tq, block):
        e = min(s + block, Tq)
        k0 = 0 if sliding_window is None else max(0, q_start + s - sliding_window + 1)
        out.append((s, e, k0, q_start + e))
    return out


def _block_probs(qt, kt, q_segments, k_segments, blk, q_start, sliding_window):
    """float32 softmax of one query block's masked scores, ``[B, Nkv, G, e - s, ke - k0]``."""
    s, e, k0, ke = blk
    mask = attention_mask(q_segments[:, s:e], k_segments[:, k0:ke], q_start + s, sliding_window, k_start=k0)
    scores = jnp.einsum("bkgth,bksh->bkgts", qt[:, :, :, s:e], kt[:, :, k0:ke], preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _blocked_attention(qt, kt, vt, q_segments, k_segments, block, sliding_window, q_start):
    """``softmax(qt kt^T + mask) vt`` block by block; heads-major ``qt [B, Nkv, G, Tq, Hd]`` (pre-scaled),
    ``kt, vt [B, Nkv, q_start + Tq, Hd]``. Returns ``[B, Nkv, G, Tq, Hd]``."""
    return _blocked_attention_fwd(qt, kt, vt, q_segments, k_segments, block, sliding_window, q_start)[0]


def _blocked_attention_fwd(qt, kt, vt, q_segments, k_segments, block, sliding_window, q_start):
    probs, outs = [], []
    for blk in _query_blocks(qt.shape[3], block, sliding_window, q_start):
        p = _block_probs(qt, kt, q_segments, k_segments, blk, q_start, sliding_window)
        probs.append(p)
        outs.append(jnp.einsum("bkgts,bksh->bkgth", p.astype(vt.dtype), vt[:, :, blk[2]:blk[3]]))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    return out, (qt, kt, vt, q_segments, k_segments, tuple(probs))


def _blocked_attention_bwd(block, sliding_window, q_start, residuals, dout):
    qt, kt, vt, q_segments, k_segments, probs = residuals
    Tk = kt.shape[2]
    dq, dk, dv = [], jnp.zeros(kt.shape, jnp.float32), jnp.zeros(vt.shape, jnp.float32)
    f32 = dict(preferred_element_type=jnp.float32)
    for (s, e, k0, ke), p in zip(_query_blocks(qt.shape[3], block, sliding_window, q_start), probs):
        do = dout[:, :, :, s:e]
        dp = jnp.einsum("bkgth,bksh->bkgts", do, vt[:, :, k0:ke], **f32)
        # Softmax backward: dS = P (dP - rowsum(P dP)); masked entries have P = 0, so dS = 0 there.
        ds = (p * (dp - jnp.sum(p * dp, axis=-1, keepdims=True))).astype(qt.dtype)
        dq.append(jnp.einsum("bkgts,bksh->bkgth", ds, kt[:, :, k0:ke], **f32))
        pad = ((0, 0), (0, 0), (k0, Tk - ke), (0, 0))
        dk = dk + jnp.pad(jnp.einsum("bkgts,bkgth->bksh", ds, qt[:, :, :, s:e], **f32), pad)
        dv = dv + jnp.pad(jnp.einsum("bkgts,bkgth->bksh", p.astype(do.dtype), do, **f32), pad)
    dq = dq[0] if len(dq) == 1 else jnp.concatenate(dq, axis=3)
    no_grad = lambda x: np.zeros(x.shape, jax.dtypes.float0)
    return (dq.astype(qt.dtype), dk.astype(kt.dtype), dv.astype(vt.dtype), no_grad(q_segments), no_grad(k_segments))


_blocked_attention.defvjp(_blocked_attention_fwd, _blocked_attention_bwd)


def blocked_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                             sliding_window: int | None = None, block: int | None = None,
                             k_segments: jax.Array | None = None) -> jax.Array:
    """Causal attention of a whole sequence with XLA, ``block`` queries at a time.

    Query block ``[s, e)`` attends only keys ``[k0, e)`` (``k0 = 0``, or
    ``max(0, s - sliding_window + 1)`` with a window): the key blocks above
    the diagonal, which the mask would zero anyway, are never multiplied.
    With 4 blocks that skips 3/8 of the score and value matmuls (forward
    and backward). Same result as one call under :func:`attention_mask`;
    ``q [B, T, N, Hd]``, ``k, v [B, T, Nkv, Hd]``, ``block`` defaults to
    :func:`query_block`.

    Keys may also be longer than queries (``k, v [B, P + T, Nkv, Hd]`` with
    their own ``k_segments [B, P + T]``): the queries then sit at slots
    ``[P, P + T)`` after a prefix of ``P`` keys, the rule of
    :func:`attention_mask` with ``q_start = P``. ``segment_ids`` are the
    queries' own.

    Queries, keys and values are moved to a heads-major layout once
    (``q [B, Nkv, G, T, Hd]`` with ``G = N / Nkv`` query heads per key head,
    so grouped heads share their keys without a copy) and every block's
    matmuls slice it; on CPU that is a quarter faster, forward and backward,
    than per-block ``jax.nn.dot_product_attention`` calls, which relayout
    each block's operands.

    The backward pass is written out (``dS = P (dP - rowsum(P dP))``,
    ``dQ = dS K``, ``dK = dS^T Q``, ``dV = P^T dO`` per block) so that the
    only saved activations are q, k, v and each block's float32
    probabilities ``P``; autodiff would also keep the masked scores and the
    softmax's broadcast normaliser, two more score-sized arrays per block.
    """
    B, T, N, Hd = q.shape
    K = k.shape[2]
    q_start = k.shape[1] - T
    if q_start < 0 or (q_start and k_segments is None):
        raise ValueError(f"keys ({k.shape[1]}) must be as long as the queries ({T}), or longer with k_segments")
    block = query_block(T) if block is None else block
    qt = jnp.transpose(q.reshape(B, T, K, N // K, Hd), (0, 2, 3, 1, 4)) * jnp.asarray(Hd ** -0.5, q.dtype)
    kt, vt = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, Nkv, Tk, Hd]
    segment_ids = segment_ids.astype(jnp.int32)
    k_segments = segment_ids if k_segments is None else k_segments.astype(jnp.int32)
    out = _blocked_attention(qt, kt, vt, segment_ids, k_segments, block, sliding_window, q_start)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(B, T, N, Hd)


@dataclasses.dataclass(frozen=True)
class Branches:
    """Row layout of a shared prefix and branches that each continue it (static).

    A row of ``T = prefix + count * R`` slots holds a prefix (slots
    ``[0, prefix)``) then ``count`` branches of ``R`` slots. Branch ``b``
    attends to the prefix and causally to itself, never to another branch,
    as if each branch were its own row ``prefix + branch``: the prefix is
    computed once for all branches (a preference pair's prompt shared by
    chosen and rejected). Positions must continue the prefix in every
    branch. Within this, the usual segment rule (and window) applies.
    """

    prefix: int
    count: int = 2

    def branch_length(self, T: int) -> int:
        R, rest = divmod(T - self.prefix, self.count)
        if R <= 0 or rest:
            raise ValueError(f"a row of {T} slots is not a prefix of {self.prefix} plus {self.count} equal branches")
        return R


def branched_attention(attend, q, k, v, segment_ids, sliding_window, branches: Branches, kernel: str):
    """Attention over a :class:`Branches` row: ``attend`` (the kernel's whole-row function) on the
    prefix and first branch, then each further branch against the prefix's keys and its own."""
    P, R = branches.prefix, branches.branch_length(q.shape[1])
    outs = [attend(q[:, :P + R], k[:, :P + R], v[:, :P + R], segment_ids[:, :P + R], sliding_window)]
    for b in range(1, branches.count):
        sl = slice(P + b * R, P + (b + 1) * R)
        kb = jnp.concatenate([k[:, :P], k[:, sl]], axis=1)
        vb = jnp.concatenate([v[:, :P], v[:, sl]], axis=1)
        segb = jnp.concatenate([segment_ids[:, :P], segment_ids[:, sl]], axis=1)
        if kernel == "xla":
            outs.append(blocked_causal_attention(q[:, sl], kb, vb, segment_ids[:, sl], sliding_window,
                                                 k_segments=segb))
        else:  # the fused kernels take no query offset: an explicit mask (cuDNN applies it as a bias)
            mask = attention_mask(segment_ids[:, sl], segb, P, sliding_window)
            outs.append(jax.nn.dot_product_attention(q[:, sl], kb, vb, mask=mask, scale=q.shape[-1] ** -0.5))
    return jnp.concatenate(outs, axis=1)


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
                 kv: tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array | None] | None = None,
                 branches: Branches | None = None, qkv_proj=None):
        """``x`` ``[B, T, D]``; ``rope`` = :func:`rope_tables` of the positions;
        ``kv`` = (k cache, v cache, cache segment ids, index, layer) or None;
        ``layer`` None: the caches are this layer's; an int32 scalar: they
        are every layer's, stacked ``[L, ...]``, and this is layer ``layer``.

        Returns ``(out [B, T, D], (k cache, v cache) or None)``. With a cache
        the new keys/values are written at slots ``[index, index + T)`` and
        the queries attend over the whole cache under :func:`attention_mask`
        (:func:`cached_attention`).
        ``branches`` (no cache): the row is a shared prefix and its branches.
        ``qkv_proj``: optional :func:`stack_qkv` of this layer, for one matmul instead of three.
        """
        c = self.config
        B, T, _ = x.shape
        h = c.dim_per_head
        if qkv_proj is None:
            q = self.q_proj(x).reshape(B, T, c.num_heads, h)
            k, v = self.k_proj(x).reshape(B, T, c.num_kv_heads, h), self.v_proj(x).reshape(B, T, c.num_kv_heads, h)
        else:
            q, k, v = self._stacked_qkv(x, qkv_proj)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if kv is None:
            kernel = attention_kernel(c, q.dtype, T if branches is None else None)
            attend = {"xla": blocked_causal_attention, "cudnn": cudnn_attention, "splash": splash_attention}[kernel]
            if branches is None:
                out = attend(q, k, v, segment_ids, c.sliding_window)
            else:
                out = branched_attention(attend, q, k, v, segment_ids, c.sliding_window, branches, kernel)
            return self.o_proj(out.reshape(B, T, c.num_heads * h)), None
        k_cache, v_cache, cache_segments, index, layer = kv
        k_new = jnp.transpose(k, (0, 2, 3, 1)).astype(k_cache.dtype)  # [B, T, Nkv, Hd] -> [B, Nkv, Hd, T]
        v_new = jnp.swapaxes(v, 1, 2).astype(v_cache.dtype)  # -> [B, Nkv, T, Hd]
        if layer is None:
            k_cache, v_cache = write_slots(k_cache, k_new, index, -1), write_slots(v_cache, v_new, index, -2)
            k_layer, v_layer = k_cache, v_cache
        else:
            k_cache = jax.lax.dynamic_update_slice(k_cache, k_new[None], (layer, 0, 0, 0, index))
            v_cache = jax.lax.dynamic_update_slice(v_cache, v_new[None], (layer, 0, 0, index, 0))
            k_layer = jax.lax.dynamic_index_in_dim(k_cache, layer, keepdims=False)
            v_layer = jax.lax.dynamic_index_in_dim(v_cache, layer, keepdims=False)
        out = cached_attention(q, k_layer, v_layer, segment_ids, cache_segments, index, c.sliding_window)
        return self.o_proj(out.reshape(B, T, c.num_heads * h)), (k_cache, v_cache)

    def _stacked_qkv(self, x: jax.Array, qkv_proj) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``q [B, T, N, Hd]``, ``k, v [B, T, Nkv, Hd]`` from one matmul by :func:`stack_qkv`'s kernel.

        LoRA adapters, which are not stacked, are added apart.
        """
        c = self.config
        B, T, _ = x.shape
        G, h = c.num_heads // c.num_kv_heads, c.dim_per_head
        kernel, bias = qkv_proj
        x = x.astype(kernel.dtype)
        y = jnp.einsum("btd,dkgh->btkgh", x, kernel)
        if bias is not None:
            y = y + bias
        q, k, v = y[..., :G, :].reshape(B, T, c.num_heads, h), y[..., G, :], y[..., G + 1, :]
        return self.q_proj.add_adapter(x, q), self.k_proj.add_adapter(x, k), self.v_proj.add_adapter(x, v)


def stack_qkv(attn: Attention) -> tuple[jax.Array, jax.Array | None]:
    """An attention layer's query, key and value kernels as one ``[..., D, Nkv, G + 2, Hd]`` kernel.

    ``G = N / Nkv`` query heads share each key head (GQA); group ``k`` holds
    query heads ``k G .. k G + G - 1`` (the grouping attention uses), then
    key head ``k``, then value head ``k``; biases ``[..., Nkv, G + 2, Hd]``
    or None. Leading axes (a scanned model's layers) are kept; in the
    compute dtype. A decode step (one token per row) multiplies a few rows
    by every weight, so a matmul costs about the reading of its weights plus
    a fixed overhead: one product instead of three saves two overheads. The
    copy is made once before a decode loop
    (:func:`~jaxpost.models.api.fused_projections`) and costs the three
    kernels' memory while it lives.

    Sharding: the ``Nkv`` axis takes the ``kv_heads`` rule. A query kernel
    sharded by ``heads`` splits into contiguous blocks of heads, which are
    whole groups when the ``kv_heads`` shards divide ``Nkv``, so each device
    keeps its own query and key/value heads; otherwise the axis is
    replicated.
    """
    c = attn.config
    K, G, h = c.num_kv_heads, c.num_heads // c.num_kv_heads, c.dim_per_head
    grouped = lambda a, g: a[...].reshape(*a.shape[:-1], K, g, h).astype(attn.q_proj.dtype)
    kernel = jnp.concatenate([grouped(attn.q_proj.kernel, G), grouped(attn.k_proj.kernel, 1),
                              grouped(attn.v_proj.kernel, 1)], axis=-2)
    bias = None if attn.q_proj.bias is None else jnp.concatenate(
        [grouped(attn.q_proj.bias, G), grouped(attn.k_proj.bias, 1), grouped(attn.v_proj.bias, 1)], axis=-2)
    part = active_partitioner()
    heads = "kv_heads" if part is not None and K % part.shards("kv_heads") == 0 else None
    lead = ("layers",) * (kernel.ndim - 4)
    kernel = constrain(kernel, lead + ("embed", heads, None, None))
    return kernel, None if bias is None else constrain(bias, lead + (heads, None, None))
