"""Python reward functions for online RL (GRPO/RLOO/PPO) and filtering, selected by name.

Contract of a reward function::

    fn(prompts: list[str], completions: list[str], **row_fields) -> list[float]

One call scores a batch. ``prompts[i]`` and ``completions[i]`` are the
decoded prompt and completion of sample ``i``; every other column of the
prompt dataset arrives as a keyword argument holding a list aligned with
``completions`` (e.g. ``answer=[...]``), so a prompt sampled G times has its
fields repeated G times. Functions take ``**_`` and ignore fields they do not
use; a field they need but do not get raises ``KeyError`` naming it. The
result has one finite float per completion; runs check it
(:func:`call_reward`: a breach is a one-line error naming the reward). They
are called by keyword, as TRL calls its reward functions.

Register with ``@register_reward("name")``; pick by name with
:func:`get_reward` or, in gin, ``make_reward.names = ["arithmetic", "format"]``
(a weighted sum of several rewards).

Your own reward function plugs in without touching jaxpost: wherever a
reward name goes, ``module:function`` (a module in the current directory or
on ``sys.path``) or ``path/to/file.py:function`` (relative to the current
directory) names it directly::

    jaxpost train --gin_file=configs/runs/grpo.gin ... --gin.make_reward.names="['my_rewards:exact']"

or ``jaxpost train --import my_rewards`` (or ``import my_rewards`` at the top
of a gin file) imports a module whose ``@register_reward("mine")`` makes
``"mine"`` a name. A spec that does not resolve is a
:class:`jaxpost.errors.UserError` naming it.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Sequence

import gin
import numpy as np

from jaxpost.config import checks_values_of, import_object
from jaxpost.errors import UserError

RewardFn = Callable[..., list[float]]
REWARDS: dict[str, RewardFn] = {}

_INT = re.compile(r"[-+]?\d+")


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator adding ``fn`` to :data:`REWARDS` under ``name`` (a duplicate name raises)."""
    def add(fn: RewardFn) -> RewardFn:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered ({REWARDS[name].__module__}."
                             f"{REWARDS[name].__name__})")
        REWARDS[name] = fn
        return fn
    return add


class UnknownRewardError(UserError, KeyError):
    """A reward name that is neither registered nor a ``module:function`` spec (a ``KeyError`` as before)."""

    __str__ = UserError.__str__  # KeyError's would print the message in quotes


def get_reward(name: str) -> RewardFn:
    """The reward function ``name``: a registered name, ``module:function`` or ``path/to/file.py:function``.

    A spec is imported (:func:`jaxpost.config.import_object`) and must name
    a callable. An unknown name raises :class:`UnknownRewardError` listing
    the registered names; a spec that does not import or names no callable
    raises :class:`jaxpost.errors.UserError` naming it.
    """
    if name in REWARDS:
        return REWARDS[name]
    if isinstance(name, str) and ":" in name:
        fn = import_object(name, "reward")
        if not callable(fn):
            raise UserError(f"reward {name!r} is a {type(fn).__name__}, not a function "
                            f"fn(prompts, completions, **row_fields) -> list[float]")
        return fn
    raise UnknownRewardError(f"unknown reward {name!r}; registered: {sorted(REWARDS)}; or name your own function as "
                             f"'module:function' or 'path/to/file.py:function'")


def _field(fields: dict, name: str, n: int, reward: str) -> list:
    if name not in fields:
        raise KeyError(f"reward {reward!r} needs the row field {name!r}; got fields {sorted(fields)}")
    values = list(fields[name])
    if len(values) != n:
        raise ValueError(f"reward {reward!r}: field {name!r} has {len(values)} values for {n} completions")
    return values


def first_integer(text: str) -> int | None:
    """The first (optionally signed) integer written in ``text``, or None. ``"x = -12."`` -> -12."""
    m = _INT.search(text)
    return int(m.group()) if m else None


def _normalise(text) -> str:
    return " ".join(str(text).split()).lower()


@register_reward("exact_match")
def exact_match(prompts: list[str], completions: list[str], answer: Sequence | None = None, **fields
                ) -> list[float]:
    """1.0 where the completion equals the row's ``answer`` (case and whitespace folded), else 0.0."""
    answers = _field({"answer": answer} if answer is not None else fields, "answer", len(completions),
                     "exact_match")
    return [float(_normalise(c) == _normalise(a)) for c, a in zip(completions, answers)]


@register_reward("arithmetic")
def arithmetic(prompts: list[str], completions: list[str], answer: Sequence | None = None, **fields
               ) -> list[float]:
    """1.0 where the completion's first integer equals the row's integer ``answer``, else 0.0.

    The toy task of the demo ("12+7=" -> "19"); a completion with no
    integer scores 0.
    """
    answers = _field({"answer": answer} if answer is not None else fields, "answer", len(completions),
                     "arithmetic")
    out = []
    for i, (c, a) in enumerate(zip(completions, answers)):
        try:
            want = int(a)
        except (TypeError, ValueError):
            raise ValueError(f"reward 'arithmetic': answer {a!r} of completion {i} is not an integer") from None
        got = first_integer(c)
        out.append(float(got is not None and got == want))
    return out


@gin.configurable
def format_reward(prompts: list[str], completions: list[str], pattern: str = r"^\s*[-+]?\d+\s*$", **_
                  ) -> list[float]:
    """1.0 where the whole completion matches the regex ``pattern`` (``re.fullmatch``), else 0.0.

    The default pattern accepts a bare integer (optionally surrounded by
    whitespace): the answer format of the arithmetic task.
    """
    rx = re.compile(pattern, re.DOTALL)
    return [float(rx.fullmatch(c) is not None) for c in completions]


register_reward("format")(format_reward)


@gin.configurable
def length_reward(prompts: list[str], completions: list[str], target_chars: int = 64, **_) -> list[float]:
    """``-|len(completion) - target_chars| / target_chars``: 0 at the target length, negative away from it."""
    if target_chars <= 0:
        raise ValueError(f"length_reward: target_chars must be > 0, got {target_chars}")
    return [-abs(len(c) - target_chars) / target_chars for c in completions]


register_reward("length")(length_reward)


def call_reward(name: str, fn: RewardFn, prompts: list[str], completions: list[str], fields: dict) -> np.ndarray:
    """``fn(prompts=..., completions=..., **fields)`` as float32 ``[len(completions)]``, checked against the contract.

    One finite number per completion, or a :class:`~jaxpost.errors.UserError`
    naming reward ``name``, what it returned and for which completion (a
    string such as ``"1"`` is refused, not parsed). An exception raised by
    ``fn`` itself propagates with a note naming the reward and the fields it
    was given, so its traceback points at the user's line.
    """
    try:
        values = fn(prompts=prompts, completions=completions, **fields)  # by keyword, as TRL calls them
    except Exception as e:
        if not any(n.startswith("(raised by reward") for n in getattr(e, "__notes__", ())):  # the innermost says it
            e.add_note(f"(raised by reward {name!r}, called on {len(completions)} completions with the fields "
                       f"{['prompts', 'completions', *sorted(fields)]})")
        raise
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
        raise UserError(f"reward {name!r} returned {type(values).__name__} {_short(values)}; a reward returns a "
                        f"list of one float per completion")
    if len(values) != len(completions):
        raise UserError(f"reward {name!r} returned {len(values)} values for {len(completions)} completions; a "
                        f"reward returns one float per completion")
    out = np.empty(len(completions), np.float32)
    for i, v in enumerate(values):
        try:
            if isinstance(v, (str, bytes)) or v is None:
                raise TypeError
            out[i] = float(v)
        except (TypeError, ValueError):
            raise UserError(f"reward {name!r} returned {_short(v)} ({type(v).__name__}) for completion {i}; a "
                            f"reward is a float") from None
        if not math.isfinite(out[i]):
            raise UserError(f"reward {name!r} returned {out[i]} for completion {i} ({_short(completions[i])}); "
                            f"rewards must be finite")
    return out


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


@checks_values_of("make_reward")
def check_make_reward_values(names: str | Sequence[str] = ("arithmetic",), weights: Sequence[float] | None = None
                             ) -> None:
    """Raises :class:`UserError` naming the ``make_reward`` key of a value it cannot use.

    Runs when ``jaxpost train`` starts, on the bound values, and when
    :func:`make_reward` is called. Each name must be registered
    (:data:`REWARDS`) or look like a ``module:function`` spec; a spec is
    imported only when the run starts (:func:`jaxpost.generate.scorers.check_bound_scorer`),
    since ``jaxpost plan`` runs these checks where the module may not be.
    ``weights``: None or one per name. An empty list passes (a run scored
    by a reward model alone binds it so); a reward built from it refuses to
    be called.
    """
    listed = [names] if isinstance(names, str) else list(names)
    for name in listed:
        if not (isinstance(name, str) and (name in REWARDS or ":" in name)):
            try:
                get_reward(name)
            except UnknownRewardError as e:  # it lists the registered names
                raise UnknownRewardError(f"make_reward.names: {e}") from None
    if weights is not None and len(weights := list(weights)) != len(listed):
        raise UserError(f"make_reward.weights has {len(weights)} values for the {len(listed)} rewards of "
                        f"make_reward.names {listed}; give one weight per name, or None for all 1")


@gin.configurable
def make_reward(names: str | Sequence[str] = ("arithmetic",), weights: Sequence[float] | None = None
                ) -> RewardFn:
    """A reward function ``sum_k weights[k] * REWARDS[names[k]](...)`` (weights default to 1).

    The result obeys the same contract; each term is checked to return one
    finite float per completion, with an error naming the reward. Its
    ``reward_parts`` lists ``(name, function, weight)`` per term, so that a
    run can log each reward on its own
    (:class:`~jaxpost.generate.scorers.FunctionScorer`). With no names
    (``[]``: a run whose gin file binds them scores with a reward model
    instead) it has no parts, and calling it raises :class:`UserError`.
    """
    check_make_reward_values(names, weights)
    names = [names] if isinstance(names, str) else list(names)
    fns = [get_reward(n) for n in names]
    weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]

    def combined(prompts: list[str], completions: list[str], **row_fields) -> list[float]:
        if not names:
            raise UserError("make_reward.names is []: name at least one reward (a registered name such as "
                            "'exact_match', or 'module:function')")
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        total = [0.0] * len(completions)
        for name, fn, w in zip(names, fns, weights):
            values = call_reward(name, fn, prompts, completions, row_fields)
            total = [t + w * float(v) for t, v in zip(total, values)]
        return total

    combined.__name__ = "+".join(str(n) for n in names) or "no_reward"
    combined.reward_parts = tuple(zip(names, fns, weights))
    return combined
