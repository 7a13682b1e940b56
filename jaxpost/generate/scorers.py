"""Reward sources for online runs: Python reward functions, a trained reward model, or both, summed.

A run's :class:`Scorer` is a weighted sum of :class:`RewardTerm` s (one
per reward function, one for a reward model). Each term is called once per
rollout as ``term.score(rollout) -> float32 [B]``; with several processes,
a term not ``on_devices`` sees only this process's rows of the rollout (see
:mod:`jaxpost.generate.rollout`), where ``rollout`` is a
:class:`jaxpost.generate.rollout.Rollout` (token arrays of prompt +
completion, decoded completion texts, the prompts and the raw source rows,
one entry per completion). A plain callable ``scorer(rollout) -> [B]``
also works as a scorer of one term.

Reward functions follow TRL's convention::

    fn(prompts: list, completions: list[str], **columns) -> Sequence[float]

where ``columns`` holds every field of the source rows as a list aligned
with ``completions`` (e.g. ``answer=[...]`` for a reference answer).
"""

from __future__ import annotations

import dataclasses
import functools
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


@dataclasses.dataclass(frozen=True)
class RewardTerm:
    """One reward source of a run: ``score(rollout) -> [b]`` unweighted values, scaled by ``weight`` in the sum.

    ``on_devices``: ``score`` takes the global batch in one call on the
    mesh (a reward model); otherwise each process calls it on its own rows
    (a Python function). ``name`` labels its metrics (``rewards/<name>/mean``).
    """

    name: str
    weight: float
    score: Callable[[Any], Any]
    on_devices: bool = False


class Scorer:
    """The sum of a run's reward terms: ``score_b = sum_k weight_k * term_k(rollout)[b]``.

    :class:`~jaxpost.generate.rollout.Roller` scores each term where it
    runs (the mesh, or each process's rows), sums them and logs each
    (``rewards/<name>/mean`` and ``/std``, as TRL logs each reward
    function). Called directly, every term sees the rollout as given.
    """

    def __init__(self, terms: Sequence[RewardTerm]):
        self.terms = tuple(terms)

    def __call__(self, rollout) -> np.ndarray:
        total = np.zeros(len(rollout.completions), np.float32)
        for term in self.terms:
            total += np.float32(term.weight) * np.asarray(term.score(rollout), np.float32)
        return total


def function_terms(functions: Callable | str | Sequence[Callable | str], weights: Sequence[float] | None = None
                   ) -> list[RewardTerm]:
    """One :class:`RewardTerm` per reward function, named for its metrics.

    A string is a reward name or a ``'module:function'`` /
    ``'path/to/file.py:function'`` plug-in spec. A
    :func:`~jaxpost.generate.rewards.make_reward` function counts as its
    parts (each name its own term, weight ``weights[k] * its weight``), so
    ``make_reward.names = ['format', 'exact_match']`` logs both.
    """
    functions = list(functions) if isinstance(functions, (list, tuple)) else [functions]
    weights = [1.0] * len(functions) if weights is None else [float(w) for w in weights]
    if len(weights) != len(functions):
        raise UserError(f"{len(weights)} reward weights for {len(functions)} reward functions")
    parts = []
    for fn, w in zip(functions, weights):
        if isinstance(fn, str):
            parts.append((fn, get_reward(fn), w))
        else:
            parts += [(n, f, w * v) for n, f, v in getattr(fn, "reward_parts", [(_label(fn), fn, 1.0)])]
    terms, seen = [], {}
    for name, fn, w in parts:
        label = str(name).rsplit(":", 1)[-1]  # a spec 'my_rewards:exact' logs as 'exact', as TRL names it
        seen[label] = seen.get(label, 0) + 1
        label = label if seen[label] == 1 else f"{label}_{seen[label]}"
        terms.append(RewardTerm(label, w, functools.partial(_call, str(name), fn)))
    return terms


def _label(fn) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def _call(name: str, fn: Callable, rollout) -> np.ndarray:
    rows = rollout.rows
    keys = sorted({k for r in rows if r for k in r})
    columns = {k: [(r or {}).get(k) for r in rows] for k in keys if k not in ("prompts", "completions")}
    return call_reward(name, fn, list(rollout.prompts), list(rollout.completions), columns)


class FunctionScorer(Scorer):
    """Scores completions with Python reward functions, summed with ``weights``.

    ``score_b = sum_k weights[k] * fn_k(prompts, completions, **columns)[b]``.
    Each function's output is checked by :func:`~jaxpost.generate.rewards.call_reward`
    (one finite float per completion, else an error naming the function).
    Its terms are :func:`function_terms`.
    """

    def __init__(self, functions: Callable | str | Sequence[Callable | str], weights: Sequence[float] | None = None):
        terms = function_terms(functions, weights)
        if not terms:
            raise UserError(f"FunctionScorer needs at least one reward function, got {functions!r} (a make_reward() "
                            "with make_reward.names = [] has none)")
        super().__init__(terms)


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
        # The instance itself scores, so that its __call__ is looked up at each call.
        self.terms = (RewardTerm("reward_model", 1.0, self, on_devices=True),)

    def __call__(self, rollout) -> np.ndarray:
        b = rollout.batch
        with self.partitioner.activate():
            out = self._score(self.params, b["tokens"], b["positions"], b["segment_ids"])
        return np.asarray(to_host(out), np.float32)


NEED_SOURCE = ("give a reward source: make_scorer.reward_model (a reward model directory), "
               "make_scorer.reward_functions (Python reward functions; the grpo and rloo run files take their "
               "names in make_reward.names), or both (their scores are summed)")


def _scores_with_functions(functions: Any, names: Any) -> bool:
    """Whether bound ``make_scorer.reward_functions`` give a term: anything but ``[@make_reward()]`` with no names."""
    if functions is None:
        return False
    listed = list(functions) if isinstance(functions, (list, tuple)) else [functions]
    empty = isinstance(names, (list, tuple)) and not names
    is_make_reward = lambda f: getattr(getattr(f, "configurable", None), "name", None) == "make_reward"
    return any(not (empty and is_make_reward(f)) for f in listed)


def check_bound_scorer(owner: str) -> None:
    """Checks the gin-bound reward source now, before a run loads anything; :func:`make_scorer` uses it later.

    ``make_scorer.reward_model``, ``make_scorer.reward_functions`` (not
    just a ``make_reward()`` with ``make_reward.names = []``) or both must
    be bound, a reward model's directory (or Hub name) must be found, and
    each reward named by a string (in ``reward_functions`` or
    ``make_reward.names``) must resolve, its ``module:function`` spec
    imported. Raises :class:`UserError` naming the key; without this, each
    was found only once the policy had loaded and the run directory was made.
    """
    reward_model, functions = bound_value("make_scorer.reward_model"), bound_value("make_scorer.reward_functions")
    names = bound_value("make_reward.names")
    if reward_model is None and not _scores_with_functions(functions, names):
        raise UserError(f"{owner} scores its samples, so {NEED_SOURCE}; got neither")
    if isinstance(reward_model, (str, os.PathLike)):  # a macro or reference is resolved when make_scorer runs
        resolve_model_dir(reward_model, key="make_scorer.reward_model")
    if functions is None:  # make_reward, if bound at all, is not called
        return
    for name in [*(functions if isinstance(functions, (list, tuple)) else []),
                 *([names] if isinstance(names, str) else names if isinstance(names, (list, tuple)) else [])]:
        if isinstance(name, str):
            get_reward(name)  # imports a spec: an error names it


@gin.configurable
def make_scorer(partitioner: Partitioner, reward_functions: Any = None, reward_weights: Sequence[float] | None = None,
                reward_model: str | None = None, reward_model_weight: float = 1.0,
                policy_vocab_size: int | None = None) -> Scorer:
    """The run's reward: ``reward_model`` (a directory), ``reward_functions`` (callables), or both, summed.

    ``score = reward_model_weight * RM(x) + sum_k reward_weights[k] * fn_k(x)``
    (TRL's GRPO mixes reward models and functions the same way). Gin binds
    them (``make_scorer.reward_model = 'runs/rm/final'``,
    ``make_scorer.reward_functions = [@my_reward]``). A string among
    ``reward_functions`` is a registered reward name or a plug-in spec,
    ``'my_rewards:exact'`` or ``'path/to/file.py:exact'`` (see
    :mod:`jaxpost.generate.rewards`); a ``make_reward()`` with no names
    adds nothing. Raises :class:`UserError` when no term is left.
    """
    terms = []
    if reward_model is not None:
        rm = RewardModelScorer(reward_model, partitioner, policy_vocab_size)
        terms.append(dataclasses.replace(rm.terms[0], weight=float(reward_model_weight)))
    if reward_functions is not None:
        terms += function_terms(reward_functions, reward_weights)
    if not terms:
        raise UserError(f"make_scorer: {NEED_SOURCE}")
    return Scorer(terms)
