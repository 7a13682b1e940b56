"""The one KV-cache sampler: prefill once, then compiled decode loops.

Used by PPO, GRPO/RLOO rollouts, online DPO, on-policy distillation and
synthetic-data generation. :func:`sample` runs everything from the prompt
to the last sampled token inside one ``jax.jit`` (graphdef and configs
static); :class:`Sampler` runs it on bucketed shapes, or (``compact=True``)
as a few compiled phases driven from the host, so that finished rows can
be dropped.

What a decode step costs is kept to the work left:

* the loop exits once every row has stopped;
* the KV cache grows in phases (``SamplingConfig.cache_block``,
  :func:`cache_capacities`): each phase's ``while_loop`` runs over a cache
  just large enough for its steps, so a step's attention reads about the
  filled part of the cache rather than all ``P + N`` slots;
* ``Sampler(compact=True)`` compacts: when few enough rows are still live,
  they are gathered (with their caches) into a smaller batch, so a batch of
  mixed completion lengths costs about its real tokens, not batch x longest.
  It is off by default: every new (batch, cache) pair a call meets compiles
  another program, and in a GRPO run whose length patterns change every
  rollout those compiles cost far more than they save (measured on CPU,
  tiny Llama, 16 x 128 tokens, 8 rollouts: 18.5 s of sampling with
  compaction, 4.0 s without, most of it the first rollout's compile; the
  steady-state rollout 0.025 s either way). Turn it on for long generations
  of very mixed lengths that reuse few shapes (``Sampler.compact = True``);
* a decode step runs query, key and value as one matmul, and gate and up
  as another (``SamplingConfig.fuse_projections``; the stacked kernels are
  made once per call, not per phase), and a scanned model's step writes
  only the new token's slots of the stacked cache, in place;
* a token is drawn (``temperature > 0``) by inverse transform sampling
  with one uniform number per row (:func:`~jaxpost.generate.processing.inverse_cdf_index`),
  not by Gumbel-max with one per vocabulary entry, and the draw, its
  processed log-prob and the raw log-prob share one pass of exponentials:
  on CPU a temperature-1 step costs about what a greedy one does.

Rows keep their index in the caller's batch throughout; it picks their
random keys, so none of this changes a result.

Conversations (multi-turn rollouts) continue from their cache:
:meth:`Sampler.start` samples like ``Sampler.__call__`` and returns a
:class:`Continuation`; :meth:`Sampler.extend` appends each row's new
tokens (left-padded to a length bucket, padding under segment 0) after the
cache's filled slots, at positions that continue the row's own count, and
decodes on. One cache serves all rows; the slots between a row's turns
(padding, other rows' longer turns) are segment-0 holes its tokens never
attend to, so a row's tokens and log-probs are those of re-prefilling its
whole conversation, for the price of prefilling the new tokens. (A model's
sliding window counts slots, which holes would stretch: such models are
refused.)

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
import dataclasses
from typing import Any, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxpost.errors import UserError, require
from jaxpost.generate.processing import choose_tokens, log_softmax_parts
from jaxpost.models.api import forward, fused_projections, inputs_from_attention_mask
from jaxpost.models.attention import KVCache, cache_logical_axes, init_cache, map_layer_caches, pad_cache
from jaxpost.models.config import ModelConfig
from jaxpost.models.heads import logits as lm_logits
from jaxpost.sharding import Partitioner, active_partitioner, constrain


def check_sampling_values(config: Any) -> None:
    """Raises :class:`~jaxpost.errors.UserError` naming ``<config's class>.<field>`` for an out-of-range value.

    Checks ``max_new_tokens >= 1``, ``temperature >= 0``, ``top_k >= 0``,
    ``0 < top_p <= 1`` and ``group_size >= 1`` of any config holding them
    (:class:`SamplingConfig`, and :class:`~jaxpost.generate.rollout.RolloutConfig`,
    whose values a rollout's sampler takes), so the message names the key
    the user bound.
    """
    c, name = config, type(config).__name__
    require(f"{name}.max_new_tokens", c.max_new_tokens, c.max_new_tokens >= 1, ">= 1")
    require(f"{name}.temperature", c.temperature, c.temperature >= 0, ">= 0 (0 = greedy)")
    require(f"{name}.top_k", c.top_k, c.top_k >= 0, ">= 0 (0 = off)")
    require(f"{name}.top_p", c.top_p, 0.0 < c.top_p <= 1.0, "in (0, 1] (1 = off)")
    require(f"{name}.group_size", c.group_size, c.group_size >= 1, ">= 1")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample.

    ``temperature == 0`` is greedy (argmax; ``top_k``/``top_p`` are then
    irrelevant). ``top_k == 0`` and ``top_p == 1.0`` switch those filters
    off. A row stops after emitting any of ``stop_token_ids`` (the stop
    token is part of the completion); later slots hold ``pad_token_id``.
    ``group_size`` G repeats every prompt G times (GRPO/RLOO groups): output
    row ``b * G + g`` is sample ``g`` of prompt ``b``; the group shares one
    prefill of its prompt. ``cache_dtype`` is the KV cache's dtype (None:
    the model's compute dtype); ``"bfloat16"`` halves the cache of an fp32
    model. Rollouts re-measure log-probs with a training forward, so a
    lower-precision cache changes which tokens are drawn, not the losses'
    inputs. ``cache_block`` sizes the KV cache in phases
    (:func:`cache_capacities`): decoding starts with ``cache_block * m``
    slots (``m`` in 1, 2, 3, 4, 6, 8, ...: the smallest that holds the
    prompt and a token) and moves to the next size when it is full, so a
    step's attention reads about the filled part of the cache, never all
    ``P + max_new_tokens`` slots; each size is one more compiled loop body.
    0 allocates all ``P + max_new_tokens`` slots at once (one phase). The
    results do not depend on it. ``fuse_projections`` runs each decode
    step's query, key and value projections as one matmul, and its gate
    and up projections as another, over stacked copies of their kernels
    made once per call, before the decode loops
    (:func:`~jaxpost.models.api.fused_projections`): the same tokens, fewer
    matmuls, for the memory of those copies (about two thirds of a
    Llama's layer weights) while sampling; False samples in the weights'
    memory alone.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    group_size: int = 1
    cache_dtype: str | None = None
    cache_block: int = 64
    fuse_projections: bool = True

    def __post_init__(self):
        # gin and JSON hand over lists; a tuple keeps the config hashable (a jit static arg).
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        check_sampling_values(self)
        if self.cache_block < 0:
            raise UserError(f"SamplingConfig.cache_block must be >= 0 (0 = one cache of P + N slots), "
                            f"got {self.cache_block}")
        if self.cache_dtype not in (None, "float32", "bfloat16", "float16"):
            raise UserError(f"SamplingConfig.cache_dtype must be None, 'float32', 'bfloat16' or 'float16', "
                            f"got {self.cache_dtype!r}")

    def replace(self, **changes) -> "SamplingConfig":
        return dataclasses.replace(self, **changes)


@struct.dataclass
class SampleOutput:
    """What :func:`sample` returns; every array has leading dimension ``B * group_size``.

    * ``tokens`` int32 ``[B, N]``: sampled ids, ``pad_token_id`` after a stop token.
    * ``logprobs`` float32 ``[B, N]``: ``log softmax(z)[token]`` of the
      *unmodified* model distribution (temperature 1, no top-k/top-p) -- the
      quantity a training forward recomputes (``token_logprobs``), so
      importance ratios start at exactly 1. 0 where ``completion_mask`` is 0.
    * ``processed_logprobs`` float32 ``[B, N]``: log-prob under the
      distribution actually sampled from (after temperature/top-k/top-p; 0
      for greedy, a point mass). 0 where ``completion_mask`` is 0.
    * ``completion_mask`` float32 ``[B, N]``: 1 up to and including the stop token.
    * ``lengths`` int32 ``[B]``: ``completion_mask.sum(-1)``.
    * ``finished`` bool ``[B]``: the row emitted a stop token (else it ran
      out of ``max_new_tokens``).
    """

    tokens: jax.Array
    logprobs: jax.Array
    processed_logprobs: jax.Array
    completion_mask: jax.Array
    lengths: jax.Array
    finished: jax.Array

    def __getitem__(self, index) -> "SampleOutput":
        return jax.tree.map(lambda x: x[index], self)


def _ladder(unit: int, n: int) -> int:
    """The smallest ``unit * m >= n`` with ``m`` in 1, 2, 3, 4, 6, 8, 12, 16, ... (two steps per octave)."""
    m = 1
    while unit * m < n:
        m = 2 if m == 1 else (m * 3 // 2 if m & (m - 1) == 0 else m * 4 // 3)
    return unit * m


def _ladder_below(unit: int, n: int) -> int:
    """The largest ladder value (:func:`_ladder`) ``< n``, or 0 when there is none."""
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
    caps, c = [], _ladder(cache_block, prompt_length + 1)
    while c < full:
        caps.append(c)
        c = _ladder(cache_block, c + 1)
    return caps + [full]


@struct.dataclass
class _Rows:
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


@struct.dataclass
class _Outputs:
    """Output buffers of all ``R`` rows, in the caller's order (rows compacted away are stored here)."""

    tokens: jax.Array  # [R, N]
    logprobs: jax.Array
    processed: jax.Array
    mask: jax.Array
    finished: jax.Array  # [R]


def _constrain_cache(cache: KVCache, config: ModelConfig) -> KVCache:
    axes = cache_logical_axes(config)
    on = lambda xs, a: tuple(map(constrain, xs, a)) if isinstance(xs, tuple) else constrain(xs, a)
    return KVCache(k=on(cache.k, axes.k), v=on(cache.v, axes.v),
                   segment_ids=constrain(cache.segment_ids, axes.segment_ids), index=cache.index)


def _constrain_rows(st: _Rows, config: ModelConfig) -> _Rows:
    row, buf = lambda x: constrain(x, ("batch",)), lambda x: constrain(x, ("batch", None))
    return st.replace(cache=_constrain_cache(st.cache, config), last=row(st.last), done=row(st.done),
                      finished=row(st.finished), rows=row(st.rows), key_ids=row(st.key_ids),
                      last_real=row(st.last_real), n_real=row(st.n_real), budget=row(st.budget),
                      tokens=buf(st.tokens), logprobs=buf(st.logprobs), processed=buf(st.processed),
                      mask=buf(st.mask))


def _record(st: _Rows, logits: jax.Array, rng: jax.Array, s: SamplingConfig) -> _Rows:
    """Samples token ``st.step`` of every live row from ``logits [b, V]`` and writes it down."""
    i = st.step
    step_key = jax.random.fold_in(rng, i)
    keys = jax.vmap(lambda r: jax.random.fold_in(step_key, r))(st.key_ids.astype(jnp.uint32))
    tok, plp = choose_tokens(keys, logits, s.temperature, s.top_k, s.top_p)
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
    return st.replace(step=i + 1, last=tok, last_real=alive, done=st.done | (alive & hit) | (i + 1 >= st.budget),
                      finished=st.finished | (alive & hit), tokens=put(st.tokens, tok),
                      logprobs=put(st.logprobs, lp * live), processed=put(st.processed, plp * live),
                      mask=put(st.mask, live))


def _prefill(graphdef, params, prompt_tokens, prompt_mask, budget, key_ids, rng, config: ModelConfig,
             s: SamplingConfig, capacity: int) -> _Rows:
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
    cache = _constrain_cache(init_cache(config, prompts, capacity, dtype=s.cache_dtype), config)
    hidden, cache = forward(graphdef, params, tokens, positions, segments, cache)
    first_logits = lm_logits(params, config, hidden[:, -1])  # [prompts, V]: the only prompt logits computed
    if G > 1:
        grow = lambda x: jnp.repeat(x, G, axis=x.ndim - 4 if x.ndim >= 4 else 0)  # batch: axis -4 of k and v
        cache = map_layer_caches(grow, grow, cache).replace(segment_ids=grow(cache.segment_ids))
        first_logits, n_real, budget = grow(first_logits), grow(n_real), grow(budget)
    return _record(_constrain_rows(_fresh_rows(cache, n_real, budget, key_ids, s), config), first_logits, rng, s)


def _fresh_rows(cache: KVCache, n_real, budget, key_ids, s: SamplingConfig) -> _Rows:
    """Rows at step 0 after a prefill: nothing sampled yet; a row with budget 0 is done from the start."""
    B, N = budget.shape[0], s.max_new_tokens
    return _Rows(step=jnp.zeros((), jnp.int32), cache=cache, last=jnp.zeros((B,), jnp.int32),
                 done=budget <= 0, finished=jnp.zeros((B,), bool), rows=jnp.arange(B, dtype=jnp.int32),
                 key_ids=jnp.asarray(key_ids, jnp.int32), last_real=jnp.zeros((B,), bool),
                 n_real=n_real.astype(jnp.int32), budget=budget,
                 tokens=jnp.full((B, N), s.pad_token_id, jnp.int32), logprobs=jnp.zeros((B, N), jnp.float32),
                 processed=jnp.zeros((B, N), jnp.float32), mask=jnp.zeros((B, N), jnp.float32))


def _phase(graphdef, params, fused, st: _Rows, rng, min_live, config: ModelConfig, s: SamplingConfig) -> _Rows:
    """``T = 1`` decode steps until every row has stopped, the cache is full, or at most ``min_live`` rows live.

    ``fused``: :func:`~jaxpost.models.api.fused_projections` of ``params``, or None (separate projections).
    """
    N, S = s.max_new_tokens, st.cache.max_len

    def cond(st: _Rows):
        live = jnp.sum(~st.done, dtype=jnp.int32)
        return (st.step < N) & (st.cache.index < S) & (live > min_live)

    def body(st: _Rows) -> _Rows:
        # Feed the token sampled last: it sits at position n_real + step - 1, slot P + step - 1. A row that
        # stopped feeds padding under segment 0, so its cache holds no slot after its stop that a later
        # token of the row (a continuation, Sampler.extend) could attend to.
        pos = (st.n_real + st.step - 1)[:, None]
        seg = st.last_real.astype(jnp.int32)[:, None]
        h, cache = forward(graphdef, params, st.last[:, None], pos, seg, st.cache, fused=fused)
        st = st.replace(cache=_constrain_cache(cache, config))
        return _record(st, lm_logits(params, config, h[:, 0]), rng, s)

    return jax.lax.while_loop(cond, body, st)


class _Static:
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
        return isinstance(other, _Static) and (self.value is other.value or self.value == other.value)


def _output(tokens, logprobs, processed, mask, finished) -> SampleOutput:
    return SampleOutput(tokens=tokens, logprobs=logprobs, processed_logprobs=processed, completion_mask=mask,
                        lengths=mask.sum(-1).astype(jnp.int32), finished=finished)


def _scope(partitioner: Partitioner | None):
    return partitioner.activate() if partitioner is not None else contextlib.nullcontext()


def _sample_impl(graphdef, params, prompt_tokens, prompt_mask, budget, key_ids, rng, *, config: ModelConfig,
                 sampling: SamplingConfig, partitioner: Partitioner | None) -> SampleOutput:
    """The whole of :func:`sample` in one program: prefill, then one decode phase per cache size."""
    graphdef = graphdef.value  # a _Static
    with _scope(partitioner):
        caps = cache_capacities(prompt_tokens.shape[1], sampling.max_new_tokens, sampling.cache_block)
        st = _prefill(graphdef, params, prompt_tokens, prompt_mask, budget, key_ids, rng, config, sampling, caps[0])
        fused = fused_projections(graphdef, params) if sampling.fuse_projections else None  # once for all phases
        for k, cap in enumerate(caps):
            if k:  # the cache is full: copy it into the next size (every row done: the loop exits at once)
                st = st.replace(cache=_constrain_cache(pad_cache(st.cache, cap), config))
            st = _phase(graphdef, params, fused, st, rng, 0, config, sampling)
        return _output(st.tokens, st.logprobs, st.processed, st.mask, st.finished)


_STATIC = ("graphdef", "config", "sampling", "partitioner")
_sample_jit = jax.jit(_sample_impl, static_argnames=_STATIC)


# --- the scheduled path of Sampler: host-driven phases, live rows compacted ----------------------

def _start_impl(graphdef, params, prompt_tokens, prompt_mask, budget, key_ids, rng, *, config, sampling,
                partitioner, capacity):
    graphdef = graphdef.value  # a _Static
    with _scope(partitioner):
        st = _prefill(graphdef, params, prompt_tokens, prompt_mask, budget, key_ids, rng, config, sampling, capacity)
        R, N = st.tokens.shape
        buf = lambda x: constrain(x, ("batch", None))
        out = _Outputs(tokens=buf(jnp.full((R, N), sampling.pad_token_id, jnp.int32)),
                       logprobs=buf(jnp.zeros((R, N), jnp.float32)), processed=buf(jnp.zeros((R, N), jnp.float32)),
                       mask=buf(jnp.zeros((R, N), jnp.float32)), finished=constrain(jnp.zeros((R,), bool), ("batch",)))
        return st, out


def _fuse_impl(graphdef, params, *, partitioner):
    """The stacked projection kernels that every decode phase of one call uses."""
    graphdef = graphdef.value  # a _Static
    with _scope(partitioner):
        return fused_projections(graphdef, params)


def _phase_impl(graphdef, params, fused, st, rng, min_live, *, config, sampling, partitioner):
    graphdef = graphdef.value  # a _Static
    with _scope(partitioner):
        st = _phase(graphdef, params, fused, st, rng, min_live, config, sampling)
        info = jnp.stack([jnp.sum(~st.done, dtype=jnp.int32), st.step, st.cache.index])
        return st, constrain(info, (None,))  # replicated: every host reads it


def _store(out: _Outputs, st: _Rows) -> _Outputs:
    put = lambda buf, x: buf.at[st.rows].set(x, unique_indices=True)
    return _Outputs(tokens=put(out.tokens, st.tokens), logprobs=put(out.logprobs, st.logprobs),
                    processed=put(out.processed, st.processed), mask=put(out.mask, st.mask),
                    finished=put(out.finished, st.finished))


def _regroup_impl(st, out, *, config, partitioner, batch, capacity):
    """Stores every row's outputs, keeps the first ``batch`` rows with live ones first, grows the cache."""
    with _scope(partitioner):
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
                            logprobs=take(st.logprobs), processed=take(st.processed), mask=take(st.mask))
        st = st.replace(cache=pad_cache(st.cache, capacity))
        buf = lambda x: constrain(x, ("batch", None))
        out = out.replace(tokens=buf(out.tokens), logprobs=buf(out.logprobs), processed=buf(out.processed),
                          mask=buf(out.mask), finished=constrain(out.finished, ("batch",)))
        return _constrain_rows(st, config), out


def _finish_impl(st, out, *, partitioner, rows):
    with _scope(partitioner):
        o = _store(out, st)
        return _output(o.tokens, o.logprobs, o.processed, o.mask, o.finished)[:rows]


_start_jit = jax.jit(_start_impl, static_argnames=_STATIC + ("capacity",))
_fuse_jit = jax.jit(_fuse_impl, static_argnames=("graphdef", "partitioner"))
_phase_jit = jax.jit(_phase_impl, static_argnames=_STATIC, donate_argnames=("st",))  # the cache updates in place
_regroup_jit = jax.jit(_regroup_impl, static_argnames=("config", "partitioner", "batch", "capacity"))
_finish_jit = jax.jit(_finish_impl, static_argnames=("partitioner", "rows"))


# --- continuation: one cache per batch of conversations, extended turn by turn -------------------------

@struct.dataclass
class _Carry:
    """What a continuation keeps on device between calls, for all ``b`` rows of the batch.

    ``cache`` holds each row's conversation so far *except* its last sampled
    token (slots of other content -- padding, stopped rows' feeds -- are
    segment 0); ``n_real [b]`` counts the row's tokens in it (the position of
    its next token); ``last [b]`` is the row's last sampled token and
    ``has_last [b]`` whether the last call sampled one for the row.
    """

    cache: KVCache
    n_real: jax.Array
    last: jax.Array
    has_last: jax.Array


@dataclasses.dataclass
class Continuation:
    """Opaque state of a batch of conversations between :meth:`Sampler.start`/:meth:`Sampler.extend` calls.

    ``carry``: the device arrays (:class:`_Carry`, global and sharded by
    the batch); ``index``: filled cache slots (the same on every process);
    ``rows``: the caller's rows (the carry may hold padding rows after them).
    A state is consumed by the call that extends it.
    """

    carry: _Carry
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
    ladder value of ``cache_block`` (:func:`_ladder`; ``cache_block == 0``:
    one size, a power of two), at least ``allocated``, and the last holds
    ``start + max_new_tokens``. Sizes come from a fixed ladder rather than
    from ``start + N`` so that the compiled programs are reused across turns.
    """
    need = start + max_new_tokens
    if cache_block <= 0:
        return [max(allocated, bucket_length(need, 16))]
    c = max(allocated, _ladder(cache_block, start + 1))
    caps = [c]
    while c < need:
        c = _ladder(cache_block, c + 1)
        caps.append(c)
    return caps


def _open_impl(graphdef, params, prompt_tokens, prompt_mask, budget, key_ids, rng, *, config, sampling,
               partitioner, capacity):
    graphdef = graphdef.value  # a _Static
    with _scope(partitioner):
        return _prefill(graphdef, params, prompt_tokens, prompt_mask, budget, key_ids, rng, config, sampling,
                        capacity)


def _chunk(carry: _Carry, new_tokens, new_mask):
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
    graphdef = graphdef.value  # a _Static
    with _scope(partitioner):
        tokens, positions, segments = (constrain(x, ("batch", "length"))
                                       for x in _chunk(carry, new_tokens, new_mask))
        cache = _constrain_cache(pad_cache(carry.cache, capacity), config)
        hidden, cache = forward(graphdef, params, tokens, positions, segments, cache)
        logits = lm_logits(params, config, hidden[:, -1])  # the chunk's last slot: each live row's last token
        budget = jnp.clip(jnp.asarray(budget, jnp.int32), 0, sampling.max_new_tokens)
        n_real = carry.n_real + segments.sum(-1)
        st = _fresh_rows(cache, n_real, budget, key_ids, sampling)
        return _record(_constrain_rows(st, config), logits, rng, sampling)


def _grow_impl(st, *, config, partitioner, capacity):
    with _scope(partitioner):
        return _constrain_rows(st.replace(cache=pad_cache(st.cache, capacity)), config)


def _settle_impl(st, start, *, config, partitioner, rows):
    """The call's outputs (first ``rows``) and the carry: the last sampled token of each row leaves the cache.

    Token ``j`` of a row was fed at slot ``start + j`` (``start``: filled
    slots before decoding) if a later step ran; the last one, ``L - 1``, is
    set to segment 0 there whether fed or not, and kept as ``last`` instead,
    so the carry's invariant holds without knowing which rows were fed.
    """
    with _scope(partitioner):
        L = st.mask.sum(-1).astype(jnp.int32)
        has = L >= 1
        c = st.cache
        drop = (jnp.arange(c.max_len, dtype=jnp.int32)[None] == (start + L - 1)[:, None]) & has[:, None]
        cache = c.replace(segment_ids=jnp.where(drop, 0, c.segment_ids))
        last = jnp.take_along_axis(st.tokens, jnp.maximum(L - 1, 0)[:, None], -1)[:, 0]
        row = lambda x: constrain(x, ("batch",))
        carry = _Carry(cache=_constrain_cache(cache, config), n_real=row(st.n_real + jnp.maximum(L - 1, 0)),
                       last=row(last), has_last=row(has))
        return _output(st.tokens, st.logprobs, st.processed, st.mask, st.finished)[:rows], carry


_open_jit = jax.jit(_open_impl, static_argnames=_STATIC + ("capacity",))
_extend_jit = jax.jit(_extend_impl, static_argnames=_STATIC + ("capacity",))
_grow_jit = jax.jit(_grow_impl, static_argnames=("config", "partitioner", "capacity"))
_settle_jit = jax.jit(_settle_impl, static_argnames=("config", "partitioner", "rows"))
_JITS = (_sample_jit, _start_jit, _fuse_jit, _phase_jit, _regroup_jit, _finish_jit, _open_jit, _extend_jit, _grow_jit,
         _settle_jit)


def compiled_programs() -> int:
    """How many programs the sampler's jitted functions hold (jax's own count of compiled signatures)."""
    return sum(f._cache_size() for f in _JITS)


def _batch_shards(partitioner: Partitioner | None) -> int:
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


def _budgets(max_new_tokens, prompts: int, N: int, low: int = 1):
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


def _place(partitioner, shards, *arrays):
    """Host arrays onto the batch sharding (replicated when the batch does not divide); traced: as they are."""
    if partitioner is None or any(isinstance(x, jax.core.Tracer) for x in arrays):
        return arrays
    place = lambda x: (partitioner.batch_sharding(np.ndim(x)) if np.shape(x)[0] % shards == 0
                       else partitioner.replicated)
    return tuple(jax.device_put(x, place(x)) for x in arrays)


def sample(graphdef: nnx.GraphDef, params: dict, config: ModelConfig, prompt_tokens: jax.Array,
           prompt_mask: jax.Array, rng: jax.Array, sampling: SamplingConfig,
           partitioner: Partitioner | None = None, max_new_tokens=None, row_ids=None) -> SampleOutput:
    """Samples up to ``sampling.max_new_tokens`` tokens after each left-padded prompt.

    ``prompt_tokens`` int32 ``[B, P]`` and ``prompt_mask`` ``[B, P]`` (1 =
    real token, left-padded: zeros then ones, at least one 1 per row).
    Returns a :class:`SampleOutput` of ``B * group_size`` rows. Step ``i``
    of row ``r`` draws with key ``fold_in(fold_in(rng, i), row_ids[r])``
    (``row_ids``: optional ints, one per output row; default ``r``), so a
    row's draws depend on neither the batch size nor the sharding, and a
    caller that samples a subset of its rows can keep each row's keys.

    ``max_new_tokens`` (optional, int or ``[B]`` ints in ``[1, N]``): a
    budget per prompt (shared by its group); a row that reaches its budget
    stops as if out of ``N`` (``finished`` False). Otherwise every row may
    run to ``N = sampling.max_new_tokens``.

    One ``jax.jit`` (static: ``graphdef``, ``config``, ``sampling``,
    ``partitioner``): a prefill forward of the whole prompt, then
    ``lax.while_loop`` s of ``T = 1`` forwards that exit once every row has
    stopped. The KV cache grows in phases (:func:`cache_capacities` of
    ``sampling.cache_block``): each phase's loop runs over a cache just
    large enough for its steps, so a step's attention costs in proportion
    to the filled part, not to ``P + N``. Rows that stop early still ride
    along until the last stops; :class:`Sampler` compacts them away. With a
    ``partitioner`` the batch (``B * group_size``, which must divide evenly)
    is split over the batch mesh axes and the cache is sharded like the
    activations; with none, the partitioner active at the call
    (``Partitioner.activate``) is used. Compiles once per distinct
    ``(B, P)``; :class:`Sampler` buckets shapes.
    """
    if config.head != "lm":
        raise ValueError(f"sample needs a model with an LM head; config.head={config.head!r}")
    # An active partitioner would shape the trace through the model's constraints; making it
    # the static argument keeps the compiled-function cache honest.
    partitioner = partitioner if partitioner is not None else active_partitioner()
    check_prompts(prompt_tokens, prompt_mask)
    rows = prompt_tokens.shape[0] * sampling.group_size
    shards = _batch_shards(partitioner)
    if rows % shards:
        raise ValueError(f"batch of {prompt_tokens.shape[0]} prompts x group_size {sampling.group_size} = {rows} "
                         f"rows does not divide over {shards} batch shards of {partitioner}")
    budget = _budgets(max_new_tokens, prompt_tokens.shape[0], sampling.max_new_tokens)
    key_ids = _key_ids(row_ids, rows)
    # Only the un-repeated prompts need to divide; the repeat happens inside the jit.
    prompt_tokens, prompt_mask, budget, key_ids = _place(partitioner, shards, prompt_tokens, prompt_mask, budget,
                                                         key_ids)
    graphdef = graphdef if isinstance(graphdef, _Static) else _Static(graphdef)  # a Sampler's is hashed already
    return _sample_jit(graphdef, params, prompt_tokens, prompt_mask, budget, key_ids, rng, config=config,
                       sampling=sampling, partitioner=partitioner)


def _key_ids(row_ids, rows: int):
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


@gin.configurable
class Sampler:
    """Compiled sampling for one model and one :class:`SamplingConfig`, shapes bucketed.

    Prompts are left-padded up to a length bucket (``length_buckets`` if
    given, else powers of two ``>= min_length_bucket``) and the batch is
    padded up to a power of two that divides over the batch shards. Extra
    left padding changes no result (positions come from the mask); padding
    rows repeat row 0 and are cut from the output.

    With ``compact`` (off by default, see the module docstring for why) decoding runs as host-driven phases, so
    that rows which stopped early stop costing compute: a phase decodes
    until every row has stopped, its cache is full (the cache then grows
    to the next of :func:`cache_capacities`), or few enough rows are left
    to fit the next smaller batch size (``shards * m``, ``m`` in 1, 2, 3, 4,
    6, 8, ...: it always divides over the batch shards); the live rows are
    then gathered, with their caches, into that smaller batch. A batch with
    mixed completion lengths so costs about the sum of its real tokens, not
    batch x longest. Between phases every host reads one replicated scalar
    triple (live rows, step, filled slots); the outputs stay global arrays.
    Rows keep their index in the caller's batch (their keys), so the
    results equal those of one :func:`sample` call (``compact=False`` runs
    exactly that). Compiled programs are cached across calls and bounded:
    per prompt-length bucket and batch bucket one prefill, and one decode
    program per (batch size, cache size) pair met; ``compiled_programs()``
    counts them.

    :meth:`start` and :meth:`extend` sample conversations turn by turn from
    their KV cache (module docstring); they never compact.

    ``compiled_shapes`` holds the ``(batch, length)`` prompt buckets used so far.
    """

    def __init__(self, graphdef: nnx.GraphDef, config: ModelConfig, sampling: SamplingConfig,
                 partitioner: Partitioner | None = None, min_length_bucket: int = 16,
                 length_buckets: Sequence[int] | None = None, compact: bool = False):
        if config.head != "lm":
            raise ValueError(f"Sampler needs a model with an LM head; config.head={config.head!r}")
        self.graphdef, self.config, self.sampling, self.partitioner = graphdef, config, sampling, partitioner
        self._graphdef = _Static(graphdef)
        self.min_length_bucket = min_length_bucket
        self.length_buckets = tuple(length_buckets) if length_buckets else None
        self.compact = compact
        self.compiled_shapes: set[tuple[int, int]] = set()
        self.phases: list[tuple[int, int]] = []  # (batch, cache slots) of each decode phase of the last call

    def bucket_batch(self, b: int) -> int:
        """Power of two ``>= b``, rounded up to a multiple of the batch shards."""
        shards = _batch_shards(self.partitioner if self.partitioner is not None else active_partitioner())
        b = 1 << max(0, b - 1).bit_length()
        return -(-b // shards) * shards

    def __call__(self, params: dict, prompt_tokens, prompt_mask, rng: jax.Array,
                 max_new_tokens=None, row_ids=None) -> SampleOutput:
        """:func:`sample` on the bucketed shapes; returns the ``B * group_size`` real rows.

        ``max_new_tokens``: optional per-prompt budgets; ``row_ids``: optional
        key index per output row; both as in :func:`sample`.
        """
        s = self.sampling
        tokens, mask, B = self._bucketed(prompt_tokens, prompt_mask)
        Bb, Pb = tokens.shape
        budget = np.full((Bb,), s.max_new_tokens, np.int32)
        budget[:B] = _budgets(max_new_tokens, B, s.max_new_tokens)
        budget[B:] = budget[0]
        rows = B * s.group_size
        key_ids = self._padded_key_ids(row_ids, rows, Bb * s.group_size)
        if not self.compact:
            out = sample(self._graphdef, params, self.config, tokens, mask, rng, s, self.partitioner, budget,
                         key_ids)
            return out[:rows] if Bb != B else out
        part = self.partitioner if self.partitioner is not None else active_partitioner()
        shards = _batch_shards(part)
        tokens, mask, budget, key_ids = _place(part, shards, tokens, mask, budget, key_ids)
        statics = self._statics(part)
        caps = cache_capacities(Pb, s.max_new_tokens, s.cache_block)
        st, out = _start_jit(params=params, prompt_tokens=tokens, prompt_mask=mask, budget=budget, key_ids=key_ids,
                             rng=rng, capacity=caps[0], **statics)
        fused = self._fused(params, part)
        cap, self.phases = 0, []
        while True:
            b = st.done.shape[0]
            floor = _ladder_below(shards, b)
            self.phases.append((b, caps[cap]))
            st, info = _phase_jit(params=params, fused=fused, st=st, rng=rng, min_live=np.int32(floor), **statics)
            # Replicated: each host reads its own copy (no gather of a global array).
            live, step, index = (int(v) for v in np.asarray(info.addressable_data(0)))
            if live == 0 or step >= s.max_new_tokens:
                break
            if index >= caps[cap]:
                cap += 1
            batch = _ladder(shards, live) if live <= floor else b
            st, out = _regroup_jit(st, out, config=self.config, partitioner=part, batch=batch, capacity=caps[cap])
        return _finish_jit(st, out, partitioner=part, rows=rows)

    # --- continuation ------------------------------------------------------------------------------

    def start(self, params: dict, prompt_tokens, prompt_mask, rng: jax.Array, max_new_tokens=None,
              row_ids=None) -> tuple[SampleOutput, Continuation]:
        """Like ``__call__``, and also returns the batch's :class:`Continuation` for :meth:`extend`.

        The outputs equal ``__call__``'s for the same arguments (``row_ids``:
        key index per output row, as in :func:`sample`; a row with budget 0
        draws nothing, so its id does not matter). ``max_new_tokens`` may hold 0 for a row: it samples nothing
        (``lengths`` 0). Decoding never compacts (the batch stays whole: it
        owns the cache), whatever ``compact`` says.
        """
        self._check_continuable()
        s = self.sampling
        tokens, mask, B = self._bucketed(prompt_tokens, prompt_mask)
        Bb, Pb = tokens.shape
        budget = np.zeros((Bb,), np.int32)  # padding rows: budget 0 (never decoded)
        budget[:B] = _budgets(max_new_tokens, B, s.max_new_tokens, low=0)
        part, shards = self._part_shards()
        key_ids = self._padded_key_ids(row_ids, B * s.group_size, Bb * s.group_size)
        tokens, mask, budget, key_ids = _place(part, shards, tokens, mask, budget, key_ids)
        caps = continuation_capacities(0, Pb, s.max_new_tokens, s.cache_block)
        st = _open_jit(params=params, prompt_tokens=tokens, prompt_mask=mask, budget=budget, key_ids=key_ids,
                       rng=rng, capacity=caps[0], **self._statics(part))
        return self._decode(params, st, rng, caps, Pb, B * s.group_size, part)

    def extend(self, params: dict, state: Continuation, new_tokens, new_mask, rng: jax.Array, max_new_tokens=None,
               row_ids=None) -> tuple[SampleOutput, Continuation]:
        """Continues every conversation of ``state`` after ``new_tokens``; returns the outputs and the next state.

        ``new_tokens``/``new_mask`` ``[R, C]`` (``R = state.rows``,
        left-padded, a row may have none): what follows each row's last
        sampled token in its conversation (an observation, the next
        assistant header). ``max_new_tokens``: int or ``[R]`` ints in
        ``[0, N]`` (``None``: ``N``); a row with 0 samples nothing this call
        (a finished conversation) and its new tokens may be empty; a row with
        more needs a last token: a new one, or one it sampled the call
        before. ``row_ids``: key index per row (default ``r``), as in
        :func:`sample`. ``state`` is consumed.

        Contract: row ``r``'s outputs equal those of ``__call__`` on the row's
        whole conversation so far (every prompt, sampled token and new token,
        padding removed) with the same row id, up to float rounding: the
        tokens come from the same per-(row, step) keys, the log-probs from
        the same positions over the same tokens. Only the chunk of new
        tokens is prefilled: each row's chunk (its last sampled token, which
        the cache does not hold yet, then its new tokens; left-padded to a
        length bucket, padding under segment 0) is written after the
        cache's filled slots, at positions continuing the row's own count
        of tokens, so rows share one cache whose slots between their turns
        are segment-0 holes no real token attends to. Compiled programs are
        reused: the chunk length is bucketed like prompt lengths and the
        cache grows along the fixed ladder of
        :func:`continuation_capacities`.
        """
        self._check_continuable()
        new_tokens, new_mask = np.asarray(new_tokens), np.asarray(new_mask)
        s, R = self.sampling, state.rows
        if new_tokens.ndim != 2 or new_mask.shape != new_tokens.shape or new_tokens.shape[0] != R:
            raise ValueError(f"new_tokens and new_mask must both be [{R}, C] (one row per conversation); got "
                             f"{tuple(new_tokens.shape)} and {tuple(new_mask.shape)}")
        m = new_mask.astype(bool)
        bad = np.flatnonzero((m[:, :-1] & ~m[:, 1:]).any(-1))
        if bad.size:
            raise ValueError(f"new_mask rows {bad[:8].tolist()} are not left-padded (a 0 follows a 1)")
        Bb, C = state.carry.n_real.shape[0], new_tokens.shape[1]
        Cb = bucket_length(C + 1, self.min_length_bucket, self.length_buckets)  # + 1: the pending last token
        tokens = np.full((Bb, Cb - 1), s.pad_token_id, np.int32)
        mask = np.zeros((Bb, Cb - 1), np.int32)
        tokens[:R, Cb - 1 - C:], mask[:R, Cb - 1 - C:] = new_tokens, new_mask
        budget = np.zeros((Bb,), np.int32)
        budget[:R] = _budgets(max_new_tokens, R, s.max_new_tokens, low=0)
        part, shards = self._part_shards()
        key_ids = self._padded_key_ids(row_ids, R, Bb)
        tokens, mask, budget, key_ids = _place(part, shards, tokens, mask, budget, key_ids)
        start = state.index + Cb
        caps = continuation_capacities(state.slots, start, s.max_new_tokens, s.cache_block)
        st = _extend_jit(params=params, carry=state.carry, new_tokens=tokens, new_mask=mask, budget=budget,
                         key_ids=key_ids, rng=rng, capacity=caps[0], **self._statics(part))
        return self._decode(params, st, rng, caps, start, R, part)

    def _check_continuable(self):
        if self.config.sliding_window is not None:
            # The model's window counts cache slots; a continuation leaves holes between turns, so slot
            # distance would exceed token distance. Re-prefill (``__call__``) instead.
            raise ValueError(f"Sampler.start/extend do not support sliding_window={self.config.sliding_window} "
                             "models (the window counts cache slots, and a continued cache has holes); sample "
                             "each turn with Sampler.__call__ on the whole conversation instead")

    def _bucketed(self, prompt_tokens, prompt_mask) -> tuple[np.ndarray, np.ndarray, int]:
        """Checked prompts left-padded to the length bucket and the batch padded to its bucket, with ``B``.

        Padding rows repeat row 0 (a valid prompt); the callers cut them from the outputs.
        """
        prompt_tokens, prompt_mask = np.asarray(prompt_tokens), np.asarray(prompt_mask)
        check_prompts(prompt_tokens, prompt_mask)
        B, P = prompt_tokens.shape
        Bb, Pb = self.bucket_batch(B), bucket_length(P, self.min_length_bucket, self.length_buckets)
        tokens = np.full((Bb, Pb), self.sampling.pad_token_id, np.int32)
        mask = np.zeros((Bb, Pb), np.int32)
        tokens[:B, Pb - P:], mask[:B, Pb - P:] = prompt_tokens, prompt_mask
        tokens[B:], mask[B:] = tokens[0], mask[0]
        self.compiled_shapes.add((Bb, Pb))
        return tokens, mask, B

    @staticmethod
    def _padded_key_ids(row_ids, rows: int, padded: int) -> np.ndarray:
        """``row_ids`` of the real rows, then the padding rows' own indices (they are cut from the outputs)."""
        return np.concatenate([_key_ids(row_ids, rows), np.arange(rows, padded, dtype=np.int32)]).astype(np.int32)

    def _part_shards(self):
        part = self.partitioner if self.partitioner is not None else active_partitioner()
        return part, _batch_shards(part)

    def _statics(self, part) -> dict:
        return dict(graphdef=self._graphdef, config=self.config, sampling=self.sampling, partitioner=part)

    def _fused(self, params, part):
        """The stacked projection kernels for this call's decode phases, made once (not once per phase)."""
        if not self.sampling.fuse_projections:
            return None
        return _fuse_jit(self._graphdef, params, partitioner=part)

    def _decode(self, params, st: _Rows, rng, caps: list[int], start: int, rows: int, part
                ) -> tuple[SampleOutput, Continuation]:
        """Decode phases over ``caps`` (host-driven, no compaction), then the outputs and the next state."""
        statics, N = self._statics(part), self.sampling.max_new_tokens
        fused = self._fused(params, part)
        k, self.phases = 0, []
        while True:
            self.phases.append((st.done.shape[0], caps[k]))
            st, info = _phase_jit(params=params, fused=fused, st=st, rng=rng, min_live=np.int32(0), **statics)
            # Replicated: each host reads its own copy (no gather of a global array).
            live, step, index = (int(v) for v in np.asarray(info.addressable_data(0)))
            if live == 0 or step >= N:
                break
            k += 1  # the loop left early only because the cache is full: grow it
            st = _grow_jit(st, config=self.config, partitioner=part, capacity=caps[k])
        out, carry = _settle_jit(st, np.int32(start), config=self.config, partitioner=part, rows=rows)
        return out, Continuation(carry=carry, index=index, rows=rows)

    def sample_ids(self, params: dict, prompts: Sequence[Sequence[int]], rng: jax.Array,
                   max_new_tokens=None) -> SampleOutput:
        """Like ``__call__`` for a list of unpadded prompt id lists."""
        tokens, mask = left_pad(prompts, pad_token_id=self.sampling.pad_token_id)
        return self(params, tokens, mask, rng, max_new_tokens)
