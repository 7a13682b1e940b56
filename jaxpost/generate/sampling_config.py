"""What the one sampler is asked for and what it returns: :class:`SamplingConfig` and :class:`SampleOutput`.

Kept apart from :mod:`jaxpost.generate.sampler` so that its compiled
programs (:mod:`jaxpost.generate.decode`, :mod:`jaxpost.generate.continuation`)
and its users can name both without importing the sampler.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import gin
import jax
from flax import struct

from jaxpost.errors import UserError, require


def check_sampling_values(config: Any) -> None:
    """Raises :class:`~jaxpost.errors.UserError` naming ``<config's class>.<field>`` for an out-of-range value.

    Checks ``max_new_tokens >= 1``, ``temperature >= 0``, ``top_k >= 0``,
    ``0 < top_p <= 1``, ``0 <= min_p <= 1``, ``repetition_penalty > 0`` and ``group_size >= 1`` of any
    config holding them
    (:class:`SamplingConfig`, and :class:`~jaxpost.generate.rollout.RolloutConfig`,
    whose values a rollout's sampler takes), so the message names the key
    the user bound.
    """
    c, name = config, type(config).__name__
    require(f"{name}.max_new_tokens", c.max_new_tokens, c.max_new_tokens >= 1, ">= 1")
    require(f"{name}.temperature", c.temperature, c.temperature >= 0, ">= 0 (0 = greedy)")
    require(f"{name}.top_k", c.top_k, c.top_k >= 0, ">= 0 (0 = off)")
    require(f"{name}.top_p", c.top_p, 0.0 < c.top_p <= 1.0, "in (0, 1] (1 = off)")
    require(f"{name}.min_p", c.min_p, 0.0 <= c.min_p <= 1.0, "in [0, 1] (0 = off)")
    require(f"{name}.repetition_penalty", c.repetition_penalty, c.repetition_penalty > 0,
            "> 0 (1 = off; above 1 discourages repeats)")
    require(f"{name}.group_size", c.group_size, c.group_size >= 1, ">= 1")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample.

    ``temperature == 0`` is greedy (argmax; ``top_k``/``top_p``/``min_p`` are then
    irrelevant). ``top_k == 0``, ``top_p == 1.0`` and ``min_p == 0`` switch
    those filters off (:func:`~jaxpost.generate.processing.process_logits`:
    temperature, top-k, top-p, min-p, in Hugging Face's order).
    ``repetition_penalty`` (CTRL's, as in transformers and vLLM; 1 = off)
    scales the logits of every token already in the row -- its prompt, the
    earlier turns of a conversation, what it sampled -- before all of those,
    greedy included (:func:`~jaxpost.generate.processing.penalize_repetitions`).
    Like the filters it changes what is drawn, not ``logprobs``. A row stops
    after emitting any of ``stop_token_ids`` (the stop token is part of the
    completion); later slots hold ``pad_token_id``.
    ``group_size`` G repeats every prompt G times (GRPO/RLOO groups): output
    row ``b * G + g`` is sample ``g`` of prompt ``b``; the group shares one
    prefill of its prompt. ``cache_dtype`` is the KV cache's dtype (None:
    the model's compute dtype); ``"bfloat16"`` halves the cache of an fp32
    model. Rollouts re-measure log-probs with a training forward, so a
    lower-precision cache changes which tokens are drawn, not the losses'
    inputs. ``cache_block`` sizes the KV cache in phases
    (:func:`~jaxpost.generate.decode.cache_capacities`): decoding starts with ``cache_block * m``
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
    min_p: float = 0.0
    repetition_penalty: float = 1.0
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
      distribution actually sampled from (after the repetition penalty,
      temperature, top-k/top-p/min-p; 0
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
