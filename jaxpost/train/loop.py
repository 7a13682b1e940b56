"""The training loop: resume, step, guard, log, evaluate, checkpoint, keep the best, stop early.

The loop never waits for the devices except at logging, evaluation and
checkpoint steps: each step's ``is_finite`` flag stays on device until one
of those points, where all flags since the last check are fetched at once.
So a NaN is always caught before the next save, and the newest checkpoint
is always a finite state.

With a :class:`BestCheckpoint`, every evaluation is compared with the best
so far: the best state is saved in its own directory (the regular
checkpoints, newest last, stay for resuming) and, with ``patience``, the
run stops after that many evaluations without improvement.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Iterator, Mapping, Protocol

import jax
import numpy as np

from jaxpost import paths
from jaxpost.errors import UserError
from jaxpost.train.checkpoint import Checkpointer, abstract_with_shardings
from jaxpost.train.interrupt import RunInterrupted, StopRequests
from jaxpost.train.metrics import Console, MetricsWriter, Stopwatch, mfu
from jaxpost.train.state import TrainState
from jaxpost.train.step import stack_batches

__all__ = ["train", "BestCheckpoint", "NonFiniteLossError", "CheckpointableIterator"]

log = logging.getLogger("jaxpost")


class CheckpointableIterator(Protocol):
    """A batch iterator whose position can be saved and restored (grain's ``DatasetIterator`` is one)."""

    def __next__(self) -> Any: ...

    def get_state(self) -> Any: ...

    def set_state(self, state: Any) -> None: ...


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm became NaN/Inf; the run stopped without saving that state.

    The message names the newest intact checkpoint and the earlier ones, with
    the way back: rerun (resumes from the newest) or ``--resume_from_step=S``
    when the newest state had already gone bad before the NaN showed.
    """

    def __init__(self, step: int, last_checkpoint: int | None, saved_steps: list[int] | None = None):
        self.step = step
        self.last_checkpoint = last_checkpoint
        self.saved_steps = list(saved_steps or ([] if last_checkpoint is None else [last_checkpoint]))
        if last_checkpoint is None:
            where = "no checkpoint was written; rerunning starts from step 0"
        else:
            where = (f"the latest checkpoint (step {last_checkpoint}) is intact; lower the learning rate or check "
                     f"the data, then rerun the same command to resume from it")
            earlier = [s for s in self.saved_steps if s < last_checkpoint]
            if earlier:
                where += (f", or from an earlier checkpoint (saved: {', '.join(map(str, self.saved_steps))}) if "
                          f"the state had already diverged, with --resume_from_step={earlier[-1]}")
        super().__init__(f"Non-finite loss or gradient norm at step {step} (the update producing "
                         f"state.step={step}); stopped without saving it: {where}")


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


def _saved_steps(checkpointer: Checkpointer | None) -> list[int]:
    if checkpointer is None:
        return []
    checkpointer.wait_until_finished()
    return checkpointer.all_steps()


class BestCheckpoint:
    """The best state by one evaluation metric, in its own checkpoint directory, and early stopping.

    An evaluation *improves* when its ``metric`` beats the best so far by
    more than ``min_delta`` (lower for ``mode="min"``, higher for ``"max"``);
    the first finite value improves, a NaN never does. On improvement the
    state is saved to ``directory`` (an Orbax :class:`Checkpointer` keeping
    one step, with ``{"metric", "value", "mode"}`` as its data item). With
    ``patience > 0`` the run stops after ``patience`` evaluations in a row
    without improvement (:attr:`should_stop`, :attr:`stop_reason`).

    Resume (:meth:`start`): the best value and step are read back from
    ``directory``, and the evaluations without improvement since are those
    between the best step and the resumed one, so patience counts on across
    restarts and a run that stopped early stops again at once. A best saved
    *after* the resumed step (the run died between a best save and its next
    regular checkpoint) belongs to a lost timeline: it is deleted, and the
    replay (exact resume) finds it again. A best kept for another metric is
    ignored with a warning until this metric's first best replaces it.

    Args:
      directory: where the best state goes (e.g. ``run_dir/checkpoints_best``);
        None tracks the best in memory only (nothing saved, no resume).
      metric: a logged evaluation key, ``eval/<name>`` (e.g. ``eval/loss``).
      mode: ``"min"`` or ``"max"``.
      min_delta: the margin (>= 0) an evaluation must beat the best by.
      patience: evaluations without improvement before stopping; 0 never stops.
    """

    def __init__(self, directory: Any = None, metric: str = "eval/loss", mode: str = "min",
                 min_delta: float = 0.0, patience: int = 0):
        if not metric.startswith("eval/"):
            raise UserError(f"best_metric={metric!r}: the best state is chosen by an evaluation metric, named as "
                            f"logged, e.g. 'eval/loss'")
        if mode not in ("min", "max"):
            raise UserError(f"best_mode={mode!r}: use 'min' (lower is better, e.g. eval/loss) or 'max'")
        if min_delta < 0 or patience < 0:
            raise UserError(f"min_delta={min_delta} and patience={patience} must be >= 0")
        self.directory, self.metric, self.mode = directory, metric, mode
        self.min_delta, self.patience = float(min_delta), int(patience)
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.rounds_without_improvement = 0
        self.stop_reason: str | None = None
        self.checkpointer: Checkpointer | None = None

    @property
    def should_stop(self) -> bool:
        """Whether ``patience`` evaluations in a row have not improved (the loop then saves and stops)."""
        return self.stop_reason is not None

    def start(self, step: int, eval_every: int) -> None:
        """Resumes the tracking at ``step`` (0 for a fresh run); see the class docstring. Call once, first."""
        if self.directory is not None:
            self.checkpointer = Checkpointer(self.directory, save_every=1, keep=1)
            saved = self.checkpointer.latest_step()
            if saved is not None and saved > step:
                self.checkpointer.close()
                if jax.process_index() == 0:
                    paths.resolve(self.directory).rmtree()
                if jax.process_count() > 1:
                    from jax.experimental import multihost_utils
                    multihost_utils.sync_global_devices("jaxpost_best_checkpoint_reset")
                self.checkpointer = Checkpointer(self.directory, save_every=1, keep=1)
            elif saved is not None:
                info = self.checkpointer.data_states(saved)[0] or {}
                if info.get("metric") == self.metric and info.get("mode") == self.mode:
                    self.best_value, self.best_step = float(info["value"]), saved
                else:
                    log.warning("%s holds the best state by %s (%s); this run keeps the best by %s (%s): the "
                                "old one stays until this run's first best replaces it.", self.directory,
                                info.get("metric"), info.get("mode"), self.metric, self.mode)
        if eval_every > 0:
            self.rounds_without_improvement = step // eval_every - (self.best_step or 0) // eval_every
        self._check_patience()

    def update(self, step: int, eval_record: Mapping[str, Any], state: TrainState) -> bool:
        """Compares one evaluation (keys as logged, ``eval/...``) with the best; saves ``state`` if better.

        Returns whether it improved. Raises :class:`UserError` when
        ``metric`` is not among the evaluation's keys.
        """
        if self.metric not in eval_record:
            raise UserError(f"best_metric={self.metric!r} is not among the evaluation's metrics "
                            f"{sorted(eval_record)}; set best_metric (LoopConfig's, or OnlineConfig's in an "
                            f"online run) to one of them")
        value = float(eval_record[self.metric])
        if self.best_value is None:
            improved = math.isfinite(value)
        elif self.mode == "min":
            improved = value < self.best_value - self.min_delta
        else:
            improved = value > self.best_value + self.min_delta
        if improved:
            self.best_value, self.best_step, self.rounds_without_improvement = value, step, 0
            if self.checkpointer is not None:
                self.checkpointer.save(step, state, data_state={"metric": self.metric, "value": value,
                                                                "mode": self.mode}, force=True)
        else:
            self.rounds_without_improvement += 1
            self._check_patience()
        return improved

    def _check_patience(self) -> None:
        if self.patience and self.rounds_without_improvement >= self.patience:
            best = (f"best {self.best_value:.6g} at step {self.best_step}" if self.best_value is not None
                    else "no finite value yet")
            rounds = self.rounds_without_improvement
            self.stop_reason = (f"early stopping: {self.metric} has not improved by more than {self.min_delta:g} "
                                f"for {rounds} evaluation{'s' if rounds != 1 else ''} (patience {self.patience}; "
                                f"{best})")

    def summary(self) -> dict[str, Any]:
        """``best/metric``, ``best/value``, ``best/step`` (when a best exists), ``stopped_early``, ``stop_reason``."""
        out: dict[str, Any] = {"stopped_early": self.should_stop}
        if self.stop_reason is not None:
            out["stop_reason"] = self.stop_reason
        if self.best_value is not None:
            out.update({"best/metric": self.metric, "best/value": self.best_value, "best/step": self.best_step})
        return out

    def restore(self, abstract_state: TrainState) -> TrainState | None:
        """The saved best state, read into ``abstract_state``'s shardings; None when none was saved."""
        if self.checkpointer is None or self.best_step is None:
            return None
        self.checkpointer.wait_until_finished()
        return self.checkpointer.restore(self.best_step, abstract_state).state

    def wait_until_finished(self) -> None:
        """Blocks until the pending best save is on disk."""
        if self.checkpointer is not None:
            self.checkpointer.wait_until_finished()

    def close(self) -> None:
        """Waits for the pending save and releases the checkpoint manager."""
        if self.checkpointer is not None:
            self.checkpointer.close()
            self.checkpointer = None


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


def train(*, state: TrainState, step_fn: Callable, batches: Iterator, frozen: Any = None, num_steps: int,
          checkpointer: Checkpointer | None = None, eval_fn: Callable[[TrainState], Mapping] | None = None,
          eval_every: int = 0, log_every: int = 10, writer: MetricsWriter | None = None,
          tokens_per_batch_fn: Callable[[Any], int | jax.Array] | None = None, flops_per_step: float | None = None,
          extra_metrics_fn: Callable[[TrainState], Mapping] | None = None,
          progress: bool = True, steps_per_call: int = 1, best: BestCheckpoint | None = None,
          steps_per_epoch: int | None = None) -> TrainState:
    """Run ``step_fn`` until ``state.step == num_steps`` (or early stopping); returns the final state.

    Args:
      state: the initial (sharded) state. If ``checkpointer`` holds a complete
        checkpoint, the state is restored from it into this state's shardings
        and ``batches.set_state`` is called with the saved iterator position.
      step_fn: compiled ``(state, batch, frozen) -> (state, metrics)`` with
        ``metrics["is_finite"]`` (see :func:`jaxpost.train.make_train_step`);
        the state passed in may be donated.
      batches: iterator with ``get_state``/``set_state`` (checkpointed), or
        a source of batches that depend on the state (online rollouts:
        ``batches.next_for(state)``, :class:`jaxpost.train.online.RolloutBatches`).
      num_steps: total optimizer steps of the run (not steps of this call).
      checkpointer: saves at its ``should_save`` steps and at ``num_steps``.
      eval_fn: ``eval_fn(state) -> dict``, run every ``eval_every`` steps,
        logged with an ``eval/`` prefix.
      log_every: fetch and write metrics every this many steps (and at the end).
        The main process also prints one line per logged step (loss, gradient
        norm, learning rate, tokens/s, MFU when known, and the evaluation of
        that step; :func:`jaxpost.train.metrics.format_log_line`) and a final
        summary line (train and eval loss, best, why it stopped).
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
      progress: show a tqdm bar (main process, on a terminal or in a notebook); logged lines print either way.
      best: compares every evaluation with the best so far, saves the best
        state and stops early (:class:`BestCheckpoint`; needs ``eval_fn`` and
        ``eval_every``). On a stop the state is checkpointed (``force``) and
        logged at that step, and the reason printed.
      steps_per_epoch: when known, log records get ``epoch = step / steps_per_epoch``.

    SIGTERM (a preempted VM) or SIGINT (Ctrl-C) during the loop stops the
    run at the next point where a checkpoint can be taken (after every call
    of ``step_fn``, or where ``batches.checkpointable()`` says so: online,
    between rollouts), which is saved, logged and, with several processes,
    the same step on all (:class:`jaxpost.train.interrupt.StopRequests`);
    a second signal acts at once.

    Raises:
      NonFiniteLossError: a step produced a non-finite loss or gradient norm;
        raised before any later save, after pending saves have finished.
      RunInterrupted: a signal stopped the run before ``num_steps``; raised
        after the checkpoint of its step is written.
    """
    if log_every < 1:
        raise ValueError(f"log_every must be >= 1, got {log_every}")
    if best is not None and (eval_fn is None or eval_every <= 0):
        raise UserError(f"keeping the best checkpoint by {best.metric!r} needs evaluations: give held-out data and "
                        f"LoopConfig.eval_every > 0 (got eval_every={eval_every})")
    if checkpointer is not None:
        restored = checkpointer.restore_latest(abstract_with_shardings(state))
        if restored is not None:
            state = restored.state
            batches.set_state(restored.data_state)
            if jax.process_index() == 0:
                print(f"[jaxpost] resuming from step {restored.step} ({checkpointer.directory})", flush=True)
    step = int(jax.device_get(state.step))
    if step >= num_steps and jax.process_index() == 0:
        print(f"[jaxpost] the run is already at step {step} (num_steps={num_steps}): nothing to train; raise "
              f"LoopConfig.num_steps to train on", flush=True)
    if writer is not None:
        writer.resume_at(step)  # rows of steps after the restored one belong to a timeline that is gone
    n = steps_per_call
    _check_steps_per_call(n, step, num_steps=num_steps, log_every=log_every, eval_every=eval_every,
                          save_every=checkpointer.save_every if checkpointer is not None else 0)
    if best is not None:
        best.start(step, eval_every)
    console = Console(num_steps, initial=step, progress=progress)
    # Online sources sample their batches from the current policy; offline ones are plain iterators.
    take = batches.next_for if hasattr(batches, "next_for") else (lambda _state: next(batches))
    checkpointable = getattr(batches, "checkpointable", lambda: True)
    n_devices, kind = jax.device_count(), jax.devices()[0].device_kind
    pending: list[tuple[int, jax.Array]] = []
    watch, interval_steps = Stopwatch(), 0
    interval_tokens: list = []  # per-batch counts, read at log steps only (they may be device scalars)
    excluded = 0.0  # seconds spent in eval since the last log, kept out of throughput
    started, first_step = time.perf_counter(), step
    last_loss = last_eval_loss = None
    metrics: dict = {}

    def train_record() -> dict:
        """The metrics of the latest step (read from the devices now) plus the interval's throughput."""
        nonlocal excluded, interval_steps
        record = {k: (v if n == 1 else v[-1]) for k, v in jax.device_get(metrics).items() if k != "is_finite"}
        seconds = max(watch.lap() - excluded, 1e-9)
        excluded = 0.0
        record["steps_per_s"] = interval_steps / seconds
        if steps_per_epoch:
            record["epoch"] = step / steps_per_epoch
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
        interval_steps = 0
        interval_tokens.clear()
        return record

    halt = None  # the name of the signal that stopped the run
    with StopRequests() as stops:
        try:
            while step < num_steps and not (best is not None and best.should_stop) and halt is None:
                parts = [take(state) for _ in range(n)]
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
                halt = stops.after_steps(n, checkpointable())

                last = step == num_steps
                log_now = step % log_every == 0 or last
                eval_now = eval_fn is not None and eval_every > 0 and step % eval_every == 0
                save_now = checkpointer is not None and (last or checkpointer.should_save(step))
                if log_now or eval_now or save_now or halt:
                    bad = _first_bad(pending)
                    pending.clear()
                    if bad is not None:
                        saved = _saved_steps(checkpointer)
                        raise NonFiniteLossError(bad, saved[-1] if saved else None, saved)

                record = train_record() if log_now else None
                evaluated = None
                if eval_now:
                    eval_watch = Stopwatch()
                    evaluated = {f"eval/{k}": v for k, v in jax.device_get(dict(eval_fn(state))).items()}
                    excluded += eval_watch.lap()
                    if writer is not None:
                        writer.write(step, evaluated)
                    if best is not None:
                        best.update(step, evaluated, state)
                stop = (best is not None and best.should_stop) or halt is not None
                if stop and record is None:
                    record = train_record()  # the run ends here: its last step is logged like a final one
                if record is not None:
                    last_loss = record.get("loss", last_loss)
                    console.update(step, float(record["loss"]) if "loss" in record else None,
                                   record.get("tokens_per_s"))
                else:
                    console.update(step)
                if evaluated is not None:
                    last_eval_loss = evaluated.get("eval/loss", last_eval_loss)
                if record is not None or evaluated is not None:
                    console.log(step, {**(record or {}), **(evaluated or {})})

                if checkpointer is not None and (save_now or stop):
                    if writer is not None:
                        writer.flush()  # a checkpoint's step always has its metrics on disk (or in the bucket)
                    if best is not None:
                        # On resume, patience counts evaluations since the best on disk: it must not lag behind.
                        best.wait_until_finished()
                    checkpointer.save(step, state, data_state=batches.get_state(), force=last or stop)
        finally:
            if checkpointer is not None:
                checkpointer.wait_until_finished()
            if best is not None:
                best.wait_until_finished()
            if writer is not None:
                writer.flush()
            console.close()
    early = best is not None and best.should_stop
    interrupted = halt is not None and step < num_steps and not early  # a signal at the last step changes nothing
    summary = [f"[jaxpost] {'stopped' if early or interrupted else 'done'} at step "
               f"{step}/{num_steps} ({step - first_step} steps in {_duration(time.perf_counter() - started)})"]
    if last_loss is not None:
        summary.append(f"train loss {float(last_loss):.4g}")
    if last_eval_loss is not None:
        summary.append(f"eval loss {float(last_eval_loss):.4g}")
    if best is not None and best.best_value is not None:
        summary.append(f"best {best.metric} {best.best_value:.4g} at step {best.best_step}")
    if early:
        summary.append(best.stop_reason)
    elif interrupted:
        summary.append(f"stopped by {halt}")
    console.print(" | ".join(summary))
    if interrupted:
        stops.all_saved()
        raise RunInterrupted(halt, step, num_steps, None if checkpointer is None else str(checkpointer.directory))
    return state

