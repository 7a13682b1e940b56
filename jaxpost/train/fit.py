"""The offline training driver: :class:`LoopConfig`, :func:`fit` (optimizer + sharded state + compiled
step + checkpoints + the loop), held-out evaluation, and :func:`finish_run`.

Every offline recipe (``jaxpost.recipes.sft``, ``reward``, ``dpo``,
``distill``) loads a model (:func:`jaxpost.models.load.load_model`), builds
its loss and batches, and calls :func:`fit` then :func:`finish_run`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterator, Mapping

import gin
import jax
from etils import epath

from jaxpost.distributed import is_main_process
from jaxpost.errors import UserError
from jaxpost.models.config import ModelConfig
from jaxpost.models.export import export
from jaxpost.models.lora import has_adapters, trainable_mask as lora_trainable_mask
from jaxpost.sharding import Partitioner
from jaxpost.train.batches import MeshBatches, count_loss_tokens, global_sum
from jaxpost.train.checkpoint import Checkpointer, abstract_with_shardings
from jaxpost.train.loop import BestCheckpoint, train
from jaxpost.train.metrics import MetricsWriter
from jaxpost.train.optimizer import make_optimizer
from jaxpost.train.run_dir import ResumeConfig, release_run_dirs, write_operative_config, write_summary
from jaxpost.train.state import abstract_state, init_sharded_state, state_shardings
from jaxpost.train.step import batch_shardings, compile_train_step, make_train_step
from jaxpost.train.trainable import stop_frozen_gradients

__all__ = ["PeekedBatches", "LoopConfig", "check_best_settings", "count_epoch_batches", "finish_run", "fit",
           "make_evaluator"]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """How long and how a run trains: steps or epochs, logging, evaluation, checkpoints, best state, early stop.

    Length: ``num_steps`` optimizer steps, or ``num_epochs`` passes over the
    training data (set one; neither means ``num_steps = 100``). With epochs,
    :func:`fit` counts the batches of one pass over the tokenized (and
    packed) data before training, prints ``num_steps = num_epochs x
    batches per epoch`` (rounded up to a multiple of ``steps_per_call``)
    and uses it for the learning-rate schedule; the summary and the
    TensorBoard config hold it and every logged row has its ``epoch``.
    The training stream runs on past the end of an epoch into the next
    (packing fills rows across the boundary), so an epoch is that many
    batches, not an exact set of examples.

    Best state and early stopping (need held-out data and ``eval_every``):
    ``best_metric`` (an evaluation key as logged, e.g. ``'eval/loss'``; None:
    off) and ``best_mode`` (``'min'``/``'max'``) keep the best evaluated state in
    ``run_dir/checkpoints_best`` beside the regular checkpoints (which keep
    the newest states for resuming). An evaluation improves when it beats
    the best by more than ``min_delta``. ``patience > 0`` stops the run after
    that many evaluations in a row without improvement: the state is saved,
    and the console and the summary (``stopped_early``, ``stop_reason``)
    say why. ``export_best`` makes the run end with the best state instead of
    the last: the final evaluation and ``run_dir/final`` are of the best
    (``summary["step"]`` is its step). See :class:`jaxpost.train.BestCheckpoint`.
    """

    num_steps: int | None = None  # None: 100, unless num_epochs is set
    num_epochs: int | None = None
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 8
    save_every: int = 0          # 0: only at the end
    keep_checkpoints: int = 2
    seed: int = 0
    grad_accum_steps: int = 1
    progress: bool = True
    steps_per_call: int = 1      # optimizer steps per compiled call (a lax.scan); see jaxpost.train.scan_steps
    best_metric: str | None = None   # e.g. 'eval/loss': keep the best state by it
    best_mode: str = "min"
    export_best: bool = False
    patience: int = 0            # 0: never stop early
    min_delta: float = 0.0

    def __post_init__(self):
        if self.num_steps is not None and self.num_epochs is not None:
            raise UserError(f"LoopConfig: num_steps={self.num_steps} and num_epochs={self.num_epochs} both set; a "
                            f"run trains for one of them: unset the other (e.g. LoopConfig.num_steps = None)")
        if self.num_steps is None and self.num_epochs is None:
            object.__setattr__(self, "num_steps", 100)  # the default length
        for name, low in (("num_steps", 1), ("num_epochs", 1), ("log_every", 1), ("eval_every", 0),
                          ("eval_batches", 1), ("save_every", 0), ("keep_checkpoints", 1), ("grad_accum_steps", 1),
                          ("steps_per_call", 1)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise UserError(f"LoopConfig.{name} must be >= {low}, got {value}")
        check_best_settings(self, "eval/loss", "held-out data")


def check_best_settings(config: Any, example: str, held_out: str) -> None:
    """Raises :class:`UserError` naming ``<config's class>.<field>`` for best-state settings that cannot work.

    ``config`` has ``best_metric``, ``best_mode``, ``export_best``,
    ``patience``, ``min_delta`` and ``eval_every`` (:class:`LoopConfig`,
    :class:`~jaxpost.train.online.OnlineConfig`); ``example`` is a metric
    of its runs and ``held_out`` what their evaluations read, for the messages.
    """
    c, name = config, type(config).__name__
    if c.patience < 0:
        raise UserError(f"{name}.patience must be >= 0 (0: never stop early), got {c.patience}")
    if c.min_delta < 0:
        raise UserError(f"{name}.min_delta must be >= 0, got {c.min_delta}")
    if c.best_metric is None and (c.export_best or c.patience):
        raise UserError(f"{name}: export_best={c.export_best} and patience={c.patience} choose by an evaluation "
                        f"metric; set {name}.best_metric (e.g. {example!r}) and eval_every")
    if c.best_metric is not None and c.eval_every <= 0:
        raise UserError(f"{name}.best_metric={c.best_metric!r} needs evaluations: set {name}.eval_every > 0 and "
                        f"give {held_out}")
    if c.best_mode not in ("min", "max"):
        raise UserError(f"{name}.best_mode={c.best_mode!r}: use 'min' (lower is better, e.g. eval/loss) or 'max' "
                        f"(e.g. eval/score)")


class PeekedBatches:
    """A checkpointable batch iterator whose first batch is read up front (``.first``) and still yielded first.

    :func:`fit` compiles the step against the shapes of a real batch before
    training and must not skip that batch. ``get_state``/``set_state`` go to
    the wrapped iterator; restoring a position drops the batch read up front,
    which belongs to the old position.
    """

    def __init__(self, batches: Any):
        self._batches = batches
        self.first = next(batches)
        self._pending = True  # .first not yet yielded

    def __iter__(self):
        return self

    def __next__(self) -> Any:
        if self._pending:
            self._pending = False
            return self.first
        return next(self._batches)

    def get_state(self) -> Any:
        return self._batches.get_state()

    def set_state(self, state: Any) -> None:
        self._batches.set_state(state)
        self._pending = False


def make_evaluator(eval_step: Callable, make_batches: Callable[[], Iterator], num_batches: int,
                   frozen: Any = None) -> Callable:
    """``evaluate(state) -> metrics`` averaged over the first ``num_batches`` held-out batches.

    Each batch's metrics are weighted by its number of real pairs
    (``sum(pair_mask)``) for preference batches, by ``loss_tokens`` when the
    step returns it, else equally, so padding rows of the last batch do not
    count and token means stay exact. The held-out iterator starts fresh each
    time, so every evaluation sees the same examples.
    """
    compiled = jax.jit(eval_step)

    def evaluate(state) -> dict[str, float]:
        totals: dict[str, float] = {}
        weight_sum = 0.0
        for i, batch in enumerate(make_batches()):
            if i >= num_batches:
                break
            m = jax.device_get(compiled(state.params, batch, frozen))
            if "pair_mask" in batch:
                w = global_sum(batch["pair_mask"])
            else:
                w = float(m.get("loss_tokens", 1.0))
            weight_sum += w
            for k, v in m.items():
                if k != "loss_tokens":
                    totals[k] = totals.get(k, 0.0) + float(v) * w
        return {k: v / max(weight_sum, 1e-9) for k, v in totals.items()}

    return evaluate


def count_epoch_batches(make_epoch: Callable[[], Iterator]) -> int:
    """Batches in one pass over the training data: ``make_epoch()`` is iterated to its end, once.

    ``make_epoch`` builds the pipeline for one epoch (``num_epochs=1``, the
    training seed and options, so packing gives the same rows); its batches
    are counted, which tokenizes (and packs) the data once. Every host reads
    the same global batches, so every host counts the same number. Raises
    :class:`UserError` when an epoch holds no batch.
    """
    n = sum(1 for _ in make_epoch())
    if n == 0:
        raise UserError("LoopConfig.num_epochs: one pass over the training data yields no batch (every example "
                        "dropped?); check the data and seq_len, or set LoopConfig.num_steps")
    return n


def _loop_hparams(loop: LoopConfig, num_steps: int, steps_per_epoch: int | None) -> dict[str, Any]:
    """The loop's settings as flat hyperparameters for TensorBoard/W&B, with the step count the run uses."""
    out = {f"loop/{k}": v for k, v in dataclasses.asdict(loop).items() if isinstance(v, (bool, int, float, str))}
    out["loop/num_steps"] = num_steps
    if steps_per_epoch is not None:
        out["loop/steps_per_epoch"] = steps_per_epoch
    return out


def fit(*, run_dir: epath.Path, loss_fn: Callable, params: dict, param_shardings: Any, partitioner: Partitioner,
        batches: MeshBatches, loop: LoopConfig, frozen: Any = None, frozen_shardings: Any = None,
        evaluate: Callable | None = None, flops_per_step: float | None = None, data_stats: Any = None,
        trainable_mask: Any = None, model_config: ModelConfig | None = None,
        epoch_batches: Callable[[], Iterator] | None = None, summary: dict | None = None,
        extra_metrics: Callable[[Any], Mapping] | None = None,
        after_update: Callable[[Any, jax.Array], Any] | None = None) -> Any:
    """Optimizer, sharded state, compiled step, checkpoints and the loop: returns the final state.

    Resumes automatically from ``run_dir/checkpoints``. ``make_optimizer``
    is gin-configured (its ``total_steps`` is the run's ``num_steps``).
    Params holding LoRA adapters train only those (and a score head) unless
    ``trainable_mask`` says otherwise; under any trainable mask the frozen
    leaves also get no gradients (``stop_frozen_gradients``).

    ``loop.num_epochs`` needs ``epoch_batches``, a factory of this host's
    one-epoch pipeline (:func:`count_epoch_batches`). ``loop.best_metric``
    needs ``evaluate``; the best state goes to ``run_dir/checkpoints_best``
    and, with ``loop.export_best``, is the state returned (its step is the
    best step). ``summary``, when given, is updated with what the run
    decided: ``num_steps`` (and ``steps_per_epoch``, ``num_epochs``), the
    best (``best/metric``, ``best/value``, ``best/step``), ``stopped_early``
    and ``stop_reason``. A W&B project without ``wandb`` installed and a
    missing ``epoch_batches``/``evaluate`` raise :class:`UserError` before
    the state is built.

    ``batches`` yields global batches (``next``), or, for online runs, is a
    source whose batches depend on the current state (``next_for(state)``,
    :class:`jaxpost.train.online.RolloutBatches`): the step is then compiled
    on its first batch instead of one read up front. ``extra_metrics(state)``
    is added to every logged record (with the data statistics).
    ``after_update(params, step)`` runs in the step after each update (see
    :func:`jaxpost.train.make_train_step`).
    """
    if loop.best_metric is not None and evaluate is None:
        raise UserError(f"LoopConfig.best_metric={loop.best_metric!r} compares evaluations, but this run has no "
                        f"held-out data; give eval_data or eval_fraction, or unset best_metric")
    if loop.num_epochs is not None and epoch_batches is None:
        raise UserError(f"LoopConfig.num_epochs={loop.num_epochs}: this pipeline cannot count its batches per "
                        f"epoch; set LoopConfig.num_steps instead (and LoopConfig.num_epochs = None)")
    writer = MetricsWriter(run_dir)  # first: a tracking setup that cannot work fails before anything is built
    best = None
    try:
        num_steps, steps_per_epoch = loop.num_steps, None
        if loop.num_epochs is not None:
            steps_per_epoch = count_epoch_batches(epoch_batches)
            n = loop.steps_per_call
            num_steps = -(-loop.num_epochs * steps_per_epoch // n) * n  # the loop runs whole calls
            if is_main_process():
                print(f"[jaxpost] num_epochs={loop.num_epochs} x {steps_per_epoch} batches per epoch -> "
                      f"num_steps={num_steps}", flush=True)
        if trainable_mask is None and has_adapters(params):
            trainable_mask = lora_trainable_mask(params)
        if trainable_mask is not None:
            loss_fn = stop_frozen_gradients(loss_fn, trainable_mask)
        optimizer = make_optimizer(total_steps=num_steps, trainable_mask=trainable_mask)
        abstract = abstract_state(params, optimizer, loop.seed)
        shardings = state_shardings(abstract, param_shardings, partitioner, optimizer)
        state = init_sharded_state(params, optimizer, shardings, seed=loop.seed)
        train_step = make_train_step(loss_fn, optimizer, grad_accum_steps=loop.grad_accum_steps,
                                     after_update=after_update)
        if hasattr(batches, "next_for"):  # batches sampled from the state itself: compile on the first one
            step = _compiled_on_first_batch(train_step, shardings, partitioner, frozen_shardings,
                                            loop.steps_per_call)
        else:
            batches = PeekedBatches(batches)  # compile against real shapes; that batch is still trained on
            step = compile_train_step(train_step, shardings, batch_shardings(batches.first, partitioner),
                                      frozen_shardings, steps_per_call=loop.steps_per_call)
        checkpointer = Checkpointer(run_dir / "checkpoints", save_every=loop.save_every or num_steps,
                                    keep=loop.keep_checkpoints, resume_from=ResumeConfig().from_step)
        write_operative_config(run_dir, model_config)  # the step is built: every value it reads is known
        writer.log_config(gin.operative_config_str(), _loop_hparams(loop, num_steps, steps_per_epoch))
        if loop.best_metric is not None:
            best = BestCheckpoint(run_dir / "checkpoints_best", metric=loop.best_metric, mode=loop.best_mode,
                                  min_delta=loop.min_delta, patience=loop.patience)

        extra_fns = [f for f in (extra_metrics, None if data_stats is None else lambda _s: data_stats.as_metrics())
                     if f is not None]
        extra = (lambda st: {k: v for f in extra_fns for k, v in f(st).items()}) if extra_fns else None
        try:
            state = train(state=state, step_fn=step, batches=batches, frozen=frozen, num_steps=num_steps,
                          checkpointer=checkpointer, eval_fn=evaluate, eval_every=loop.eval_every,
                          log_every=loop.log_every, writer=writer, tokens_per_batch_fn=count_loss_tokens,
                          flops_per_step=flops_per_step, extra_metrics_fn=extra, progress=loop.progress,
                          steps_per_call=loop.steps_per_call, best=best, steps_per_epoch=steps_per_epoch)
        finally:
            checkpointer.close()
        if best is not None and loop.export_best and best.best_step is not None:
            target = abstract_with_shardings(state)
            jax.tree.map(lambda x: x.delete(), state)  # free the last state first: never two on the devices
            state = best.restore(target)
            if is_main_process():
                print(f"[jaxpost] export_best: the run ends with the best state, step {best.best_step} "
                      f"({best.metric} {best.best_value:.6g})", flush=True)
        elif best is not None and loop.export_best and is_main_process():
            print(f"[jaxpost] export_best: no evaluation gave a finite {best.metric}; the run ends with the last "
                  f"state", flush=True)
        if summary is not None:
            summary["num_steps"] = num_steps
            if steps_per_epoch is not None:
                summary.update(num_epochs=loop.num_epochs, steps_per_epoch=steps_per_epoch)
            if best is not None:
                summary.update(best.summary())
    finally:
        if best is not None:
            best.close()
        writer.close()
    return state

def _compiled_on_first_batch(train_step: Callable, shardings: Any, partitioner: Partitioner, frozen_shardings: Any,
                             steps_per_call: int) -> Callable:
    """``step(state, batch, frozen)`` compiled for the shapes of the first batch it is called with."""
    compiled = None

    def step(state, batch, frozen=None):
        nonlocal compiled
        if compiled is None:
            compiled = compile_train_step(train_step, shardings, batch_shardings(batch, partitioner),
                                          frozen_shardings, steps_per_call=steps_per_call)
        return compiled(state, batch, frozen)

    return step


def finish_run(run_dir: str | os.PathLike, config: ModelConfig, state: Any, tokenizer: Any, summary: dict,
               evaluate: Callable | None = None, *, method: str | None = None, init_from: str | None = None,
               data: Mapping[str, Any] | None = None, params: Any = None,
               also: Mapping[str, tuple[ModelConfig, Any, str | None]] | None = None) -> dict:
    """End of a run (offline or online): final held-out evaluation, operative config, HF export, ``summary.json``.

    Also releases the run directory's lock.

    ``method``, ``init_from`` and ``data`` (named data paths, e.g. ``{"train":
    train_data, "eval": eval_data}``) go to the exported model card with the
    final ``summary`` (see :func:`jaxpost.models.export.export`). ``params``
    (default ``state.params``) go to ``run_dir/final``; ``also`` exports more
    models, ``{name: (config, params, init_from)}`` to ``run_dir/<name>``
    (PPO's value model).
    """
    if evaluate is not None:
        summary.update({f"eval/{k}": v for k, v in evaluate(state).items()})
    write_operative_config(run_dir, config)
    card = dict(method=method, data=data, summary=summary)
    export(run_dir, config, state.params if params is None else params, tokenizer, init_from=init_from, **card)
    for name, (other_config, other_params, other_init) in (also or {}).items():
        export(run_dir, other_config, other_params, tokenizer, name=name, init_from=other_init, **card)
    write_summary(run_dir, summary)
    release_run_dirs()
    return summary
