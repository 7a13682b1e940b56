"""Prompts on their way into the sampler: checked, left-padded, bucketed, budgeted and placed on the batch sharding."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.sharding import Partitioner


def batch_shards(partitioner: Partitioner | None) -> int:
    return 1 if partitioner is None else partitioner.shards("batch")


def check_prompts(prompt_tokens, prompt_mask) -> None:
    """Raises ``ValueError`` unless the prompts are ``[B, P]``, left-padded, each with a real token.

    Value checks are skipped for traced arrays (inside a caller's ``jit``).
    """
    if prompt_tokens.ndim != 2 or prompt_mask.shape != prompt_tokens.shape:
        raise ValueError(f"prompt_tokens and prompt_mask must both be [B, P]; got prompt_tokens "
                         f"{tuple(prompt_tokens.shape)} and prompt_mask {tuple(prompt_mask.shape)}")
    if prompt_tokens.shape[1] == 0:
        raise ValueError("prompt_tokens has length 0; every prompt needs at least one token (e.g. bos)")
    if isinstance(prompt_mask, jax.core.Tracer):
        return
    m = np.asarray(prompt_mask).astype(bool)
    empty = np.flatnonzero(~m.any(-1))
    if empty.size:
        raise ValueError(f"prompt_mask rows {empty[:8].tolist()} have no real token; every prompt needs "
                         "at least one (e.g. bos)")
    bad = np.flatnonzero((m[:, :-1] & ~m[:, 1:]).any(-1))
    if bad.size:
        raise ValueError(f"prompt_mask rows {bad[:8].tolist()} are not left-padded (a 0 follows a 1); "
                         "prompts must be left-padded: zeros, then ones")


def prompt_budgets(max_new_tokens, prompts: int, N: int, low: int = 1):
    """Per-prompt budgets ``[prompts]`` int32 (``None``: ``N`` for all); values must be in ``[low, N]``."""
    if max_new_tokens is None:
        return np.full((prompts,), N, np.int32)
    if isinstance(max_new_tokens, jax.core.Tracer):
        return jnp.broadcast_to(jnp.asarray(max_new_tokens, jnp.int32), (prompts,))
    budget = np.broadcast_to(np.asarray(max_new_tokens), (prompts,)).astype(np.int32)
    if budget.size and (budget.min() < low or budget.max() > N):
        raise ValueError(f"max_new_tokens per prompt must be in [{low}, {N}] (SamplingConfig.max_new_tokens); "
                         f"got values from {budget.min()} to {budget.max()}")
    return budget


def place_batch(partitioner, shards, *arrays):
    """Host arrays onto the batch sharding (replicated when the batch does not divide); traced: as they are."""
    if partitioner is None or any(isinstance(x, jax.core.Tracer) for x in arrays):
        return arrays
    place = lambda x: (partitioner.batch_sharding(np.ndim(x)) if np.shape(x)[0] % shards == 0
                       else partitioner.replicated)
    return tuple(jax.device_put(x, place(x)) for x in arrays)


def row_key_ids(row_ids, rows: int):
    """``row_ids`` as int32 ``[rows]`` (``None``: ``0 .. rows-1``); traced ids pass as they are."""
    if row_ids is None:
        return np.arange(rows, dtype=np.int32)
    if isinstance(row_ids, jax.core.Tracer):
        return row_ids
    ids = np.asarray(row_ids, np.int32)
    if ids.shape != (rows,):
        raise ValueError(f"row_ids must hold one id per output row ({rows}), got shape {ids.shape}")
    return ids


def left_pad(prompts: Sequence[Sequence[int]], length: int | None = None, pad_token_id: int = 0
             ) -> tuple[np.ndarray, np.ndarray]:
    """Lists of ids -> left-padded ``(prompt_tokens int32 [B, L], prompt_mask int32 [B, L])``.

    ``L`` = ``length`` or the longest prompt; a longer prompt raises naming its index.
    """
    longest = max((len(p) for p in prompts), default=0)
    L = longest if length is None else length
    if longest > L:
        i = max(range(len(prompts)), key=lambda j: len(prompts[j]))
        raise ValueError(f"prompt {i} has {len(prompts[i])} tokens, more than length={L}")
    tokens = np.full((len(prompts), L), pad_token_id, np.int32)
    mask = np.zeros((len(prompts), L), np.int32)
    for i, p in enumerate(prompts):
        if len(p):
            tokens[i, L - len(p):] = np.asarray(p, np.int32)
            mask[i, L - len(p):] = 1
    return tokens, mask


def bucket_length(n: int, min_bucket: int = 16, buckets: Sequence[int] | None = None) -> int:
    """The smallest bucket ``>= n``: from ``buckets`` if given, else a power of two ``>= min_bucket``."""
    if buckets:
        for b in sorted(buckets):
            if b >= n:
                return b
        raise ValueError(f"prompt length {n} exceeds the largest bucket {max(buckets)}")
    return max(min_bucket, 1 << max(0, n - 1).bit_length())
