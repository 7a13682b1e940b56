"""The training loop: resume, step, guard, log, evaluate, checkpoint.

The loop never waits for the devices except at logging, evaluation and
checkpoint steps: each step's ``is_finite`` flag stays on device until one
of those points, where all flags since the last check are fetched at once.
So a NaN is always caught before the next save, and the newest checkpoint
is always a finite state.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Protocol

import gin
import jax
import numpy as np

from jaxpost.train.checkpoint import Checkpointer, abstract_with_shardings
from jaxpost.train.metrics import MetricsWriter, ProgressBar, Stopwatch, mfu
from jaxpost.train.state import TrainState
from jaxpost.train.step import stack_batches

__all__ = ["train", "NonFiniteLossError", "CheckpointableIterator"]


class CheckpointableIterator(Protocol):
    """A batch iterator whose position can be saved and restored (grain's ``DatasetIterator`` is one)."""

    def __next__(self) -> Any: ...

    def get_state(self) -> Any: ...

    def set_state(self, state: Any) -> None: ...


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm became NaN/Inf; the run stopped without saving that state."""

    def __init__(self, step: int, last_checkpoint: int | None):
        self.step = step
        self.last_checkpoint = last_checkpoint
        where = (f"the latest checkpoint (step {last_checkpoint}) is intact" if last_checkpoint is not None
                 else "no checkpoint was written")
        super().__init__(f"Non-finite loss or gradient norm at step {step} (the update producing "
                         f"state.step={step}); stopped without saving it, {where}")


def _first_bad(pending: list[tuple[int, jax.Array]]) -> int | None:
    """The first non-finite step among ``(first step, flags of that call's steps)``, or None."""
    flags = jax.device_get([f for _, f in pending])
    for (first, _), ok in zip(pending, flags):
        bad = np.flatnonzero(~np.atleast_1d(np.asarray(ok, bool)))
        if bad.size:
            return first + int(bad[0])
    return None


def _check_steps_per_call(n: int, start: int, **intervals: int) -> None:
    if n < 1:
        raise ValueError(f"steps_per_call must be >= 1, got {n}")
    for name, value in intervals.items():
        if value and value % n:
            raise ValueError(f"steps_per_call={n} runs {n} steps per compiled call, so {name} must be a "
                             f"multiple of it; got {name}={value}")
    if start % n:
        raise ValueError(f"steps_per_call={n}: the run resumes at step {start}, which is not a multiple of "
                         f"it (it was saved with another steps_per_call); use a divisor of {start}")


def _last_saved(checkpointer: Checkpointer | None) -> int | None:
    if checkpointer is None:
        return None
    checkpointer.wait_until_finished()
    return checkpointer.latest_step()


@gin.configurable(denylist=["state", "step_fn", "batches", "frozen", "checkpointer", "writer"])
def train(*, state: TrainState, step_fn: Callable, batches: Iterator, frozen: Any = None, num_steps: int,
          checkpointer: Checkpointer | None = None, eval_fn: Callable[[TrainState], Mapping] | None = None,
          eval_every: int = 0, log_every: int = 10, writer: MetricsWriter | None = None,
          tokens_per_batch_fn: Callable[[Any], int | jax.Array] | None = None, flops_per_step: float | None = None,
          extra_metrics_fn: Callable[[TrainState], Mapping] | None = None,
          progress: bool = True, steps_per_call: int = 1) -> TrainState:
    """Run ``step_fn`` until ``state.step == num_steps``; returns the final state.

    Args:
      state: the initial (sharded) state. If ``checkpointer`` holds a complete
        checkpoint, the state is restored from it into this state's shardings
        and ``batches.set_state`` is called with the saved iterator position.
      step_fn: compiled ``(state, batch, frozen) -> (state, metrics)`` with
        ``metrics["is_finite"]`` (see :func:`jaxpost.train.make_train_step`);
        the state passed in may be donated.
      batches: iterator with ``get_state``/``set_state`` (checkpointed).
      num_steps: total optimizer steps of the run (not steps of this call).
      checkpointer: saves at its ``should_save`` steps and at ``num_steps``.
      eval_fn: ``eval_fn(state) -> dict``, run every ``eval_every`` steps,
        logged with an ``eval/`` prefix.
      log_every: fetch and write metrics every this many steps (and at the end).
      writer: where metrics go (None: nowhere).
      tokens_per_batch_fn: count of tokens in a batch, for ``tokens_per_s``: an
        int or a device scalar; counts are read at log steps only, so counting
        on the devices does not make every step wait.
      flops_per_step: model FLOPs per step, for ``mfu`` on known accelerators.
      extra_metrics_fn: ``extra_metrics_fn(state) -> dict`` added at log steps.
      steps_per_call: optimizer steps per call of ``step_fn``, compiled with
        the same value (:func:`jaxpost.train.compile_train_step`): the loop
        stacks that many batches per call (:func:`jaxpost.train.stack_batches`)
        and logs the last step's metrics of a call. ``num_steps``,
        ``log_every``, ``eval_every`` and the checkpointer's ``save_every``
        must be multiples of it; the NaN guard still names the exact step.

    Raises:
      NonFiniteLossError: a step produced a non-finite loss or gradient norm;
        raised before any later save, after pending saves have finished.
    """
    if log_every < 1:
        raise ValueError(f"log_every must be >= 1, got {log_every}")
    if checkpointer is not None:
        restored = checkpointer.restore_latest(abstract_with_shardings(state))
        if restored is not None:
            state = restored.state
            batches.set_state(restored.data_state)
    step = int(jax.device_get(state.step))
    n = steps_per_call
    _check_steps_per_call(n, step, num_steps=num_steps, log_every=log_every, eval_every=eval_every,
                          save_every=checkpointer.save_every if checkpointer is not None else 0)
    bar = ProgressBar(num_steps, initial=step) if progress else None
    n_devices, kind = jax.device_count(), jax.devices()[0].device_kind
    pending: list[tuple[int, jax.Array]] = []
    watch, interval_steps = Stopwatch(), 0
    interval_tokens: list = []  # per-batch counts, read at log steps only (they may be device scalars)
    excluded = 0.0  # seconds spent in eval since the last log, kept out of throughput
    try:
        while step < num_steps:
            parts = [next(batches) for _ in range(n)]
            if tokens_per_batch_fn is not None:
                interval_tokens.extend(tokens_per_batch_fn(b) for b in parts)
            batch = parts[0] if n == 1 else stack_batches(parts)
            state, metrics = step_fn(state, batch, frozen)
            step += n
            interval_steps += n
            if "is_finite" not in metrics:
                raise KeyError("step_fn metrics lack 'is_finite' (the NaN guard needs it); "
                               "build the step with jaxpost.train.make_train_step")
            pending.append((step - n + 1, metrics["is_finite"]))

            last = step == num_steps
            log_now = step % log_every == 0 or last
            eval_now = eval_fn is not None and eval_every > 0 and step % eval_every == 0
            save_now = checkpointer is not None and (last or checkpointer.should_save(step))
            if log_now or eval_now or save_now:
                bad = _first_bad(pending)
                pending.clear()
                if bad is not None:
                    raise NonFiniteLossError(bad, _last_saved(checkpointer))

            if log_now:
                record = {k: (v if n == 1 else v[-1]) for k, v in jax.device_get(metrics).items()
                          if k != "is_finite"}
                seconds = max(watch.lap() - excluded, 1e-9)
                excluded = 0.0
                record["steps_per_s"] = interval_steps / seconds
                if tokens_per_batch_fn is not None:
                    record["tokens_per_s"] = sum(int(c) for c in jax.device_get(interval_tokens)) / seconds
                if flops_per_step is not None:
                    u = mfu(flops_per_step, seconds / interval_steps, n_devices, kind)
                    if u is not None:
                        record["mfu"] = u
                if extra_metrics_fn is not None:
                    record.update(jax.device_get(dict(extra_metrics_fn(state))))
                if writer is not None:
                    writer.write(step, record)
                if bar is not None:
                    bar.update(step, float(record["loss"]) if "loss" in record else None, record.get("tokens_per_s"))
                interval_steps = 0
                interval_tokens.clear()
            elif bar is not None:
                bar.update(step)

            if eval_now:
                eval_watch = Stopwatch()
                results = jax.device_get(dict(eval_fn(state)))
                excluded += eval_watch.lap()
                if writer is not None:
                    writer.write(step, {f"eval/{k}": v for k, v in results.items()})

            if save_now:
                checkpointer.save(step, state, data_state=batches.get_state(), force=last)
    finally:
        if checkpointer is not None:
            checkpointer.wait_until_finished()
        if writer is not None:
            writer.flush()
        if bar is not None:
            bar.close()
    return state

