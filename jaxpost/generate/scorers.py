"""Reward sources for online runs: a Python reward function or a trained reward model.

A scorer is called once per rollout as ``scorer(rollout) -> float32 [B]``
(with several processes, a scorer without ``on_devices = True`` sees only
this process's rows of the rollout; see :mod:`jaxpost.generate.rollout`)
where ``rollout`` is a :class:`jaxpost.generate.rollout.Rollout` (token
arrays of prompt + completion, decoded completion texts, the prompts and
the raw source rows, one entry per completion).

Reward functions follow TRL's convention::

    fn(prompts: list, completions: list[str], **columns) -> Sequence[float]

where ``columns`` holds every field of the source rows as a list aligned
with ``completions`` (e.g. ``answer=[...]`` for a reference answer).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import gin
import jax
import numpy as np

from jaxpost.config import bound_value
from jaxpost.distributed import to_host
from jaxpost.errors import UserError
from jaxpost.generate.rewards import call_reward, get_reward
from jaxpost.hub import resolve_model_dir
from jaxpost.losses.reward import gather_last
from jaxpost.models import forward
from jaxpost.models.heads import scores as score_head
from jaxpost.models.load import load_model
from jaxpost.sharding import Partitioner


class FunctionScorer:
    """Scores completions with Python reward functions, summed with ``weights``.

    ``score_b = sum_k weights[k] * fn_k(prompts, completions, **columns)[b]``.
    Each function's output is checked by :func:`~jaxpost.generate.rewards.call_reward`
    (one finite float per completion, else an error naming the function).
    """

    def __init__(self, functions: Callable | str | Sequence[Callable | str], weights: Sequence[float] | None = None):
        self.functions = list(functions) if isinstance(functions, (list, tuple)) else [functions]
        # A string is a reward name or a 'module:function' / 'path/to/file.py:function' plug-in spec.
        self.functions = [get_reward(f) if isinstance(f, str) else f for f in self.functions]
        if not self.functions:
            raise ValueError("FunctionScorer needs at least one reward function")
        self.weights = [1.0] * len(self.functions) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(self.functions):
            raise ValueError(f"{len(self.weights)} reward weights for {len(self.functions)} reward functions")

    def __call__(self, rollout) -> np.ndarray:
        rows = rollout.rows
        keys = sorted({k for r in rows if r for k in r})
        columns = {k: [(r or {}).get(k) for r in rows] for k in keys if k not in ("prompts", "completions")}
        total = np.zeros(len(rollout.completions), np.float32)
        for fn, w in zip(self.functions, self.weights):
            name = getattr(fn, "__name__", repr(fn))
            total += w * call_reward(name, fn, list(rollout.prompts), list(rollout.completions), columns)
        return total


class RewardModelScorer:
    """Scores prompt + completion with a ``head="score"`` model: the value at the last real token.

    ``model_dir`` is a Hugging Face ``*ForSequenceClassification`` directory
    (what :func:`jaxpost.recipes.reward.reward_model` exports). The reward
    model must share the policy's tokenizer: it reads the rollout's token
    ids as they are.
    """

    on_devices = True  # one forward over the global batch, on the whole mesh

    def __init__(self, model_dir: str, partitioner: Partitioner, policy_vocab_size: int | None = None,
                 key: str = "make_scorer.reward_model"):
        # ``key``: the binding that named the directory, for the messages (an unknown path, another vocabulary).
        model_dir = resolve_model_dir(model_dir, key=key)
        config, graphdef, params = load_model(None, model_dir, partitioner, head="score")
        if policy_vocab_size is not None and config.vocab_size < policy_vocab_size:
            raise UserError(f"{key}: the reward model {model_dir} has vocab_size {config.vocab_size} < the "
                            f"policy's {policy_vocab_size}; it must use the policy's tokenizer")
        self.config, self.params, self.partitioner = config, params, partitioner

        @jax.jit
        def score(params, tokens, positions, segment_ids):
            hidden, _ = forward(graphdef, params, tokens, positions, segment_ids)
            return gather_last(score_head(params, hidden), segment_ids)

        self._score = score

    def __call__(self, rollout) -> np.ndarray:
        b = rollout.batch
        with self.partitioner.activate():
            out = self._score(self.params, b["tokens"], b["positions"], b["segment_ids"])
        return np.asarray(to_host(out), np.float32)


ONE_SOURCE = ("give exactly one reward source: make_scorer.reward_model (a reward model directory) or "
              "make_scorer.reward_functions (Python reward functions)")


def check_bound_scorer(owner: str) -> None:
    """Checks the gin-bound reward source now, before a run loads anything; :func:`make_scorer` uses it later.

    Exactly one of ``make_scorer.reward_model`` and ``make_scorer.reward_functions``
    must be bound, a reward model's directory (or Hub name) must be found,
    and each reward named by a string (in ``reward_functions`` or
    ``make_reward.names``) must resolve, its ``module:function`` spec
    imported. Raises :class:`UserError` naming the key; without this, each
    was found only once the policy had loaded and the run directory was made.
    """
    reward_model, functions = bound_value("make_scorer.reward_model"), bound_value("make_scorer.reward_functions")
    if (reward_model is None) == (functions is None):
        got = "neither" if functions is None else "both"
        raise UserError(f"{owner} scores its samples, so {ONE_SOURCE}; got {got}")
    if isinstance(reward_model, (str, os.PathLike)):  # a macro or reference is resolved when make_scorer runs
        resolve_model_dir(reward_model, key="make_scorer.reward_model")
    if functions is None:  # a reward model scores: make_reward, if bound at all, is not called
        return
    names = bound_value("make_reward.names")
    for name in [*(functions if isinstance(functions, (list, tuple)) else []),
                 *([names] if isinstance(names, str) else names if isinstance(names, (list, tuple)) else [])]:
        if isinstance(name, str):
            get_reward(name)  # imports a spec: an error names it


@gin.configurable
def make_scorer(partitioner: Partitioner, reward_functions: Any = None, reward_weights: Sequence[float] | None = None,
                reward_model: str | None = None, policy_vocab_size: int | None = None):
    """The run's reward source: ``reward_model`` (a directory) or ``reward_functions`` (callables).

    Exactly one must be given; gin binds them (``make_scorer.reward_model =
    'runs/rm/final'`` or ``make_scorer.reward_functions = [@my_reward]``).
    A string among ``reward_functions`` is a registered reward name or a
    plug-in spec, ``'my_rewards:exact'`` or ``'path/to/file.py:exact'``
    (see :mod:`jaxpost.generate.rewards`).
    """
    if (reward_model is None) == (reward_functions is None):
        raise UserError(f"make_scorer: {ONE_SOURCE}")
    if reward_model is not None:
        return RewardModelScorer(reward_model, partitioner, policy_vocab_size)
    return FunctionScorer(reward_functions, reward_weights)
