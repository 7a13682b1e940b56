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
random keys, so none of this changes a result. Conversations (multi-turn
rollouts) continue from their cache: :meth:`Sampler.start` and
:meth:`Sampler.extend` prefill only each turn's new tokens.

The compiled programs are in :mod:`jaxpost.generate.decode` (one batch of
prompts) and :mod:`jaxpost.generate.continuation` (conversations, turn by
turn); the prompts' preparation in :mod:`jaxpost.generate.prompts`.
"""

from __future__ import annotations

from typing import Sequence

import gin
import jax
import numpy as np
from flax import nnx

from jaxpost.generate import continuation, decode
from jaxpost.generate.continuation import Continuation, continuation_capacities
from jaxpost.generate.decode import Rows, Static, cache_capacities, ladder, ladder_below
from jaxpost.generate.prompts import (batch_shards, bucket_length, check_prompts, left_pad, place_batch,
                                      prompt_budgets, row_key_ids)
from jaxpost.generate.sampling_config import SampleOutput, SamplingConfig, check_sampling_values
from jaxpost.models.config import ModelConfig
from jaxpost.sharding import Partitioner, active_partitioner

__all__ = ["Continuation", "SampleOutput", "Sampler", "SamplingConfig", "bucket_length", "cache_capacities",
           "check_prompts", "check_sampling_values", "compiled_programs", "continuation_capacities", "left_pad",
           "sample"]


def compiled_programs() -> int:
    """How many programs the sampler's jitted functions hold (jax's own count of compiled signatures)."""
    return sum(f._cache_size() for f in (*decode.JITS, *continuation.JITS))


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
    shards = batch_shards(partitioner)
    if rows % shards:
        raise ValueError(f"batch of {prompt_tokens.shape[0]} prompts x group_size {sampling.group_size} = {rows} "
                         f"rows does not divide over {shards} batch shards of {partitioner}")
    budget = prompt_budgets(max_new_tokens, prompt_tokens.shape[0], sampling.max_new_tokens)
    key_ids = row_key_ids(row_ids, rows)
    # Only the un-repeated prompts need to divide; the repeat happens inside the jit.
    prompt_tokens, prompt_mask, budget, key_ids = place_batch(partitioner, shards, prompt_tokens, prompt_mask, budget,
                                                         key_ids)
    graphdef = graphdef if isinstance(graphdef, Static) else Static(graphdef)  # a Sampler's is hashed already
    return decode.sample_jit(graphdef, params, prompt_tokens, prompt_mask, budget, key_ids, rng, config=config,
                       sampling=sampling, partitioner=partitioner)


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
        self._graphdef = Static(graphdef)
        self.min_length_bucket = min_length_bucket
        self.length_buckets = tuple(length_buckets) if length_buckets else None
        self.compact = compact
        self.compiled_shapes: set[tuple[int, int]] = set()
        self.phases: list[tuple[int, int]] = []  # (batch, cache slots) of each decode phase of the last call

    def bucket_batch(self, b: int) -> int:
        """Power of two ``>= b``, rounded up to a multiple of the batch shards."""
        shards = batch_shards(self.partitioner if self.partitioner is not None else active_partitioner())
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
        budget[:B] = prompt_budgets(max_new_tokens, B, s.max_new_tokens)
        budget[B:] = budget[0]
        rows = B * s.group_size
        key_ids = self._padded_key_ids(row_ids, rows, Bb * s.group_size)
        if not self.compact:
            out = sample(self._graphdef, params, self.config, tokens, mask, rng, s, self.partitioner, budget,
                         key_ids)
            return out[:rows] if Bb != B else out
        part = self.partitioner if self.partitioner is not None else active_partitioner()
        shards = batch_shards(part)
        tokens, mask, budget, key_ids = place_batch(part, shards, tokens, mask, budget, key_ids)
        statics = self._statics(part)
        caps = cache_capacities(Pb, s.max_new_tokens, s.cache_block)
        st, out = decode.start_jit(params=params, prompt_tokens=tokens, prompt_mask=mask, budget=budget,
                                   key_ids=key_ids, rng=rng, capacity=caps[0], **statics)
        fused = self._fused(params, part)
        cap, self.phases = 0, []
        while True:
            b = st.done.shape[0]
            floor = ladder_below(shards, b)
            self.phases.append((b, caps[cap]))
            st, info = decode.phase_jit(params=params, fused=fused, st=st, rng=rng, min_live=np.int32(floor), **statics)
            # Replicated: each host reads its own copy (no gather of a global array).
            live, step, index = (int(v) for v in np.asarray(info.addressable_data(0)))
            if live == 0 or step >= s.max_new_tokens:
                break
            if index >= caps[cap]:
                cap += 1
            batch = ladder(shards, live) if live <= floor else b
            st, out = decode.regroup_jit(st, out, config=self.config, partitioner=part, batch=batch, capacity=caps[cap])
        return decode.finish_jit(st, out, partitioner=part, rows=rows)

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
        budget[:B] = prompt_budgets(max_new_tokens, B, s.max_new_tokens, low=0)
        part, shards = self._part_shards()
        key_ids = self._padded_key_ids(row_ids, B * s.group_size, Bb * s.group_size)
        tokens, mask, budget, key_ids = place_batch(part, shards, tokens, mask, budget, key_ids)
        caps = continuation_capacities(0, Pb, s.max_new_tokens, s.cache_block)
        st = continuation.open_jit(params=params, prompt_tokens=tokens, prompt_mask=mask, budget=budget,
                                   key_ids=key_ids, rng=rng, capacity=caps[0], **self._statics(part))
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
        budget[:R] = prompt_budgets(max_new_tokens, R, s.max_new_tokens, low=0)
        part, shards = self._part_shards()
        key_ids = self._padded_key_ids(row_ids, R, Bb)
        tokens, mask, budget, key_ids = place_batch(part, shards, tokens, mask, budget, key_ids)
        start = state.index + Cb
        caps = continuation_capacities(state.slots, start, s.max_new_tokens, s.cache_block)
        st = continuation.extend_jit(params=params, carry=state.carry, new_tokens=tokens, new_mask=mask, budget=budget,
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
        return np.concatenate([row_key_ids(row_ids, rows), np.arange(rows, padded, dtype=np.int32)]).astype(np.int32)

    def _part_shards(self):
        part = self.partitioner if self.partitioner is not None else active_partitioner()
        return part, batch_shards(part)

    def _statics(self, part) -> dict:
        return dict(graphdef=self._graphdef, config=self.config, sampling=self.sampling, partitioner=part)

    def _fused(self, params, part):
        """The stacked projection kernels for this call's decode phases, made once (not once per phase)."""
        if not self.sampling.fuse_projections:
            return None
        return decode.fuse_jit(self._graphdef, params, partitioner=part)

    def _decode(self, params, st: Rows, rng, caps: list[int], start: int, rows: int, part
                ) -> tuple[SampleOutput, Continuation]:
        """Decode phases over ``caps`` (host-driven, no compaction), then the outputs and the next state."""
        statics, N = self._statics(part), self.sampling.max_new_tokens
        fused = self._fused(params, part)
        k, self.phases = 0, []
        while True:
            self.phases.append((st.done.shape[0], caps[k]))
            st, info = decode.phase_jit(params=params, fused=fused, st=st, rng=rng, min_live=np.int32(0), **statics)
            # Replicated: each host reads its own copy (no gather of a global array).
            live, step, index = (int(v) for v in np.asarray(info.addressable_data(0)))
            if live == 0 or step >= N:
                break
            k += 1  # the loop left early only because the cache is full: grow it
            st = continuation.grow_jit(st, config=self.config, partitioner=part, capacity=caps[k])
        out, carry = continuation.settle_jit(st, np.int32(start), config=self.config, partitioner=part, rows=rows)
        return out, Continuation(carry=carry, index=index, rows=rows)

    def sample_ids(self, params: dict, prompts: Sequence[Sequence[int]], rng: jax.Array,
                   max_new_tokens=None) -> SampleOutput:
        """Like ``__call__`` for a list of unpadded prompt id lists."""
        tokens, mask = left_pad(prompts, pad_token_id=self.sampling.pad_token_id)
        return self(params, tokens, mask, rng, max_new_tokens)
