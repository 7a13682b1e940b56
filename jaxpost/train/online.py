"""Online runs (PPO, GRPO/RLOO, online DPO, on-policy distillation): the offline loop fed by rollouts.

An online run is the offline :func:`jaxpost.train.fit` with one difference:
its batches come from :class:`RolloutBatches`, which samples a rollout with
the *current* policy whenever the previous rollout's minibatches are used
up. So the NaN guard, logging, checkpoints, resume and the run directory
behave exactly as in offline training. A method supplies only what differs,
an :class:`OnlineMethod`: how a batch of prompts becomes a batch of training
rows (sample, score, measure, advantages) from the current params.

Multi-host: prompts are the same global batch on every host; the sampler
and every forward run on the whole mesh (each host's devices hold their
share of the rows); Python rewards run on each host for its own rows; every
statistic is computed from globally gathered values, so it is global.
Sampling keys are ``fold_in(fold_in(PRNGKey(seed), rollout), step)`` per
global row of the rollout, and minibatch orders are functions of ``(seed,
rollout)``: the numbers do not depend on how many hosts run them.
Checkpoints are taken at rollout boundaries only.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable, Mapping, Protocol

import gin
import jax
import numpy as np
from etils import epath

from jaxpost import paths
from jaxpost.config import build
from jaxpost.errors import UserError
from jaxpost.models.lora import has_adapters, without_adapters
from jaxpost.sharding import Partitioner
from jaxpost.train.fit import LoopConfig, check_best_settings, fit
from jaxpost.train.step import batch_shardings

__all__ = ["OnlineConfig", "OnlineMethod", "RolloutBatches", "SampleLog", "Stateless", "fit_online", "minibatch_orders",
           "online_config", "reference_policy", "rollout_rng"]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class OnlineConfig:
    """How long and how an online run trains.

    ``num_rollouts`` rollout batches of ``prompts_per_rollout`` prompts (a
    global count over all hosts; ``* group_size`` completions); metrics are
    logged every ``log_every`` rollouts and checkpoints taken every
    ``save_every`` rollouts (0: only at the end), the newest
    ``keep_checkpoints`` kept. ``seed`` fixes the initialisation, prompt
    order, sampling keys and minibatch orders. ``progress``: the tqdm bar (on a terminal or in a notebook).
    ``eval_every``: with held-out prompts (the run's ``eval_data``), an
    evaluation every ``eval_every`` rollouts (0: only at the end): greedy
    completions scored like the training ones, logged as ``eval/score``,
    ``eval/rewards/<name>/mean`` (:mod:`jaxpost.generate.held_out`).
    ``samples_every``: every completion of rollouts 1, ``1 + samples_every``, ...
    (prompt, completion, score, each reward, GRPO's advantage) is written to
    ``run_dir/samples/rollout_NNNNNN.jsonl``, to read what the policy writes
    and what each reward made of it; 0: none.

    Best state and early stopping, as :class:`~jaxpost.train.fit.LoopConfig`'s
    but counted in rollouts and higher-is-better by default: ``best_metric``
    (an evaluation key as logged, e.g. ``'eval/score'`` or
    ``'eval/rewards/<name>/mean'``; needs ``eval_data`` and ``eval_every``)
    keeps the best evaluated policy in ``run_dir/checkpoints_best``;
    ``best_mode`` ``'max'`` or ``'min'``; ``export_best`` ends the run with
    it (``run_dir/final`` is the best policy); ``patience > 0`` stops the
    run after that many evaluations in a row without improvement by more
    than ``min_delta``. The cadences (``log_every``, ``eval_every``,
    ``samples_every``, ``save_every``), ``progress``, ``patience`` and
    ``min_delta`` may change when a run resumes (``run_dir.RESUMABLE_KEYS``).
    """

    num_rollouts: int = 100
    prompts_per_rollout: int = 8
    max_prompt_len: int = 128
    save_every: int = 0
    keep_checkpoints: int = 2
    seed: int = 0
    log_every: int = 1
    progress: bool = True
    samples_every: int = 10
    eval_every: int = 0
    best_metric: str | None = None  # e.g. 'eval/score'
    best_mode: str = "max"
    export_best: bool = False
    patience: int = 0
    min_delta: float = 0.0

    def __post_init__(self):
        for name in ("num_rollouts", "prompts_per_rollout", "max_prompt_len", "log_every"):
            if getattr(self, name) < 1:
                raise UserError(f"OnlineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.save_every < 0:
            raise UserError(f"OnlineConfig.save_every must be >= 0 (0: only at the end), got {self.save_every}")
        if self.samples_every < 0:
            raise UserError(f"OnlineConfig.samples_every must be >= 0 (0: no samples log), got {self.samples_every}")
        if self.eval_every < 0:
            raise UserError(f"OnlineConfig.eval_every must be >= 0 (0: only at the end), got {self.eval_every}")
        check_best_settings(self, "eval/score", "the run's eval_data (held-out prompts)")


def online_config(given: OnlineConfig | None, eval_data: Any, owner: str) -> OnlineConfig:
    """``given``, or an :class:`OnlineConfig` built now with gin's bindings, checked against the run's ``eval_data``.

    Raises :class:`UserError` naming ``<owner>.eval_data`` when evaluations
    (``eval_every``, ``best_metric``) are asked for without held-out prompts.
    """
    online = build(OnlineConfig, given)
    if eval_data is None and (online.eval_every or online.best_metric is not None):
        raise UserError(f"OnlineConfig.eval_every={online.eval_every} (best_metric={online.best_metric!r}) evaluates "
                        f"held-out prompts, but {owner}.eval_data is None: set it to a prompt file, or set "
                        f"OnlineConfig.eval_every = 0")
    return online


def rollout_rng(seed: int, rollout: int) -> jax.Array:
    """Sampling key of rollout ``rollout``: ``fold_in(PRNGKey(seed), rollout)`` (resume-stable)."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), rollout)


def minibatch_orders(num_rows: int, minibatch_size: int, epochs: int, seed: int, rollout: int) -> list[np.ndarray]:
    """Row indices of every minibatch of a rollout: ``epochs`` shuffled passes, each split in order.

    The permutation of pass ``e`` is ``default_rng([seed, rollout, e])``:
    the same on resume and on any number of hosts. ``minibatch_size`` must
    divide ``num_rows``.
    """
    if minibatch_size < 1 or num_rows % minibatch_size:
        raise UserError(f"minibatch_size={minibatch_size} must divide the {num_rows} rows of a rollout batch")
    out = []
    for e in range(epochs):
        perm = np.random.default_rng([seed, rollout, e]).permutation(num_rows).astype(np.int32)
        out.extend(perm[i:i + minibatch_size] for i in range(0, num_rows, minibatch_size))
    return out


def reference_policy(params: Any) -> Callable[[Any], Any]:
    """The frozen reference of an online run, as ``current policy params -> reference params``.

    Under LoRA (``params`` carry adapters) the reference is the policy's own
    base with the adapters off, read from the current state at each use:
    the base never trains, so no second copy of the weights exists.
    Otherwise it is a copy of the initial ``params``, taken now (a copy,
    because the train step donates the policy's buffers).
    """
    if has_adapters(params):
        return without_adapters
    initial = jax.tree.map(lambda x: x.copy(), params)
    return lambda current: initial


class OnlineMethod(Protocol):
    """What an online method supplies to :class:`RolloutBatches`.

    ``rollout(params, prompts, rng, index)`` turns one global batch of
    prompts (from the prompt pipeline) into ``(rows, metrics)``: ``rows`` a
    dict of global ``[R, ...]`` arrays on the mesh (the training rows of this
    rollout; ``R`` is the same every rollout) and ``metrics`` floats to log.
    ``params`` are the current train-state params. ``get_state``/``set_state``
    hold what must survive a restart (e.g. an adaptive KL coefficient) as
    JSON values. A method may also keep ``samples``, the last rollout's
    completions as JSON records (:func:`jaxpost.generate.rollout.sample_records`),
    for the run's samples log.
    """

    def rollout(self, params: Any, prompts: Mapping[str, Any], rng: jax.Array, index: int
                ) -> tuple[dict[str, jax.Array], dict[str, float]]: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: Mapping[str, Any]) -> None: ...


class SampleLog:
    """Writes a rollout's completion records to ``run_dir/samples/rollout_NNNNNN.jsonl`` (process 0).

    Rollouts ``1, 1 + every, ...`` (1-based); ``every = 0`` writes none. One
    file per rollout, written whole: a resumed run samples its rollouts
    again with the same keys and writes the same files over.
    """

    def __init__(self, run_dir: epath.Path, every: int):
        self.dir, self.every = run_dir / "samples", every

    def write(self, rollout: int, records: list[dict] | None) -> None:
        if not records or not self.every or (rollout - 1) % self.every or jax.process_index() != 0:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps({"rollout": rollout, **rec}, ensure_ascii=False) + "\n" for rec in records)
        paths.atomic_write_text(self.dir / f"rollout_{rollout:06d}.jsonl", text)


class RolloutBatches:
    """The batch source of an online run: minibatches of rollouts sampled from the current policy.

    The loop asks ``next_for(state)``; when the current rollout's
    minibatches are used up, ``method.rollout(state.params, next(prompts),
    rollout_rng(seed, i), i)`` makes the next one, and its ``rows`` are split
    into ``epochs`` shuffled passes of ``minibatch_size`` rows
    (:func:`minibatch_orders`), gathered on the devices straight into the
    step's input layout. ``get_state`` (checkpoints) is only valid between
    rollouts: the loop saves at multiples of :attr:`updates_per_rollout`.
    ``metrics()`` are the newest rollout's metrics, with ``rollout`` (its
    1-based number) and its timing.
    """

    def __init__(self, method: OnlineMethod, prompts: Any, partitioner: Partitioner, *, rows: int,
                 minibatch_size: int | None = None, epochs: int = 1, seed: int = 0):
        self.method, self.prompts, self.partitioner = method, prompts, partitioner
        self.rows, self.minibatch_size = rows, minibatch_size or rows
        self.epochs, self.seed = epochs, seed
        if epochs < 1:
            raise UserError(f"the number of passes over each rollout must be >= 1, got {epochs}")
        minibatch_orders(rows, self.minibatch_size, 1, seed, 0)  # raises early when the minibatch does not divide
        shards = partitioner.shards("batch")
        if self.minibatch_size % shards:
            raise UserError(f"a minibatch of {self.minibatch_size} rows does not split over the {shards} batch shards "
                            f"of the mesh; make the minibatch size (and rows per rollout) a multiple of {shards}")
        self.updates_per_rollout = epochs * (rows // self.minibatch_size)
        self.index = 0  # rollouts made so far
        self._queue: list[np.ndarray] = []
        self._rows: dict[str, jax.Array] | None = None
        self._metrics: dict[str, float] = {}
        self._started = 0.0
        self._take = None
        self.sample_log: SampleLog | None = None  # fit_online sets it

    def next_for(self, state: Any) -> dict[str, jax.Array]:
        """The next minibatch; samples a new rollout from ``state.params`` when the last one is used up."""
        if not self._queue:
            self._rows = None  # free the old rollout before sampling the next
            self._started = time.perf_counter()
            rows, metrics = self.method.rollout(state.params, next(self.prompts), rollout_rng(self.seed, self.index),
                                                self.index)
            self._check_rows(rows)
            self._rows, self._metrics = rows, dict(metrics)
            self._metrics["time/rollout_s"] = time.perf_counter() - self._started
            self._queue = minibatch_orders(self.rows, self.minibatch_size, self.epochs, self.seed, self.index)
            self.index += 1
            if self.sample_log is not None:
                self.sample_log.write(self.index, getattr(self.method, "samples", None))
        idx = self._queue.pop(0)
        if self._take is None:
            shapes = {k: jax.ShapeDtypeStruct((self.minibatch_size,) + v.shape[1:], v.dtype)
                      for k, v in self._rows.items()}
            out = batch_shardings(shapes, self.partitioner)
            self._take = jax.jit(lambda b, i: jax.tree.map(lambda x: x[i], b), out_shardings=out)
        return self._take(self._rows, jax.device_put(idx, self.partitioner.replicated))

    def _check_rows(self, rows: Mapping[str, jax.Array]) -> None:
        bad = {k: tuple(v.shape) for k, v in rows.items() if not v.ndim or v.shape[0] != self.rows}
        if bad:
            raise ValueError(f"a rollout must give {self.rows} rows per entry; got shapes {bad}")

    def metrics(self, state: Any = None) -> dict[str, float]:
        """The newest rollout's metrics, ``rollout`` (1-based) and ``time/generate_fraction`` of its cycle so far."""
        out = {**self._metrics, "rollout": float(self.index)}
        cycle = time.perf_counter() - self._started
        if "time/generate_s" in out and cycle > 0:
            out["time/generate_fraction"] = out["time/generate_s"] / cycle
        return out

    def checkpointable(self) -> bool:
        """Whether the loop may save now: between two rollouts (none of the current one's minibatches left)."""
        return not self._queue

    def get_state(self) -> dict:
        """``{"prompts", "rollout", "method"}``: the position between two rollouts."""
        if self._queue:
            raise RuntimeError(f"RolloutBatches.get_state in the middle of rollout {self.index}: checkpoints are "
                               f"taken at rollout boundaries (every {self.updates_per_rollout} updates)")
        return {"prompts": self.prompts.get_state(), "rollout": self.index, "method": self.method.get_state()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restores a position from :meth:`get_state`."""
        self.prompts.set_state(state["prompts"])
        self.index = int(state["rollout"])
        self.method.set_state(state.get("method") or {})
        self._queue, self._rows, self._metrics = [], None, {}


def fit_online(*, run_dir: epath.Path, loss_fn: Callable, params: Any, param_shardings: Any,
               partitioner: Partitioner, batches: RolloutBatches, online: OnlineConfig, frozen: Any = None,
               frozen_shardings: Any = None, model_config: Any = None, summary: dict | None = None,
               evaluate: Callable[[Any], Mapping[str, float]] | None = None, trainable_mask: Any = None,
               after_update: Callable[[Any, jax.Array], Any] | None = None) -> Any:
    """Trains for ``online.num_rollouts`` rollouts with :func:`jaxpost.train.fit`; returns the final state.

    One optimizer step per minibatch: ``num_steps = num_rollouts x
    batches.updates_per_rollout``; metrics every ``log_every`` rollouts (the
    last update's loss metrics and the rollout's :meth:`RolloutBatches.metrics`),
    checkpoints every ``save_every`` rollouts, both at rollout boundaries;
    the samples log every ``samples_every`` rollouts (:class:`SampleLog`);
    ``evaluate(state)`` (held-out rewards, :mod:`jaxpost.generate.held_out`)
    every ``eval_every`` rollouts and at the end; with ``online.best_metric``
    the best evaluated state is kept (and with ``export_best`` returned).
    ``trainable_mask`` and ``after_update`` go to :func:`~jaxpost.train.fit`
    (a reference in the state: :func:`jaxpost.train.reference_sync.online_reference`).
    ``summary`` gets the last rollout's metrics, ``rollout``, the best
    (``best/...``) and the final evaluation (``eval/...``). Raises
    :class:`UserError` when ``eval_every`` or ``best_metric`` is set
    without ``evaluate``, or ``best_metric`` is none of ``evaluate.keys``.
    """
    _check_evaluation(online, evaluate)
    batches.sample_log = SampleLog(run_dir, online.samples_every)
    per = batches.updates_per_rollout
    loop = LoopConfig(num_steps=online.num_rollouts * per, log_every=online.log_every * per,
                      save_every=online.save_every * per, keep_checkpoints=online.keep_checkpoints,
                      seed=online.seed, progress=online.progress, eval_every=online.eval_every * per,
                      best_metric=online.best_metric, best_mode=online.best_mode, export_best=online.export_best,
                      patience=online.patience, min_delta=online.min_delta)
    state = fit(run_dir=run_dir, loss_fn=loss_fn, params=params, param_shardings=param_shardings,
                partitioner=partitioner, batches=batches, loop=loop, frozen=frozen, frozen_shardings=frozen_shardings,
                model_config=model_config, extra_metrics=batches.metrics, summary=summary, evaluate=evaluate,
                trainable_mask=trainable_mask, after_update=after_update)
    if summary is not None:
        summary.update({k: v for k, v in batches.metrics().items() if not k.startswith("time/")})
        summary["rollout"] = batches.index
        if evaluate is not None:
            summary.update({f"eval/{k}": v for k, v in evaluate(state).items()})
    return state


def _check_evaluation(online: OnlineConfig, evaluate: Any) -> None:
    """Evaluation settings that this run cannot honour fail before it samples anything."""
    if evaluate is None and (online.eval_every or online.best_metric is not None):
        raise UserError(f"OnlineConfig.eval_every={online.eval_every} (best_metric={online.best_metric!r}) evaluates "
                        f"held-out prompts, but this run has no evaluate")
    keys = getattr(evaluate, "keys", None)
    if online.best_metric is not None and keys is not None and online.best_metric not in [f"eval/{k}" for k in keys]:
        raise UserError(f"OnlineConfig.best_metric={online.best_metric!r} is not among this run's evaluation "
                        f"metrics {sorted(f'eval/{k}' for k in keys)}")


class Stateless:
    """Base of an :class:`OnlineMethod` with nothing to keep across a restart."""

    def get_state(self) -> dict:
        return {}

    def set_state(self, state: Mapping[str, Any]) -> None:
        del state
