"""What every training run shares: run directory, model loading, batches on the
mesh, evaluation, and `fit` (optimizer + sharded step + checkpoints + loop).

The per-algorithm scripts (``sft.py``, ``reward.py``, ``dpo.py``...) read top
to bottom in one sitting and call these pieces.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import gin
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from jaxpost import models, paths
from jaxpost.distributed import is_main_process
from jaxpost.models.config import ModelConfig, model_config_gin
from jaxpost.models.hf import load_hf, save_hf
from jaxpost.errors import UserError
from jaxpost.models.lora import ADAPTER_CONFIG, apply_lora, has_adapters, merge_lora, save_adapters, stop_frozen_gradients
from jaxpost.models.lora import trainable_mask as lora_trainable_mask
from jaxpost.sharding import Partitioner
from jaxpost.train.run_dir import ResumeConfig, open_run_dir, release_run_dirs
from jaxpost.train import (BestCheckpoint, Checkpointer, MetricsWriter, abstract_state, abstract_with_shardings,
                           batch_shardings, compile_train_step, init_sharded_state, make_optimizer, make_train_step,
                           state_shardings, train)

log = logging.getLogger("jaxpost")


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
    mixed_precision: str | None = None
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
        for name in ("num_steps", "num_epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"LoopConfig.{name} must be >= 1, got {value}")
        if self.best_metric is None and (self.export_best or self.patience):
            raise UserError(f"LoopConfig: export_best={self.export_best} and patience={self.patience} choose by an "
                            f"evaluation metric; set LoopConfig.best_metric (e.g. 'eval/loss') and eval_every")
        if self.best_metric is not None and self.eval_every <= 0:
            raise UserError(f"LoopConfig.best_metric={self.best_metric!r} needs evaluations: set "
                            f"LoopConfig.eval_every > 0 and give held-out data")
        if self.best_mode not in ("min", "max"):
            raise UserError(f"LoopConfig.best_mode={self.best_mode!r}: use 'min' (e.g. eval/loss) or 'max'")
        if self.patience < 0 or self.min_delta < 0:
            raise UserError(f"LoopConfig: patience={self.patience} and min_delta={self.min_delta} must be >= 0")


def prepare_run_dir(run_dir: str | os.PathLike) -> epath.Path:
    """Takes ``run_dir`` for this run and returns it resolved (a local absolute path or a ``gs://`` URL).

    Locks it, checks a resumed run's config against the one it started with,
    and writes ``config.gin`` (see :func:`jaxpost.train.run_dir.open_run_dir`;
    ``ResumeConfig`` says what to do on a change). Every file of the run
    goes through the returned ``epath.Path``.
    """
    return open_run_dir(run_dir, ResumeConfig())


def write_operative_config(run_dir: epath.Path, model_config: ModelConfig | None = None) -> None:
    """``operative_config.gin``: every value the run has read so far, rewritten atomically.

    Written once the step is built (so an interrupted run has it) and again
    at the end. ``model_config``, the model as actually used (its shapes from
    ``init_from``'s config.json, not from bindings it overrode), is appended.
    """
    if not is_main_process():
        return
    text = gin.operative_config_str()
    if model_config is not None:
        # gin's record holds the bound ModelConfig values, some of which init_from overrode: replace them.
        ours = ("ModelConfig.", "LoraConfig.", "RopeScaling.", "# Parameters for ModelConfig:",
                "# Parameters for LoraConfig:", "# Parameters for RopeScaling:")
        text = "\n".join(line for line in text.splitlines() if not line.startswith(ours))
        text += "\n\n# The model as used (shapes from init_from when given):\n" + model_config_gin(model_config) + "\n"
    paths.atomic_write_text(run_dir / "operative_config.gin", text)


# How a run computes, not what the weights are: with ``init_from`` these come from the run's ModelConfig, every
# other field (shapes, rope, norms, architecture) from the checkpoint's config.json.
RUN_FIELDS = ("dtype", "remat", "attention", "stored_logits_mib", "lora")


def _bound_fields(model: ModelConfig) -> set[str]:
    """Fields of ``model`` the user set: different from the dataclass default, or bound in gin (unscoped)."""
    out = set()
    for f in dataclasses.fields(model):
        if getattr(model, f.name) != f.default:
            out.add(f.name)
            continue
        try:  # a binding equal to the default (e.g. ModelConfig.num_layers = 2) is still the user's intent
            gin.query_parameter(f"ModelConfig.{f.name}")
            out.add(f.name)
        except ValueError:
            pass
    return out


def _warn_overridden(model: ModelConfig, loaded: ModelConfig, init_from: str, bound: set[str]) -> None:
    """One warning (main process) naming each bound field that the checkpoint's config.json overrides."""
    skip = set(RUN_FIELDS) | {"head", "param_dtype"}  # head: the pipeline's choice; param_dtype: honoured if bound
    clashes = [f"ModelConfig.{k} = {getattr(model, k)!r} (checkpoint: {getattr(loaded, k)!r})"
               for k in sorted(bound - skip) if getattr(model, k) != getattr(loaded, k)]
    if clashes and is_main_process():
        # stacklevel=2: one source location (load_model) for every caller, so Python's default filter shows it
        # once even when a run loads the same checkpoint twice (PPO's policy and value model).
        warnings.warn(f"init_from={init_from!r}: the checkpoint's config.json overrides the run's model bindings "
                      f"{'; '.join(clashes)}; the checkpoint's values are used. Drop these bindings (e.g. the model "
                      f"preset include) to silence this.", UserWarning, stacklevel=2)


def load_model(model: ModelConfig | None, init_from: str | None, partitioner: Partitioner, *,
               seed: int = 0, head: str | None = None) -> tuple[ModelConfig, Any, dict]:
    """``(config, graphdef, params)`` from a Hugging Face directory or a fresh init.

    ``init_from`` is a local HF model directory (``config.json`` +
    safetensors, e.g. the ``final/`` directory every jaxpost run exports) or
    None for a random init of ``model``. With ``init_from``, shapes come from
    the checkpoint and the fields in :data:`RUN_FIELDS` (``dtype``,
    ``remat``, ``attention``, ``stored_logits_mib``, ``lora``) from
    ``model`` when given; ``param_dtype`` is the checkpoint's unless
    ``model`` sets it. A field ``model`` sets (non-default or bound in gin)
    that the checkpoint overrides is named in one ``UserWarning``. ``head``
    converts between heads: an LM checkpoint loaded with ``head="score"``
    keeps its body and gets a fresh scalar head (reward/value model from an
    SFT policy). With ``model.lora`` set, LoRA adapters are added to the
    loaded or initialised base (:func:`jaxpost.models.lora.apply_lora`) and
    :func:`fit` then trains only the adapters (and a score head).
    Raises :class:`UserError` for neither ``model`` nor ``init_from``, and
    for an ``init_from`` that holds LoRA adapters instead of a model.
    """
    lora = model.lora if model is not None else None
    if init_from is None:
        if model is None:
            raise UserError("load_model: no model to build; give a ModelConfig (e.g. sft.model = @ModelConfig()) "
                            "or init_from = '<Hugging Face model directory>'")
        config = model.replace(lora=None) if head is None else model.replace(head=head, lora=None)
        graphdef, params = models.create(config, seed=seed, partitioner=partitioner)
    else:
        src = Path(init_from)
        if (src / ADAPTER_CONFIG).exists() and not (src / "config.json").exists():
            raise UserError(f"init_from={str(init_from)!r} holds LoRA adapters, not a model; use the merged model "
                            f"directory beside it (a LoRA run exports it as final/), or merge the adapters first")
        bound = _bound_fields(model) if model is not None else set()
        dtype = model.param_dtype if "param_dtype" in bound else None  # cast while loading: no second copy
        config, graphdef, params = load_hf(init_from, partitioner=partitioner, dtype=dtype)
        if model is not None:
            _warn_overridden(model, config, init_from, bound)
            # Not lora: the checkpoint is the plain base, apply_lora below adds the run's adapters to it.
            config = config.replace(**{k: getattr(model, k) for k in RUN_FIELDS if k != "lora"})
        if head is not None and head != config.head:
            config, graphdef, params = _switch_head(config, params, head, partitioner, seed)
        else:
            graphdef, _ = models.abstract(config)
    if lora is not None:
        config, graphdef, params, _ = apply_lora(config, params, lora, seed=seed, partitioner=partitioner)
    return config, graphdef, params


def _switch_head(config: ModelConfig, params: dict, head: str, partitioner: Partitioner, seed: int):
    """Same body, new head -> ``(config, graphdef, params)``: fresh ``score`` (or ``lm_head``) weights.

    The body's arrays are reused as they are. The new head has the values
    :func:`jaxpost.models.create` gives it with ``seed``; only the head is
    materialised (the rest of the init is dead code in the compiled
    function), so no second body is ever allocated.
    """
    new_config = config.replace(head=head)
    graphdef, shapes = models.abstract(new_config)
    body = {k: v for k, v in params.items() if k in shapes and k not in ("lm_head", "score")}
    new_keys = [k for k in shapes if k not in body]
    shardings = None
    if partitioner is not None:
        axes = models.logical_axes(new_config)
        shardings = partitioner.shardings({k: axes[k] for k in new_keys}, {k: shapes[k] for k in new_keys})

    def init_head():
        _, fresh = models.create(new_config, seed=seed)
        return {k: fresh[k] for k in new_keys}

    return new_config, graphdef, {**body, **jax.jit(init_head, out_shardings=shardings)()}


def on_mesh(batch: Mapping[str, Any], partitioner: Partitioner) -> dict[str, jax.Array]:
    """This host's rows of a batch -> global arrays split over the batch axes.

    Every host passes its own ``[B / num_hosts, ...]`` rows; the result is
    the ``[B, ...]`` global array (``jax.make_array_from_process_local_data``).
    Non-array entries (raw prompt text) are dropped.
    """
    out = {}
    for k, v in batch.items():
        if not isinstance(v, np.ndarray):
            continue
        sharding = partitioner.batch_sharding(v.ndim)
        out[k] = jax.make_array_from_process_local_data(sharding, v)
    return out


class MeshBatches:
    """Wraps a host-local batch iterator so ``next`` yields global sharded arrays.

    Passes ``get_state``/``set_state`` through, so checkpoints hold the
    underlying pipeline's position.
    """

    def __init__(self, it: Any, partitioner: Partitioner, transform: Callable[[dict], dict] | None = None):
        self.it, self.partitioner, self.transform = it, partitioner, transform

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, jax.Array]:
        batch = next(self.it)
        if self.transform is not None:
            batch = self.transform(batch)
        return on_mesh(batch, self.partitioner)

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state) -> None:
        self.it.set_state(state)


@jax.jit
def _global_sums(arrays: list[jax.Array]) -> list[jax.Array]:
    # Replicated scalar outputs: every process holds the result, whereas a
    # batch spanning several processes cannot be fetched by any one of them.
    return [jnp.sum(jnp.asarray(x, jnp.float32)) for x in arrays]


def global_sum(x: jax.Array | np.ndarray) -> float:
    """``sum(x)`` over the whole global array, on every process.

    Arrays this process holds entirely are summed on the host; a global
    array split over several processes is summed on the devices (a collective:
    every process must call this in the same order).
    """
    if isinstance(x, np.ndarray) or x.is_fully_addressable:
        return float(np.asarray(jax.device_get(x), np.float64).sum())
    return float(jax.device_get(_global_sums([x])[0]))


@jax.jit
def _real_tokens(segment_ids: list[jax.Array]) -> jax.Array:
    return sum(jnp.count_nonzero(s) for s in segment_ids)  # a replicated scalar: every process holds it


def count_loss_tokens(batch: Mapping[str, jax.Array]) -> int | jax.Array:
    """Real (non-padding) tokens of the global batch: ``sum(segment_ids != 0)``, for tokens/s.

    Host (numpy) batches are counted on the host. Device batches are counted
    on their devices and the count is returned as a device scalar, not
    read: fetching it would make the host wait for the step before (and, for
    a batch over several processes, for a collective). :func:`jaxpost.train.train`
    reads the counts at log steps only.
    """
    keys = [k for k in batch if k.endswith("segment_ids")]
    if all(isinstance(batch[k], np.ndarray) for k in keys):
        return sum(int(np.count_nonzero(batch[k])) for k in keys)
    return _real_tokens([batch[k] for k in keys])


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

    ``make_epoch`` builds this host's pipeline for one epoch (``num_epochs=1``,
    the training seed and options, so packing gives the same rows); its
    batches are counted, which tokenizes (and packs) the data once. With
    several processes the largest count of any host is returned (on every
    host), so each one reads at least its whole share. Raises
    :class:`UserError` when an epoch holds no batch.
    """
    n = sum(1 for _ in make_epoch())
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        n = int(np.max(multihost_utils.process_allgather(np.asarray([n], np.int32))))
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
        epoch_batches: Callable[[], Iterator] | None = None, summary: dict | None = None) -> Any:
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
        shardings = state_shardings(abstract, param_shardings, partitioner)
        state = init_sharded_state(params, optimizer, shardings, seed=loop.seed)
        first = next(batches)  # compile against real shapes; the batch is used again below
        step = compile_train_step(
            make_train_step(loss_fn, optimizer, grad_accum_steps=loop.grad_accum_steps,
                            mixed_precision=loop.mixed_precision),
            shardings, batch_shardings(first, partitioner), frozen_shardings, steps_per_call=loop.steps_per_call)
        checkpointer = Checkpointer(run_dir / "checkpoints", save_every=loop.save_every or num_steps,
                                    keep=loop.keep_checkpoints, resume_from=ResumeConfig().from_step)
        write_operative_config(run_dir, model_config)  # the step is built: every value it reads is known
        writer.log_config(gin.operative_config_str(), _loop_hparams(loop, num_steps, steps_per_epoch))
        if loop.best_metric is not None:
            best = BestCheckpoint(run_dir / "checkpoints_best", metric=loop.best_metric, mode=loop.best_mode,
                                  min_delta=loop.min_delta, patience=loop.patience)

        def replay_first():
            yield first
            yield from batches

        class _Replay:  # the first batch, then the rest; state access goes to the real iterator
            def __init__(self):
                self._gen = None

            def __next__(self):
                if self._gen is None:
                    self._gen = replay_first()
                return next(self._gen)

            def get_state(self):
                return batches.get_state()

            def set_state(self, s):
                batches.set_state(s)
                self._gen = iter(batches)  # a restored position invalidates the peeked batch

        extra = (lambda _state: data_stats.as_metrics()) if data_stats is not None else None
        try:
            state = train(state=state, step_fn=step, batches=_Replay(), frozen=frozen, num_steps=num_steps,
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


def export(run_dir: str | os.PathLike, config: ModelConfig, params: dict, tokenizer: Any = None,
           name: str = "final", *, method: str | None = None, init_from: str | None = None,
           data: Mapping[str, Any] | None = None, summary: Mapping[str, Any] | None = None) -> epath.Path:
    """Writes the trained weights, tokenizer and model card as a Hugging Face directory ``run_dir/name``.

    The directory is built locally and swapped in whole
    (:func:`jaxpost.paths.staged_dir`; uploaded when ``run_dir`` is a
    ``gs://`` URL): an interrupted export leaves the previous one intact.
    With a tokenizer, ``generation_config.json``'s ``eos_token_id`` lists
    every id jaxpost's sampler stops at (:func:`jaxpost.data.tokenizer.stop_token_ids`:
    eos and the chat template's end-of-turn token), so ``transformers``'
    ``generate`` stops at the end of an assistant turn too. ``README.md`` is
    the model card of :func:`jaxpost.pipelines.model_card.model_card`, from
    ``method``, ``init_from``, ``data`` (named data paths) and ``summary``
    (final metrics). With LoRA (``config.lora``) the adapters alone also go
    to ``run_dir/<name>_adapters`` and ``run_dir/name`` holds the merged model.
    Returns ``run_dir/name``.
    """
    from jaxpost.data.tokenizer import stop_token_ids
    from jaxpost.pipelines.model_card import model_card

    root = paths.resolve(run_dir)
    out = root / name
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        params = multihost_utils.process_allgather(params, tiled=True)
    lora = config.lora
    if lora is not None:
        if is_main_process():
            with paths.staged_dir(root / f"{name}_adapters") as local:
                save_adapters(local, params, lora)
        config, params = merge_lora(config, params)
    if is_main_process():
        extra, generation, stops = {}, {}, []
        if tokenizer is not None:
            extra = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                     if getattr(tokenizer, k, None) is not None}
            stops = stop_token_ids(tokenizer)
            if len(stops) > 1:  # one id stays an int, as config.json has it
                generation = {"eos_token_id": stops}
        card = model_card(out, config, params, tokenizer=tokenizer, method=method, init_from=init_from, data=data,
                          summary=summary, stop_ids=stops, lora=lora)
        with paths.staged_dir(out) as local:
            save_hf(local, config, params, extra_config=extra, generation_config=generation)
            if tokenizer is not None:
                tokenizer.save_pretrained(local)
            paths.atomic_write_text(os.path.join(local, "README.md"), card)
    return out


def finish_run(run_dir: str | os.PathLike, config: ModelConfig, state: Any, tokenizer: Any, summary: dict,
               evaluate: Callable | None = None, *, method: str | None = None, init_from: str | None = None,
               data: Mapping[str, Any] | None = None) -> dict:
    """End of an offline run: final held-out evaluation, operative config, HF export, ``summary.json``.

    ``method``, ``init_from`` and ``data`` (named data paths, e.g. ``{"train":
    train_data, "eval": eval_data}``) go to the exported model card with the
    final ``summary`` (see :func:`export`).
    """
    if evaluate is not None:
        summary.update({f"eval/{k}": v for k, v in evaluate(state).items()})
    write_operative_config(run_dir, config)
    export(run_dir, config, state.params, tokenizer, method=method, init_from=init_from, data=data, summary=summary)
    write_summary(run_dir, summary)
    release_run_dirs()
    return summary


def write_summary(run_dir: Path, summary: Mapping[str, Any]) -> None:
    """``run_dir/summary.json``: final metrics of the run, for pipelines and reports."""
    if is_main_process():
        paths.atomic_write_text(paths.resolve(run_dir) / "summary.json",
                                json.dumps(summary, indent=2, sort_keys=True, default=float))


def report_data_stats(stats: Any, what: str) -> dict[str, int]:
    """Logs what the input pipeline truncated or dropped (never silent)."""
    metrics = stats.as_metrics()
    bad = {k: v for k, v in metrics.items() if v and not k.endswith("examples")}
    if bad:
        print(f"[jaxpost] {what} data: {metrics['data/examples']} examples seen; " +
              ", ".join(f"{k.split('/', 1)[1]}={v}" for k, v in sorted(bad.items())), flush=True)
    return metrics
