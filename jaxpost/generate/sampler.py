"""The one KV-cache sampler: prefill once, then a compiled decode loop.

Used by PPO, GRPO/RLOO rollouts, online DPO, on-policy distillation and
synthetic-data generation. Everything from the prompt to the last sampled
token runs inside one ``jax.jit`` (graphdef and configs static).

Layout of one row (prompt length ``P``, ``N = max_new_tokens``)::

    cache slot   0 .. P-1                 P .. P+N-1
    content      [pad .. pad, prompt]     generated tokens
    segment      0 .. 0, 1 .. 1           1 ...
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
import math
from typing import Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxpost.generate.processing import choose_tokens
from jaxpost.models.api import forward, inputs_from_attention_mask
from jaxpost.models.attention import KVCache, cache_logical_axes, init_cache
from jaxpost.models.config import ModelConfig
from jaxpost.models.heads import logits as lm_logits
from jaxpost.sharding import Partitioner, active_partitioner, constrain


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
    inputs.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    group_size: int = 1
    cache_dtype: str | None = None

    def __post_init__(self):
        # gin and JSON hand over lists; a tuple keeps the config hashable (a jit static arg).
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"SamplingConfig.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"SamplingConfig.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.group_size < 1:
            raise ValueError(f"SamplingConfig.group_size must be >= 1, got {self.group_size}")
        if self.cache_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"SamplingConfig.cache_dtype must be None, 'float32', 'bfloat16' or 'float16', "
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


@struct.dataclass
class _LoopState:
    step: jax.Array  # index of the token the next iteration samples
    cache: KVCache
    last: jax.Array  # [B] token sampled in the previous iteration
    done: jax.Array  # [B] bool
    tokens: jax.Array
    logprobs: jax.Array
    processed: jax.Array
    mask: jax.Array


def _constrain_cache(cache: KVCache, config: ModelConfig) -> KVCache:
    axes = cache_logical_axes(config)
    return KVCache(k=tuple(constrain(x, a) for x, a in zip(cache.k, axes.k)),
                   v=tuple(constrain(x, a) for x, a in zip(cache.v, axes.v)),
                   segment_ids=constrain(cache.segment_ids, axes.segment_ids), index=cache.index)


def _sample_impl(graphdef, params, prompt_tokens, prompt_mask, rng, *, config: ModelConfig,
                 sampling: SamplingConfig, partitioner: Partitioner | None) -> SampleOutput:
    scope = partitioner.activate() if partitioner is not None else contextlib.nullcontext()
    with scope:
        return _decode(graphdef, params, prompt_tokens, prompt_mask, rng, config, sampling)


def _decode(graphdef, params, prompt_tokens, prompt_mask, rng, config, sampling) -> SampleOutput:
    s = sampling
    G, N = s.group_size, s.max_new_tokens
    real = prompt_mask.astype(bool)
    # Ids under padding may be anything (e.g. -100); a gather out of range yields NaN.
    tokens = jnp.where(real, prompt_tokens, 0).astype(jnp.int32)
    tokens, real = constrain(tokens, ("batch", "length")), constrain(real, ("batch", "length"))
    prompts, P = tokens.shape
    B = prompts * G
    positions, segments = inputs_from_attention_mask(real)
    n_real = segments.sum(-1)

    # Prefill each prompt once; the G samples of a group share its keys/values (prefix sharing),
    # so prefill costs 1/G of prefilling the repeated batch.
    cache = _constrain_cache(init_cache(config, prompts, P + N, dtype=s.cache_dtype), config)
    hidden, cache = forward(graphdef, params, tokens, positions, segments, cache)
    first_logits = lm_logits(params, config, hidden[:, -1])  # [prompts, V]: the only prompt logits computed
    if G > 1:
        grow = lambda x: jnp.repeat(x, G, axis=0)
        cache = cache.replace(k=tuple(map(grow, cache.k)), v=tuple(map(grow, cache.v)),
                              segment_ids=grow(cache.segment_ids))
        first_logits, n_real = grow(first_logits), grow(n_real)
    cache = _constrain_cache(cache, config)

    rows = jnp.arange(B, dtype=jnp.uint32)
    stops = jnp.asarray(s.stop_token_ids, jnp.int32)

    def record(state: _LoopState, logits: jax.Array) -> _LoopState:
        i = state.step
        step_key = jax.random.fold_in(rng, i)
        keys = jax.vmap(lambda r: jax.random.fold_in(step_key, r))(rows)
        tok, plp = choose_tokens(keys, logits, s.temperature, s.top_k, s.top_p)
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), tok[:, None], -1)[:, 0]
        alive = ~state.done
        tok = jnp.where(alive, tok, s.pad_token_id)
        live = alive.astype(jnp.float32)
        hit = (tok[:, None] == stops[None, :]).any(-1) if s.stop_token_ids else jnp.zeros_like(alive)
        put = lambda buf, x: jax.lax.dynamic_update_slice(buf, x[:, None].astype(buf.dtype), (0, i))
        return _LoopState(
            step=i + 1, cache=state.cache, last=tok, done=state.done | (alive & hit),
            tokens=put(state.tokens, tok), logprobs=put(state.logprobs, lp * live),
            processed=put(state.processed, plp * live), mask=put(state.mask, live))

    zeros = lambda dtype: constrain(jnp.zeros((B, N), dtype), ("batch", None))
    state = _LoopState(step=jnp.zeros((), jnp.int32), cache=cache, last=jnp.zeros((B,), jnp.int32),
                       done=jnp.zeros((B,), bool),
                       tokens=constrain(jnp.full((B, N), s.pad_token_id, jnp.int32), ("batch", None)),
                       logprobs=zeros(jnp.float32), processed=zeros(jnp.float32), mask=zeros(jnp.float32))
    state = record(state, first_logits)

    def cond(st: _LoopState):
        return (st.step < N) & ~jnp.all(st.done)

    def body(st: _LoopState) -> _LoopState:
        # Feed the token sampled last: it sits at position n_real + step - 1, slot P + step - 1.
        pos = (n_real + st.step - 1)[:, None]
        h, new_cache = forward(graphdef, params, st.last[:, None], pos, jnp.ones((B, 1), jnp.int32), st.cache)
        new_cache = _constrain_cache(new_cache, config)
        return record(st.replace(cache=new_cache), lm_logits(params, config, h[:, 0]))

    state = jax.lax.while_loop(cond, body, state)
    return SampleOutput(tokens=state.tokens, logprobs=state.logprobs, processed_logprobs=state.processed,
                        completion_mask=state.mask, lengths=state.mask.sum(-1).astype(jnp.int32),
                        finished=state.done)


_sample_jit = jax.jit(_sample_impl, static_argnames=("graphdef", "config", "sampling", "partitioner"))


def _batch_shards(partitioner: Partitioner | None) -> int:
    if partitioner is None:
        return 1
    spec = partitioner.spec(("batch",))[0]
    names = (spec,) if isinstance(spec, str) else tuple(spec or ())
    return math.prod(partitioner.mesh.shape[a] for a in names)


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


def sample(graphdef: nnx.GraphDef, params: dict, config: ModelConfig, prompt_tokens: jax.Array,
           prompt_mask: jax.Array, rng: jax.Array, sampling: SamplingConfig,
           partitioner: Partitioner | None = None) -> SampleOutput:
    """Samples ``sampling.max_new_tokens`` tokens after each left-padded prompt.

    ``prompt_tokens`` int32 ``[B, P]`` and ``prompt_mask`` ``[B, P]`` (1 =
    real token, left-padded: zeros then ones, at least one 1 per row).
    Returns a :class:`SampleOutput` of ``B * group_size`` rows. Step ``i``
    of row ``r`` draws with key ``fold_in(fold_in(rng, i), r)``, so a row's
    draws depend on neither the batch size nor the sharding.

    One ``jax.jit`` (static: ``graphdef``, ``config``, ``sampling``,
    ``partitioner``): a prefill forward of the whole prompt into a cache of
    ``P + N`` slots, then a ``lax.while_loop`` of ``T = 1`` forwards that
    exits once every row has stopped. With a ``partitioner`` the batch
    (``B * group_size``, which must divide evenly) is split over the batch
    mesh axes and the cache is sharded like the activations; with none, the
    partitioner active at the call (``Partitioner.activate``) is used.
    Compiles once per distinct ``(B, P)``; :class:`Sampler` buckets shapes.
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
    if partitioner is not None and not isinstance(prompt_tokens, jax.core.Tracer):
        # Only the un-repeated prompts need to divide; the repeat happens inside the jit.
        place = partitioner.batch_sharding(2) if prompt_tokens.shape[0] % shards == 0 else partitioner.replicated
        prompt_tokens, prompt_mask = jax.device_put((prompt_tokens, prompt_mask), place)
    return _sample_jit(graphdef, params, prompt_tokens, prompt_mask, rng, config=config, sampling=sampling,
                       partitioner=partitioner)


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
    padded up to a power of two that divides over the batch shards, so a run
    compiles at most once per (batch bucket, length bucket). Extra left
    padding changes no result (positions come from the mask); padding rows
    repeat row 0 and are cut from the output.

    ``compiled_shapes`` holds the ``(batch, length)`` buckets used so far.
    """

    def __init__(self, graphdef: nnx.GraphDef, config: ModelConfig, sampling: SamplingConfig,
                 partitioner: Partitioner | None = None, min_length_bucket: int = 16,
                 length_buckets: Sequence[int] | None = None):
        if config.head != "lm":
            raise ValueError(f"Sampler needs a model with an LM head; config.head={config.head!r}")
        self.graphdef, self.config, self.sampling, self.partitioner = graphdef, config, sampling, partitioner
        self.min_length_bucket = min_length_bucket
        self.length_buckets = tuple(length_buckets) if length_buckets else None
        self.compiled_shapes: set[tuple[int, int]] = set()

    def bucket_batch(self, b: int) -> int:
        """Power of two ``>= b``, rounded up to a multiple of the batch shards."""
        shards = _batch_shards(self.partitioner if self.partitioner is not None else active_partitioner())
        b = 1 << max(0, b - 1).bit_length()
        return -(-b // shards) * shards

    def __call__(self, params: dict, prompt_tokens, prompt_mask, rng: jax.Array) -> SampleOutput:
        """:func:`sample` on the bucketed shapes; returns the ``B * group_size`` real rows."""
        prompt_tokens, prompt_mask = np.asarray(prompt_tokens), np.asarray(prompt_mask)
        check_prompts(prompt_tokens, prompt_mask)
        B, P = prompt_tokens.shape
        Bb = self.bucket_batch(B)
        Pb = bucket_length(P, self.min_length_bucket, self.length_buckets)
        tokens = np.full((Bb, Pb), self.sampling.pad_token_id, np.int32)
        mask = np.zeros((Bb, Pb), np.int32)
        tokens[:B, Pb - P:] = prompt_tokens
        mask[:B, Pb - P:] = prompt_mask
        tokens[B:], mask[B:] = tokens[0], mask[0]
        self.compiled_shapes.add((Bb, Pb))
        out = sample(self.graphdef, params, self.config, tokens, mask, rng, self.sampling, self.partitioner)
        return out[: B * self.sampling.group_size] if Bb != B else out

    def sample_ids(self, params: dict, prompts: Sequence[Sequence[int]], rng: jax.Array) -> SampleOutput:
        """Like ``__call__`` for a list of unpadded prompt id lists."""
        tokens, mask = left_pad(prompts, pad_token_id=self.sampling.pad_token_id)
        return self(params, tokens, mask, rng)
