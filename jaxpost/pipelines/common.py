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
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import gin
import jax
import jax.numpy as jnp
import numpy as np

from jaxpost import models
from jaxpost.distributed import is_main_process
from jaxpost.models.config import ModelConfig
from jaxpost.models.hf import load_hf, save_hf
from jaxpost.models.lora import apply_lora, has_adapters, merge_lora, save_adapters, stop_frozen_gradients
from jaxpost.models.lora import trainable_mask as lora_trainable_mask
from jaxpost.sharding import Partitioner
from jaxpost.train import (Checkpointer, MetricsWriter, abstract_state, batch_shardings, compile_train_step,
                           init_sharded_state, make_optimizer, make_train_step, state_shardings, train)

log = logging.getLogger("jaxpost")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """How long and how a run trains: steps, logging, evaluation, checkpoints."""

    num_steps: int = 100
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


def prepare_run_dir(run_dir: str | os.PathLike) -> Path:
    """Creates ``run_dir`` and writes the gin config the run was started with."""
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        (path / "config.gin").write_text(gin.config_str())
    return path


def write_operative_config(run_dir: Path) -> None:
    """The operative gin config (every value the run actually read)."""
    if is_main_process():
        (run_dir / "operative_config.gin").write_text(gin.operative_config_str())


def load_model(model: ModelConfig | None, init_from: str | None, partitioner: Partitioner, *,
               seed: int = 0, head: str | None = None) -> tuple[ModelConfig, Any, dict]:
    """``(config, graphdef, params)`` from a Hugging Face directory or a fresh init.

    ``init_from`` is a local HF model directory (``config.json`` +
    safetensors, e.g. the ``final/`` directory every jaxpost run exports) or
    None for a random init of ``model``. Shapes come from the checkpoint;
    numerics (``dtype``, ``remat``) from ``model`` when given. ``head``
    converts between heads: an LM checkpoint loaded with ``head="score"``
    keeps its body and gets a fresh scalar head (reward/value model from an
    SFT policy). With ``model.lora`` set, LoRA adapters are added to the
    loaded or initialised base (:func:`jaxpost.models.lora.apply_lora`) and
    :func:`fit` then trains only the adapters (and a score head).
    """
    lora = model.lora if model is not None else None
    if init_from is None:
        if model is None:
            raise ValueError("Either a ModelConfig or init_from (a Hugging Face model directory) is needed")
        config = model.replace(lora=None) if head is None else model.replace(head=head, lora=None)
        graphdef, params = models.create(config, seed=seed, partitioner=partitioner)
    else:
        config, graphdef, params = load_hf(init_from, partitioner=partitioner)
        if model is not None:
            config = config.replace(dtype=model.dtype, remat=model.remat)
        if head is not None and head != config.head:
            config, graphdef, params = _switch_head(config, params, head, partitioner, seed)
        else:
            graphdef, _ = models.abstract(config)
    if lora is not None:
        config, graphdef, params, _ = apply_lora(config, params, lora, seed=seed, partitioner=partitioner)
    return config, graphdef, params


def _switch_head(config: ModelConfig, params: dict, head: str, partitioner: Partitioner, seed: int):
    """Same body, new head: fresh ``score`` (or ``lm_head``) weights, the rest reused."""
    new_config = config.replace(head=head)
    graphdef, fresh = models.create(new_config, seed=seed, partitioner=partitioner)
    merged = dict(params)
    for k in ("lm_head", "score"):
        merged.pop(k, None)
    for k in fresh:
        if k not in merged:
            merged[k] = fresh[k]
    if new_config.head == "score" or new_config.tie_embeddings:
        merged = {k: v for k, v in merged.items() if k != "lm_head"}
    return new_config, graphdef, merged


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


def fit(*, run_dir: Path, loss_fn: Callable, params: dict, param_shardings: Any, partitioner: Partitioner,
        batches: MeshBatches, loop: LoopConfig, frozen: Any = None, frozen_shardings: Any = None,
        evaluate: Callable | None = None, flops_per_step: float | None = None, data_stats: Any = None,
        trainable_mask: Any = None) -> Any:
    """Optimizer, sharded state, compiled step, checkpoints and the loop: returns the final state.

    Resumes automatically from ``run_dir/checkpoints``. ``make_optimizer``
    is gin-configured (its ``total_steps`` is the run's ``num_steps``).
    Params holding LoRA adapters train only those (and a score head) unless
    ``trainable_mask`` says otherwise; under any trainable mask the frozen
    leaves also get no gradients (``stop_frozen_gradients``).
    """
    if trainable_mask is None and has_adapters(params):
        trainable_mask = lora_trainable_mask(params)
    if trainable_mask is not None:
        loss_fn = stop_frozen_gradients(loss_fn, trainable_mask)
    optimizer = make_optimizer(total_steps=loop.num_steps, trainable_mask=trainable_mask)
    abstract = abstract_state(params, optimizer, loop.seed)
    shardings = state_shardings(abstract, param_shardings, partitioner)
    state = init_sharded_state(params, optimizer, shardings, seed=loop.seed)
    first = next(batches)  # compile against real shapes; the batch is used again below
    step = compile_train_step(
        make_train_step(loss_fn, optimizer, grad_accum_steps=loop.grad_accum_steps,
                        mixed_precision=loop.mixed_precision),
        shardings, batch_shardings(first, partitioner), frozen_shardings, steps_per_call=loop.steps_per_call)
    checkpointer = Checkpointer(run_dir / "checkpoints", save_every=loop.save_every or loop.num_steps,
                                keep=loop.keep_checkpoints)
    writer = MetricsWriter(run_dir)

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
        state = train(state=state, step_fn=step, batches=_Replay(), frozen=frozen, num_steps=loop.num_steps,
                      checkpointer=checkpointer, eval_fn=evaluate, eval_every=loop.eval_every,
                      log_every=loop.log_every, writer=writer, tokens_per_batch_fn=count_loss_tokens,
                      flops_per_step=flops_per_step, extra_metrics_fn=extra, progress=loop.progress,
                      steps_per_call=loop.steps_per_call)
    finally:
        writer.close()
        checkpointer.close()
    return state


def export(run_dir: Path, config: ModelConfig, params: dict, tokenizer: Any = None, name: str = "final") -> Path:
    """Writes the trained weights (and tokenizer) as a Hugging Face directory ``run_dir/name``.

    With LoRA (``config.lora``) the adapters alone also go to
    ``run_dir/<name>_adapters`` and ``run_dir/name`` holds the merged model.
    """
    out = run_dir / name
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        params = multihost_utils.process_allgather(params, tiled=True)
    if config.lora is not None:
        if is_main_process():
            save_adapters(run_dir / f"{name}_adapters", params, config.lora)
        config, params = merge_lora(config, params)
    if is_main_process():
        extra = {}
        if tokenizer is not None:
            extra = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                     if getattr(tokenizer, k, None) is not None}
        save_hf(out, config, params, extra_config=extra)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
    return out


def finish_run(run_dir: Path, config: ModelConfig, state: Any, tokenizer: Any, summary: dict,
               evaluate: Callable | None = None) -> dict:
    """End of an offline run: final held-out evaluation, operative config, HF export, ``summary.json``."""
    if evaluate is not None:
        summary.update({f"eval/{k}": v for k, v in evaluate(state).items()})
    write_operative_config(run_dir)
    export(run_dir, config, state.params, tokenizer)
    write_summary(run_dir, summary)
    return summary


def write_summary(run_dir: Path, summary: Mapping[str, Any]) -> None:
    """``run_dir/summary.json``: final metrics of the run, for pipelines and reports."""
    if is_main_process():
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=float))


def report_data_stats(stats: Any, what: str) -> dict[str, int]:
    """Logs what the input pipeline truncated or dropped (never silent)."""
    metrics = stats.as_metrics()
    bad = {k: v for k, v in metrics.items() if v and not k.endswith("examples")}
    if bad:
        print(f"[jaxpost] {what} data: {metrics['data/examples']} examples seen; " +
              ", ".join(f"{k.split('/', 1)[1]}={v}" for k, v in sorted(bad.items())), flush=True)
    return metrics
