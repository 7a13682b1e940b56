"""The sampler's compiled programs: prefill, decode phases over a growing KV cache, and the compacting regroups.

:class:`~jaxpost.generate.sampler.Sampler` and
:func:`~jaxpost.generate.sampler.sample` drive these; the
``*_jit`` functions take the model's graphdef as a :class:`Static` (hashed
once) and the configs and partitioner as static arguments.

Layout of one row (prompt length ``P``, ``N = max_new_tokens``)::

    cache slot   0 .. P-1                 P .. P+N-1
    content      [pad .. pad, prompt]     generated tokens
    segment      0 .. 0, 1 .. 1           1 ... (0 for what a row feeds after its stop)
    position     0 .. 0, 0 .. n-1         n, n+1, ...        (n = real prompt tokens)

Left padding carries segment 0, so it is invisible to the real tokens (the
model's masking rule: same segment and earlier-or-equal slot). The sliding
window rule of the model counts slots; real tokens occupy consecutive slots,
so slot distance equals position distance.

Only the last position's logits are computed: the prefill forward returns
hidden states ``[B, P, D]`` and the LM head is applied to ``hidden[:, -1]``
alone; each decode step runs a ``T = 1`` forward.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from flax import struct

from jaxpost.generate.processing import choose_tokens, log_softmax_parts, penalize_repetitions, seen_tokens
from jaxpost.generate.sampling_config import SampleOutput, SamplingConfig
from jaxpost.models.api import forward, fused_projections, inputs_from_attention_mask
from jaxpost.models.attention import KVCache, cache_logical_axes, init_cache, map_layer_caches, pad_cache
from jaxpost.models.config import ModelConfig
from jaxpost.models.heads import logits as lm_logits
from jaxpost.sharding import Partitioner, constrain


def ladder(unit: int, n: int) -> int:
    """The smallest ``unit * m >= n`` with ``m`` in 1, 2, 3, 4, 6, 8, 12, 16, ... (two steps per octave)."""
    m = 1
    while unit * m < n:
        m = 2 if m == 1 else (m * 3 // 2 if m & (m - 1) == 0 else m * 4 // 3)
    return unit * m


def ladder_below(unit: int, n: int) -> int:
    """The largest ladder value (:func:`ladder`) ``< n``, or 0 when there is none."""
    below, m = 0, 1
    while unit * m < n:
        below = unit * m
        m = 2 if m == 1 else (m * 3 // 2 if m & (m - 1) == 0 else m * 4 // 3)
    return below


def cache_capacities(prompt_length: int, max_new_tokens: int, cache_block: int) -> list[int]:
    """The KV-cache sizes the decode phases use, smallest first (the last is ``P + N``).

    ``cache_block * m`` (``m`` in 1, 2, 3, 4, 6, 8, ...) from the first that
    holds the prompt and one token; ``cache_block == 0``: just ``[P + N]``.
    """
    full = prompt_length + max_new_tokens
    if cache_block <= 0:
        return [full]
    caps, c = [], ladder(cache_block, prompt_length + 1)
    while c < full:
        caps.append(c)
        c = ladder(cache_block, c + 1)
    return caps + [full]


@struct.dataclass
class Rows:
    """A batch of ``b`` rows mid-decode, all at the same step, with a cache of ``S`` slots."""

    step: jax.Array  # int32 scalar: tokens sampled so far, the index of the next one
    cache: KVCache
    last: jax.Array  # [b] token sampled last, fed to the next step
    done: jax.Array  # [b] bool: stopped (stop token or budget)
    finished: jax.Array  # [b] bool: stopped on a stop token
    rows: jax.Array  # [b] int32: the row's index in the caller's batch (its output row)
    key_ids: jax.Array  # [b] int32: the row's key index (``row_ids``; default its index in the batch)
    last_real: jax.Array  # [b] bool: ``last`` is a real token (sampled while the row was live), not padding
    n_real: jax.Array  # [b] int32: real prompt tokens
    budget: jax.Array  # [b] int32: the row's max new tokens
    tokens: jax.Array  # [b, N]
    logprobs: jax.Array
    processed: jax.Array
    mask: jax.Array
    seen: jax.Array  # [b, V] bool: ids in the row's context (repetition penalty); [b, 0] when there is none


@struct.dataclass
class Outputs:
    """Output buffers of all ``R`` rows, in the caller's order (rows compacted away are stored here)."""

    tokens: jax.Array  # [R, N]
    logprobs: jax.Array
    processed: jax.Array
    mask: jax.Array
    finished: jax.Array  # [R]



def constrain_cache(cache: KVCache, config: ModelConfig) -> KVCache:
    axes = cache_logical_axes(config)
    on = lambda xs, a: tuple(map(constrain, xs, a)) if isinstance(xs, tuple) else constrain(xs, a)
    return KVCache(k=on(cache.k, axes.k), v=on(cache.v, axes.v),
                   segment_ids=constrain(cache.segment_ids, axes.segment_ids), index=cache.index)


def constrain_rows(st: Rows, config: ModelConfig) -> Rows:
    row, buf = lambda x: constrain(x, ("batch",)), lambda x: constrain(x, ("batch", None))
    return st.replace(cache=constrain_cache(st.cache, config), last=row(st.last), done=row(st.done),
                      finished=row(st.finished), rows=row(st.rows), key_ids=row(st.key_ids),
                      last_real=row(st.last_real), n_real=row(st.n_real), budget=row(st.budget),
                      tokens=buf(st.tokens), logprobs=buf(st.logprobs), processed=buf(st.processed),
                      mask=buf(st.mask), seen=buf(st.seen))


def record(st: Rows, logits: jax.Array, rng: jax.Array, s: SamplingConfig) -> Rows:
    """Samples token ``st.step`` of every live row from ``logits [b, V]`` and writes it down."""
    i = st.step
    step_key = jax.random.fold_in(rng, i)
    keys = jax.vmap(lambda r: jax.random.fold_in(step_key, r))(st.key_ids.astype(jnp.uint32))
    tok, plp = choose_tokens(keys, penalize_repetitions(logits, st.seen, s.repetition_penalty), s.temperature,
                             s.top_k, s.top_p, s.min_p)
    # The training forward's quantity (heads.token_logprobs), z[t] - logsumexp(z), as (z[t] - max) - log_total:
    # choose_tokens computed the same parts (shared, not recomputed, when it drew from the raw logits).
    shifted, _, log_total = log_softmax_parts(logits.astype(jnp.float32))
    lp = jnp.take_along_axis(shifted, tok[:, None], -1)[:, 0] - log_total[:, 0]
    alive = ~st.done
    tok = jnp.where(alive, tok, s.pad_token_id)
    live = alive.astype(jnp.float32)
    hit = (tok[:, None] == jnp.asarray(s.stop_token_ids, jnp.int32)[None, :]).any(-1) if s.stop_token_ids \
        else jnp.zeros_like(alive)
    put = lambda buf, x: jax.lax.dynamic_update_slice(buf, x[:, None].astype(buf.dtype), (0, i))
    seen = st.seen
    if s.repetition_penalty != 1.0:  # a comparison, not a scatter: with the vocabulary sharded it stays local
        seen = seen | ((jnp.arange(seen.shape[-1], dtype=jnp.int32)[None] == tok[:, None]) & alive[:, None])
    return st.replace(step=i + 1, last=tok, last_real=alive, done=st.done | (alive & hit) | (i + 1 >= st.budget),
                      finished=st.finished | (alive & hit), tokens=put(st.tokens, tok),
                      logprobs=put(st.logprobs, lp * live), processed=put(st.processed, plp * live),
                      mask=put(st.mask, live), seen=seen)


def prefill(graphdef, params, prompt_tokens, prompt_mask, budget, key_ids, rng, config: ModelConfig,
             s: SamplingConfig, capacity: int) -> Rows:
    """Prefill of the prompts into a cache of ``capacity`` slots, and the first token of every row.

    ``budget`` ``[prompts]``: a row with budget 0 starts done (samples nothing);
    ``key_ids`` ``[prompts * G]``: the rows' key indices.
    """
    G, N = s.group_size, s.max_new_tokens
    real = prompt_mask.astype(bool)
    # Ids under padding may be anything (e.g. -100); a gather out of range yields NaN.
    tokens = jnp.where(real, prompt_tokens, 0).astype(jnp.int32)
    tokens, real = constrain(tokens, ("batch", "length")), constrain(real, ("batch", "length"))
    prompts = tokens.shape[0]
    positions, segments = inputs_from_attention_mask(real)
    n_real = segments.sum(-1)
    budget = jnp.clip(jnp.asarray(budget, jnp.int32), 0, N)

    # Prefill each prompt once; the G samples of a group share its keys/values (prefix sharing),
    # so prefill costs 1/G of prefilling the repeated batch.
    cache = constrain_cache(init_cache(config, prompts, capacity, dtype=s.cache_dtype), config)
    hidden, cache = forward(graphdef, params, tokens, positions, segments, cache)
    first_logits = lm_logits(params, config, hidden[:, -1])  # [prompts, V]: the only prompt logits computed
    seen = context_seen(tokens, real, first_logits.shape[-1], s)
    if G > 1:
        grow = lambda x: jnp.repeat(x, G, axis=x.ndim - 4 if x.ndim >= 4 else 0)  # batch: axis -4 of k and v
        cache = map_layer_caches(grow, grow, cache).replace(segment_ids=grow(cache.segment_ids))
        first_logits, n_real, budget, seen = grow(first_logits), grow(n_real), grow(budget), grow(seen)
    return record(constrain_rows(fresh_rows(cache, n_real, budget, key_ids, s, seen), config), first_logits, rng, s)


def context_seen(tokens, real, vocab_size: int, s: SamplingConfig) -> jax.Array:
    """:attr:`Rows.seen` of rows whose context is ``tokens [b, T]`` where ``real``: ``[b, 0]`` without a penalty."""
    if s.repetition_penalty == 1.0:
        return jnp.zeros((tokens.shape[0], 0), bool)
    return seen_tokens(tokens, real, vocab_size)


def fresh_rows(cache: KVCache, n_real, budget, key_ids, s: SamplingConfig, seen) -> Rows:
    """Rows at step 0 after a prefill: nothing sampled yet; a row with budget 0 is done from the start."""
    B, N = budget.shape[0], s.max_new_tokens
    return Rows(step=jnp.zeros((), jnp.int32), cache=cache, last=jnp.zeros((B,), jnp.int32),
                 done=budget <= 0, finished=jnp.zeros((B,), bool), rows=jnp.arange(B, dtype=jnp.int32),
                 key_ids=jnp.asarray(key_ids, jnp.int32), last_real=jnp.zeros((B,), bool),
                 n_real=n_real.astype(jnp.int32), budget=budget,
                 tokens=jnp.full((B, N), s.pad_token_id, jnp.int32), logprobs=jnp.zeros((B, N), jnp.float32),
                 processed=jnp.zeros((B, N), jnp.float32), mask=jnp.zeros((B, N), jnp.float32), seen=seen)


def _phase(graphdef, params, fused, st: Rows, rng, min_live, config: ModelConfig, s: SamplingConfig) -> Rows:
    """``T = 1`` decode steps until every row has stopped, the cache is full, or at most ``min_live`` rows live.

    ``fused``: :func:`~jaxpost.models.api.fused_projections` of ``params``, or None (separate projections).
    """
    N, S = s.max_new_tokens, st.cache.max_len
    # One row of an unrolled model: the loop carries each layer's keys and values without their batch axis
    # (attention writes them so too, models.attention.write_slots). With a size-1 axis, XLA:CPU writes each
    # layer's cache twice per step, once into a fresh copy that attention reads, and copies it four times
    # more. A scanned model's stacked cache is not copied, and squeezing it would make it so.
    one_row = st.last.shape[0] == 1 and not config.scanned
    squeeze, unsqueeze = (lambda x: jnp.squeeze(x, -4)), (lambda x: jnp.expand_dims(x, -4))
    into_carry = (lambda c: map_layer_caches(squeeze, squeeze, c)) if one_row else (lambda c: c)
    out_of_carry = (lambda c: map_layer_caches(unsqueeze, unsqueeze, c)) if one_row else (lambda c: c)

    def cond(st: Rows):
        live = jnp.sum(~st.done, dtype=jnp.int32)
        return (st.step < N) & (st.cache.index < S) & (live > min_live)

    def body(st: Rows) -> Rows:
        # Feed the token sampled last: it sits at position n_real + step - 1, slot P + step - 1. A row that
        # stopped feeds padding under segment 0, so its cache holds no slot after its stop that a later
        # token of the row (a continuation, Sampler.extend) could attend to.
        pos = (st.n_real + st.step - 1)[:, None]
        seg = st.last_real.astype(jnp.int32)[:, None]
        h, cache = forward(graphdef, params, st.last[:, None], pos, seg, out_of_carry(st.cache), fused=fused)
        st = st.replace(cache=into_carry(constrain_cache(cache, config)))
        return record(st, lm_logits(params, config, h[:, 0]), rng, s)

    st = jax.lax.while_loop(cond, body, st.replace(cache=into_carry(st.cache)))
    return st.replace(cache=out_of_carry(st.cache))



class Static:
    """A static ``jax.jit`` argument hashed once.

    jit hashes its static arguments on every call, and a model's ``GraphDef``
    hashes its whole node list each time: 0.16 ms on the 4-layer benchmark
    model, paid by each of a sampler call's dispatches (a dozen when it
    compacts).
    """

    __slots__ = ("value", "_hash")

    def __init__(self, value):
        self.value, self._hash = value, hash(value)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return isinstance(other, Static) and (self.value is other.value or self.value == other.value)


def sample_output(tokens, logprobs, processed, mask, finished) -> SampleOutput:
    return SampleOutput(tokens=tokens, logprobs=logprobs, processed_logprobs=processed, completion_mask=mask,
                        lengths=mask.sum(-1).astype(jnp.int32), finished=finished)


def partitioner_scope(partitioner: Partitioner | None):
    return partitioner.activate() if partitioner is not None else contextlib.nullcontext()



def _sample_impl(graphdef, params, prompt_tokens, prompt_mask, budget, key_ids, rng, *, config: ModelConfig,
                 sampling: SamplingConfig, partitioner: Partitioner | None) -> SampleOutput:
    """The whole of :func:`sample` in one program: prefill, then one decode phase per cache size."""
    graphdef = graphdef.value  # a Static
    with partitioner_scope(partitioner):
        caps = cache_capacities(prompt_tokens.shape[1], sampling.max_new_tokens, sampling.cache_block)
        st = prefill(graphdef, params, prompt_tokens, prompt_mask, budget, key_ids, rng, config, sampling, caps[0])
        fused = fused_projections(graphdef, params) if sampling.fuse_projections else None  # once for all phases
        for k, cap in enumerate(caps):
            if k:  # the cache is full: copy it into the next size (every row done: the loop exits at once)
                st = st.replace(cache=constrain_cache(pad_cache(st.cache, cap), config))
            st = _phase(graphdef, params, fused, st, rng, 0, config, sampling)
        return sample_output(st.tokens, st.logprobs, st.processed, st.mask, st.finished)


STATIC_ARGS = ("graphdef", "config", "sampling", "partitioner")
sample_jit = jax.jit(_sample_impl, static_argnames=STATIC_ARGS)


# --- the scheduled path of Sampler: host-driven phases, live rows compacted ----------------------

def _start_impl(graphdef, params, prompt_tokens, prompt_mask, budget, key_ids, rng, *, config, sampling,
                partitioner, capacity):
    graphdef = graphdef.value  # a Static
    with partitioner_scope(partitioner):
        st = prefill(graphdef, params, prompt_tokens, prompt_mask, budget, key_ids, rng, config, sampling, capacity)
        R, N = st.tokens.shape
        buf = lambda x: constrain(x, ("batch", None))
        out = Outputs(tokens=buf(jnp.full((R, N), sampling.pad_token_id, jnp.int32)),
                       logprobs=buf(jnp.zeros((R, N), jnp.float32)), processed=buf(jnp.zeros((R, N), jnp.float32)),
                       mask=buf(jnp.zeros((R, N), jnp.float32)), finished=constrain(jnp.zeros((R,), bool), ("batch",)))
        return st, out


def _fuse_impl(graphdef, params, *, partitioner):
    """The stacked projection kernels that every decode phase of one call uses."""
    graphdef = graphdef.value  # a Static
    with partitioner_scope(partitioner):
        return fused_projections(graphdef, params)


def _phase_impl(graphdef, params, fused, st, rng, min_live, *, config, sampling, partitioner):
    graphdef = graphdef.value  # a Static
    with partitioner_scope(partitioner):
        st = _phase(graphdef, params, fused, st, rng, min_live, config, sampling)
        info = jnp.stack([jnp.sum(~st.done, dtype=jnp.int32), st.step, st.cache.index])
        return st, constrain(info, (None,))  # replicated: every host reads it


def _store(out: Outputs, st: Rows) -> Outputs:
    put = lambda buf, x: buf.at[st.rows].set(x, unique_indices=True)
    return Outputs(tokens=put(out.tokens, st.tokens), logprobs=put(out.logprobs, st.logprobs),
                    processed=put(out.processed, st.processed), mask=put(out.mask, st.mask),
                    finished=put(out.finished, st.finished))


def _regroup_impl(st, out, *, config, partitioner, batch, capacity):
    """Stores every row's outputs, keeps the first ``batch`` rows with live ones first, grows the cache."""
    with partitioner_scope(partitioner):
        out = _store(out, st)
        if batch != st.done.shape[0]:
            keep = jnp.argsort(st.done, stable=True)[:batch]  # live rows first, in their order
            take = lambda x: jnp.take(x, keep, axis=0)
            take_kv = lambda x: jnp.take(x, keep, axis=x.ndim - 4)  # batch: axis -4 of k and v in either layout
            c = st.cache
            st = st.replace(cache=map_layer_caches(take_kv, take_kv, c).replace(segment_ids=take(c.segment_ids)),
                            last=take(st.last), done=take(st.done), finished=take(st.finished), rows=take(st.rows),
                            key_ids=take(st.key_ids), last_real=take(st.last_real),
                            n_real=take(st.n_real), budget=take(st.budget), tokens=take(st.tokens),
                            logprobs=take(st.logprobs), processed=take(st.processed), mask=take(st.mask),
                            seen=take(st.seen))
        st = st.replace(cache=pad_cache(st.cache, capacity))
        buf = lambda x: constrain(x, ("batch", None))
        out = out.replace(tokens=buf(out.tokens), logprobs=buf(out.logprobs), processed=buf(out.processed),
                          mask=buf(out.mask), finished=constrain(out.finished, ("batch",)))
        return constrain_rows(st, config), out


def _finish_impl(st, out, *, partitioner, rows):
    with partitioner_scope(partitioner):
        o = _store(out, st)
        return sample_output(o.tokens, o.logprobs, o.processed, o.mask, o.finished)[:rows]


start_jit = jax.jit(_start_impl, static_argnames=STATIC_ARGS + ("capacity",))
fuse_jit = jax.jit(_fuse_impl, static_argnames=("graphdef", "partitioner"))
phase_jit = jax.jit(_phase_impl, static_argnames=STATIC_ARGS, donate_argnames=("st",))  # the cache updates in place
regroup_jit = jax.jit(_regroup_impl, static_argnames=("config", "partitioner", "batch", "capacity"))
finish_jit = jax.jit(_finish_impl, static_argnames=("partitioner", "rows"))
JITS = (sample_jit, start_jit, fuse_jit, phase_jit, regroup_jit, finish_jit)
