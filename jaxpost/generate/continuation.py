"""Conversations continued from their KV cache: the programs behind ``Sampler.start`` and ``Sampler.extend``.

Multi-turn rollouts use these. :meth:`Sampler.start` samples like ``Sampler.__call__`` and returns a
:class:`Continuation`; :meth:`Sampler.extend` appends each row's new
tokens (left-padded to a length bucket, padding under segment 0) after the
cache's filled slots, at positions that continue the row's own count, and
decodes on. One cache serves all rows; the slots between a row's turns
(padding, other rows' longer turns) are segment-0 holes its tokens never
attend to, so a row's tokens and log-probs are those of re-prefilling its
whole conversation, for the price of prefilling the new tokens. (A model's
sliding window counts slots, which holes would stretch: such models are
refused.)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from jaxpost.generate.decode import (STATIC_ARGS, constrain_cache, constrain_rows, context_seen, fresh_rows,
                                     ladder, partitioner_scope, prefill, record, sample_output)
from jaxpost.generate.prompts import bucket_length
from jaxpost.models.api import forward
from jaxpost.models.attention import KVCache, pad_cache
from jaxpost.models.heads import logits as lm_logits
from jaxpost.sharding import constrain


@struct.dataclass
class Carry:
    """What a continuation keeps on device between calls, for all ``b`` rows of the batch.

    ``cache`` holds each row's conversation so far *except* its last sampled
    token (slots of other content -- padding, stopped rows' feeds -- are
    segment 0); ``n_real [b]`` counts the row's tokens in it (the position of
    its next token); ``last [b]`` is the row's last sampled token and
    ``has_last [b]`` whether the last call sampled one for the row;
    ``seen [b, V]`` the ids of the whole conversation so far, ``last``
    included (the repetition penalty's context; ``[b, 0]`` without one).
    """

    cache: KVCache
    n_real: jax.Array
    last: jax.Array
    has_last: jax.Array
    seen: jax.Array


@dataclasses.dataclass
class Continuation:
    """Opaque state of a batch of conversations between :meth:`Sampler.start`/:meth:`Sampler.extend` calls.

    ``carry``: the device arrays (:class:`Carry`, global and sharded by
    the batch); ``index``: filled cache slots (the same on every process);
    ``rows``: the caller's rows (the carry may hold padding rows after them).
    A state is consumed by the call that extends it.
    """

    carry: Carry
    index: int
    rows: int

    @property
    def slots(self) -> int:
        """The cache's allocated slots."""
        return self.carry.cache.max_len


def continuation_capacities(allocated: int, start: int, max_new_tokens: int, cache_block: int) -> list[int]:
    """The cache sizes of one continuation call's decode phases, smallest first.

    ``allocated``: the cache's slots before the call (0 for a new batch);
    ``start``: slots filled once the new tokens are in. Every size is a
    ladder value of ``cache_block`` (:func:`ladder`; ``cache_block == 0``:
    one size, a power of two), at least ``allocated``, and the last holds
    ``start + max_new_tokens``. Sizes come from a fixed ladder rather than
    from ``start + N`` so that the compiled programs are reused across turns.
    """
    need = start + max_new_tokens
    if cache_block <= 0:
        return [max(allocated, bucket_length(need, 16))]
    c = max(allocated, ladder(cache_block, start + 1))
    caps = [c]
    while c < need:
        c = ladder(cache_block, c + 1)
        caps.append(c)
    return caps


def _open_impl(graphdef, params, prompt_tokens, prompt_mask, budget, key_ids, rng, *, config, sampling,
               partitioner, capacity):
    graphdef = graphdef.value  # a Static
    with partitioner_scope(partitioner):
        return prefill(graphdef, params, prompt_tokens, prompt_mask, budget, key_ids, rng, config, sampling,
                        capacity)


def _chunk(carry: Carry, new_tokens, new_mask):
    """Each row's chunk ``[b, C + 1]``: its pending last token (if any) then its new tokens, left-padded.

    Returns ``(tokens, positions, segments)``; positions continue the row's
    count ``carry.n_real``; padding has segment 0 and position 0.
    """
    C = new_tokens.shape[1]
    real_new = new_mask.astype(bool)
    at = (jnp.arange(C + 1)[None] == (C - real_new.sum(-1))[:, None]) & carry.has_last[:, None]
    tokens = jnp.pad(jnp.where(real_new, new_tokens, 0).astype(jnp.int32), ((0, 0), (1, 0)))
    tokens = jnp.where(at, carry.last[:, None], tokens)
    real = jnp.pad(real_new, ((0, 0), (1, 0))) | at
    positions = jnp.where(real, carry.n_real[:, None] + jnp.cumsum(real, -1, dtype=jnp.int32) - 1, 0)
    return tokens, positions, real.astype(jnp.int32)


def _extend_impl(graphdef, params, carry, new_tokens, new_mask, budget, key_ids, rng, *, config, sampling,
                 partitioner, capacity):
    """Prefills each row's chunk (:func:`_chunk`) after the cache's filled slots; samples every row's first token."""
    graphdef = graphdef.value  # a Static
    with partitioner_scope(partitioner):
        tokens, positions, segments = (constrain(x, ("batch", "length"))
                                       for x in _chunk(carry, new_tokens, new_mask))
        cache = constrain_cache(pad_cache(carry.cache, capacity), config)
        hidden, cache = forward(graphdef, params, tokens, positions, segments, cache)
        logits = lm_logits(params, config, hidden[:, -1])  # the chunk's last slot: each live row's last token
        budget = jnp.clip(jnp.asarray(budget, jnp.int32), 0, sampling.max_new_tokens)
        n_real = carry.n_real + segments.sum(-1)
        seen = carry.seen | context_seen(tokens, segments, logits.shape[-1], sampling)
        st = fresh_rows(cache, n_real, budget, key_ids, sampling, seen)
        return record(constrain_rows(st, config), logits, rng, sampling)


def _grow_impl(st, *, config, partitioner, capacity):
    with partitioner_scope(partitioner):
        return constrain_rows(st.replace(cache=pad_cache(st.cache, capacity)), config)


def _settle_impl(st, start, *, config, partitioner, rows):
    """The call's outputs (first ``rows``) and the carry: the last sampled token of each row leaves the cache.

    Token ``j`` of a row was fed at slot ``start + j`` (``start``: filled
    slots before decoding) if a later step ran; the last one, ``L - 1``, is
    set to segment 0 there whether fed or not, and kept as ``last`` instead,
    so the carry's invariant holds without knowing which rows were fed.
    """
    with partitioner_scope(partitioner):
        L = st.mask.sum(-1).astype(jnp.int32)
        has = L >= 1
        c = st.cache
        drop = (jnp.arange(c.max_len, dtype=jnp.int32)[None] == (start + L - 1)[:, None]) & has[:, None]
        cache = c.replace(segment_ids=jnp.where(drop, 0, c.segment_ids))
        last = jnp.take_along_axis(st.tokens, jnp.maximum(L - 1, 0)[:, None], -1)[:, 0]
        row = lambda x: constrain(x, ("batch",))
        carry = Carry(cache=constrain_cache(cache, config), n_real=row(st.n_real + jnp.maximum(L - 1, 0)),
                       last=row(last), has_last=row(has), seen=constrain(st.seen, ("batch", None)))
        return sample_output(st.tokens, st.logprobs, st.processed, st.mask, st.finished)[:rows], carry


open_jit = jax.jit(_open_impl, static_argnames=STATIC_ARGS + ("capacity",))
extend_jit = jax.jit(_extend_impl, static_argnames=STATIC_ARGS + ("capacity",))
grow_jit = jax.jit(_grow_impl, static_argnames=("config", "partitioner", "capacity"))
settle_jit = jax.jit(_settle_impl, static_argnames=("config", "partitioner", "rows"))
JITS = (open_jit, extend_jit, grow_jit, settle_jit)
