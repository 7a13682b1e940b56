"""Pallas splash attention (TPU): causal, optionally windowed, segment-masked attention in blocks.

The kernel (``jax.experimental.pallas.ops.tpu.splash_attention``) never
stores the ``[T, T]`` score matrix and skips fully masked blocks, which is
most of the upper triangle. Off TPU it runs in Pallas interpret mode: the
same kernel code, slowly, which is what lets CPU tests check it.
"""

from __future__ import annotations

import functools

import jax
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec

from jaxpost.sharding import active_partitioner

SPLASH_BLOCK_MULTIPLE = 128  # splash blocks (and so the sequence length) are multiples of the TPU lane width


def _block(length: int) -> int:
    if length % SPLASH_BLOCK_MULTIPLE:
        raise ValueError(f"attention='splash' needs a sequence length that is a multiple of "
                         f"{SPLASH_BLOCK_MULTIPLE}; got {length}. Pad batches to such a length "
                         "(e.g. seq_len 2048) or use attention='xla'")
    return next(b for b in (512, 256, 128) if length % b == 0)


@functools.lru_cache(maxsize=32)
def _kernel(heads: int, length: int, sliding_window: int | None, interpret: bool):
    """A splash kernel for one example ``q [heads, T, Hd]``, ``k, v [kv_heads, T, Hd]`` (cached per shape)."""
    shape = (length, length)
    if sliding_window is None:
        one = splash.CausalMask(shape=shape)
    else:  # keys within the last `sliding_window` slots, the query's own slot included
        one = splash.LocalMask(shape=shape, window_size=(sliding_window - 1, 0), offset=0)
    b = _block(length)
    sizes = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                              block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    # Built as constants even when first asked for inside a trace, so the cached kernel holds no tracer.
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha(splash.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1,
                                      q_seq_shards=1, interpret=interpret)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                     sliding_window: int | None = None) -> jax.Array:
    """``softmax(q k^T / sqrt(Hd) + mask) v`` with the splash kernel; ``[B, T, N, Hd]`` in and out.

    ``k``, ``v``: ``[B, T, Nkv, Hd]`` (grouped-query heads are shared by the
    kernel, not repeated). Mask: key ``s`` is visible to query ``t`` iff
    ``s <= t``, ``segment_ids[s] == segment_ids[t]`` and, with a window,
    ``t - s < sliding_window`` — the rule of
    :func:`jaxpost.models.attention.attention_mask`. Under an active
    :class:`~jaxpost.sharding.Partitioner` the kernel runs per shard
    (``shard_map``) over batch and heads; the sequence stays whole.
    """
    B, T, N, H = q.shape
    _block(T)
    interpret = jax.default_backend() != "tpu"
    q = (q * (H ** -0.5)).astype(q.dtype)

    def local(q, k, v, seg):
        kernel = _kernel(q.shape[2], T, sliding_window, interpret)
        run = lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=splash.SegmentIds(q=s1, kv=s1))
        # [B, T, N, H] -> [B, N, T, H]: the kernel wants heads-major per example.
        out = jax.vmap(run)(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), seg)
        return out.swapaxes(1, 2)

    part = active_partitioner()
    if part is None or part.mesh.size == 1:
        return local(q, k, v, segment_ids)
    batch, heads = part.spec(("batch", "heads"))
    _, kv_heads = part.spec(("batch", "kv_heads"))
    qs, kvs = PartitionSpec(batch, None, heads, None), PartitionSpec(batch, None, kv_heads, None)
    sharded = jax.shard_map(local, mesh=part.mesh, in_specs=(qs, kvs, kvs, PartitionSpec(batch, None)),
                            out_specs=qs, check_vma=False)
    return sharded(q, k, v, segment_ids)
