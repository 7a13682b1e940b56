"""Optimizers and learning-rate schedules, gin-configurable.

:func:`make_optimizer` builds ``clip_by_global_norm -> {adamw|adafactor|lion}``
with a warmup + decay schedule, decoupled weight decay on a mask (no decay
for norms, biases and other 1-D parameters), and an optional trainable mask
that freezes parameters (frozen leaves get zero updates and no optimizer
state, which is what LoRA needs).

The returned transformation carries its schedule as ``.schedule`` so the
train step can log the learning rate of every update.
"""

from __future__ import annotations

from typing import Any, Callable

import gin
import jax
import jax.numpy as jnp
import optax

from jaxpost.config import checks_values_of
from jaxpost.errors import UserError, require

__all__ = ["Optimizer", "make_schedule", "make_optimizer", "check_optimizer_values", "default_decay_mask", "path_mask"]

Schedule = Callable[[jax.Array], jax.Array]
MaskLike = Any  # bool pytree matching params, or callable(params) -> bool pytree


class Optimizer(optax.GradientTransformationExtraArgs):
    """An optax ``GradientTransformationExtraArgs`` that also carries ``schedule``.

    It *is* a ``GradientTransformation`` (``isinstance`` holds, ``init``/``update``
    unchanged); ``schedule(count)`` is the learning rate applied at update
    number ``count`` (0-based, equal to ``TrainState.step`` before the update).
    """

    schedule: Schedule

    @classmethod
    def wrap(cls, tx: optax.GradientTransformation, schedule: Schedule) -> "Optimizer":
        out = cls(tx.init, tx.update)
        out.schedule = schedule  # NamedTuple subclasses without __slots__ have a __dict__
        return out


@gin.configurable
def make_schedule(learning_rate: float = 1e-5, schedule: str = "cosine", warmup_steps: int = 0,
                  total_steps: int = 1000, min_lr_ratio: float = 0.0) -> Schedule:
    """Warmup then decay, as a function of the 0-based update count ``t``.

    With ``peak = learning_rate``, ``W = warmup_steps``, ``T = total_steps``,
    ``end = min_lr_ratio * peak`` and ``p = clip((t - W) / max(T - W, 1), 0, 1)``:

    * ``t < W``: ``peak * t / W`` (linear warmup from 0);
    * ``cosine``: ``end + (peak - end) * (1 + cos(pi * p)) / 2``;
    * ``linear``: ``peak + (end - peak) * p``;
    * ``constant``: ``peak``.

    Built from optax's schedules: ``optax.join_schedules`` at ``W`` of
    ``optax.linear_schedule(0, peak, W)`` and the decay
    (``optax.cosine_decay_schedule(peak, max(T - W, 1), alpha=min_lr_ratio)``,
    ``optax.linear_schedule(peak, end, max(T - W, 1))`` or
    ``optax.constant_schedule(peak)``); with ``W = 0`` the decay alone.

    Raises:
      UserError (a ``ValueError``): for a value :func:`check_optimizer_values`
        refuses, or ``total_steps < 1``; the message names the
        ``make_optimizer`` key a run binds.
    """
    check_optimizer_values(learning_rate=learning_rate, schedule=schedule, warmup_steps=warmup_steps,
                           min_lr_ratio=min_lr_ratio)
    if total_steps < 1:
        raise UserError(f"the run's steps (make_optimizer.total_steps) must be >= 1, got {total_steps}")
    peak = float(learning_rate)
    decay_len = max(total_steps - warmup_steps, 1)
    if schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_len, alpha=float(min_lr_ratio))
    elif schedule == "linear":
        after = optax.linear_schedule(peak, float(min_lr_ratio) * peak, decay_len)
    else:
        after = optax.constant_schedule(peak)
    if warmup_steps == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps), after], [warmup_steps])


OPTIMIZERS = ("adamw", "adafactor", "lion")


@checks_values_of("make_optimizer")
def check_optimizer_values(name: str = "adamw", learning_rate: float = 1e-5, schedule: str = "cosine",
                           warmup_steps: int = 0, min_lr_ratio: float = 0.0, weight_decay: float = 0.0,
                           b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                           clip_norm: float | None = 1.0) -> None:
    """Raises :class:`~jaxpost.errors.UserError` naming the ``make_optimizer`` key of a value it cannot use.

    The parameters are :func:`make_optimizer`'s (defaults included). It
    runs when the optimizer is built and, on the bound values alone, when
    ``jaxpost train`` starts: a typo fails before the model loads.
    Valid: ``name`` in :data:`OPTIMIZERS`, ``schedule`` cosine, linear or
    constant, ``learning_rate``, ``warmup_steps``, ``weight_decay`` >= 0,
    ``0 <= min_lr_ratio <= 1``, ``0 <= b1, b2 < 1``, ``eps > 0``,
    ``clip_norm`` None, 0 (both off) or > 0.
    """
    if name not in OPTIMIZERS:
        raise UserError(f"make_optimizer.name={name!r} is unknown; choose 'adamw', 'adafactor' or 'lion'")
    if schedule not in ("cosine", "linear", "constant"):
        raise UserError(f"make_optimizer.schedule={schedule!r} is unknown; choose 'cosine', 'linear' or 'constant'")
    require("make_optimizer.learning_rate", learning_rate, learning_rate >= 0, ">= 0")  # < 0 climbs the loss
    require("make_optimizer.warmup_steps", warmup_steps, warmup_steps >= 0, ">= 0")
    require("make_optimizer.min_lr_ratio", min_lr_ratio, 0 <= min_lr_ratio <= 1, "in [0, 1]")
    require("make_optimizer.weight_decay", weight_decay, weight_decay >= 0, ">= 0")
    require("make_optimizer.b1", b1, 0 <= b1 < 1, "in [0, 1)")
    require("make_optimizer.b2", b2, 0 <= b2 < 1, "in [0, 1)")
    require("make_optimizer.eps", eps, eps > 0, "> 0")
    require("make_optimizer.clip_norm", clip_norm, clip_norm is None or clip_norm >= 0, "None or 0 (off), or > 0")


def _names(path) -> list[str]:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)).lower())
                break
    return out


def default_decay_mask(params: Any, decay_embeddings: bool = True) -> Any:
    """True where weight decay applies.

    Excluded (False): parameters with ``ndim < 2`` (norm scales, biases),
    any parameter with ``norm`` or ``bias`` in its key path, and, when
    ``decay_embeddings`` is False, any with ``embed`` in its key path.
    """
    def one(path, x):
        names = _names(path)
        if jnp.ndim(x) < 2 or any("norm" in n or "bias" in n for n in names):
            return False
        if not decay_embeddings and any("embed" in n for n in names):
            return False
        return True
    return jax.tree_util.tree_map_with_path(one, params)


def path_mask(mask_tree: Any) -> Callable[[Any], Any]:
    """Turn a bool tree over the full params into a mask *function*.

    The function looks each leaf up by key path, so it also works on the
    reduced trees optax passes to inner transformations (where frozen leaves
    are replaced by empty ``MaskedNode``s).
    """
    table = {jax.tree_util.keystr(p): bool(v) for p, v in jax.tree_util.tree_flatten_with_path(mask_tree)[0]}

    def fn(params):
        def one(path, _):
            key = jax.tree_util.keystr(path)
            if key not in table:
                raise KeyError(f"Mask has no entry for parameter {key}")
            return table[key]
        return jax.tree_util.tree_map_with_path(one, params)
    return fn


def _as_fn(mask: MaskLike) -> Callable[[Any], Any]:
    return mask if callable(mask) else path_mask(mask)


@gin.configurable
def make_optimizer(name: str = "adamw", learning_rate: float = 1e-5, schedule: str = "cosine",
                   warmup_steps: int = 0, total_steps: int = 1000, min_lr_ratio: float = 0.0,
                   weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   clip_norm: float | None = 1.0, decay_mask: MaskLike | None = None,
                   decay_embeddings: bool = True, trainable_mask: MaskLike | None = None) -> Optimizer:
    """``clip_by_global_norm(clip_norm) -> optimizer(lr=schedule, decoupled weight decay on decay_mask)``.

    Args:
      name: ``adamw`` (``b1, b2, eps``), ``lion`` (``b1, b2``; ``eps`` unused) or
        ``adafactor`` (optax defaults: factored second moments, parameter-scale
        relative steps off; ``b1``/``b2``/``eps`` unused).
      learning_rate, schedule, warmup_steps, total_steps, min_lr_ratio: see
        :func:`make_schedule`.
      weight_decay: decoupled decay ``p <- p - lr * weight_decay * p`` on the
        leaves where ``decay_mask`` is True.
      clip_norm: global-norm clip over the trainable gradients (None = off).
      decay_mask: bool tree or ``callable(params) -> bool tree``; default
        :func:`default_decay_mask` (with ``decay_embeddings``).
      trainable_mask: bool tree or callable; False leaves are frozen: their
        update is exactly zero and they carry no optimizer state
        (``optax.multi_transform`` with ``set_to_zero``). Clipping sees only
        trainable gradients.
    """
    check_optimizer_values(name, learning_rate, schedule, warmup_steps, min_lr_ratio, weight_decay, b1, b2, eps,
                           clip_norm)
    sched = make_schedule(learning_rate, schedule, warmup_steps, total_steps, min_lr_ratio)
    mask_fn = _as_fn(decay_mask) if decay_mask is not None else (
        lambda p: default_decay_mask(p, decay_embeddings))
    if name == "adamw":
        core = optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask_fn)
    elif name == "lion":
        core = optax.lion(sched, b1=b1, b2=b2, weight_decay=weight_decay, mask=mask_fn)
    elif name == "adafactor":
        # multiply_by_parameter_scale=False keeps lr an absolute step size, as for the other optimizers.
        core = optax.adafactor(sched, multiply_by_parameter_scale=False,
                               weight_decay_rate=weight_decay or None, weight_decay_mask=mask_fn)
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), core) if clip_norm else core
    if trainable_mask is not None:
        train_fn = _as_fn(trainable_mask)
        labels = lambda p: jax.tree.map(lambda t: "train" if t else "frozen", train_fn(p))
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return Optimizer.wrap(tx, sched)
