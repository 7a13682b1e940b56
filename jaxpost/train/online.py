"""What the online runs (PPO, GRPO/RLOO, online DPO) share: the update loop and its checkpoints.

An online run alternates rollouts and updates. :class:`OnlineTrainer` owns
the optimizer, the sharded :class:`jaxpost.train.TrainState`, the one
compiled train step, the metrics writer and the checkpointer. Checkpoints
are taken at rollout boundaries and hold the train state, the prompt
iterator's position and the online extras (rollout index, KL coefficient),
so a restarted run continues from the same rollout with the same results:
sampling keys and minibatch orders are functions of ``(seed, rollout)``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import gin
import jax
import numpy as np

from jaxpost import paths
from jaxpost.models.lora import has_adapters, trainable_mask as lora_trainable_mask, without_adapters
from jaxpost.sharding import Partitioner
from jaxpost.train import (Checkpointer, MetricsWriter, NonFiniteLossError, abstract_state, abstract_with_shardings,
                           batch_shardings, compile_train_step, format_log_line, init_sharded_state, make_optimizer,
                           make_train_step, state_shardings)
from jaxpost.train.run_dir import ResumeConfig
from jaxpost.train.trainable import stop_frozen_gradients


@gin.configurable
@dataclasses.dataclass(frozen=True)
class OnlineConfig:
    """How long and how an online run trains.

    ``num_rollouts`` rollout batches of ``prompts_per_rollout`` prompts
    (``* group_size`` completions); checkpoints every ``save_every``
    rollouts (0: only at the end), the newest ``keep_checkpoints`` kept.
    ``seed`` fixes the initialisation, prompt order, sampling keys and
    minibatch orders.
    """

    num_rollouts: int = 100
    prompts_per_rollout: int = 8
    max_prompt_len: int = 128
    save_every: int = 0
    keep_checkpoints: int = 2
    seed: int = 0


def rollout_rng(seed: int, rollout: int) -> jax.Array:
    """Sampling key of rollout ``rollout``: ``fold_in(PRNGKey(seed), rollout)`` (resume-stable)."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), rollout)


def minibatch_orders(num_rows: int, minibatch_size: int, epochs: int, seed: int, rollout: int) -> list[np.ndarray]:
    """Row indices of every minibatch of a rollout: ``epochs`` shuffled passes, each split in order.

    The permutation of pass ``e`` is ``default_rng([seed, rollout, e])``:
    the same on resume. ``minibatch_size`` must divide ``num_rows``.
    """
    if minibatch_size < 1 or num_rows % minibatch_size:
        raise ValueError(f"minibatch_size={minibatch_size} must divide the {num_rows} rows of a rollout batch")
    out = []
    for e in range(epochs):
        perm = np.random.default_rng([seed, rollout, e]).permutation(num_rows).astype(np.int32)
        out.extend(perm[i:i + minibatch_size] for i in range(0, num_rows, minibatch_size))
    return out


def mean_metrics(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Per-key mean over the updates of one rollout (fetched from the devices once)."""
    records = jax.device_get(list(records))
    keys = {k for r in records for k in r if k != "is_finite"}
    return {k: float(np.mean([np.asarray(r[k], np.float64) for r in records if k in r])) for k in sorted(keys)}


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


class OnlineTrainer:
    """Optimizer, sharded state, one compiled step, metrics and checkpoints of an online run.

    ``total_updates`` (optimizer steps over the whole run) sets the
    learning-rate schedule of the gin-configured :func:`make_optimizer`.
    """

    def __init__(self, run_dir: Path, loss_fn: Callable, params: Any, param_shardings: Any,
                 partitioner: Partitioner, online: OnlineConfig, total_updates: int, frozen: Any = None,
                 frozen_shardings: Any = None):
        self.partitioner, self.online, self.frozen, self.frozen_shardings = partitioner, online, frozen, frozen_shardings
        # With LoRA adapters only they (and score heads) train, as in offline runs.
        mask = lora_trainable_mask(params) if has_adapters(params) else None
        if mask is not None:
            loss_fn = stop_frozen_gradients(loss_fn, mask)
        self.optimizer = make_optimizer(total_steps=max(total_updates, 1), trainable_mask=mask)
        self.shardings = state_shardings(abstract_state(params, self.optimizer, online.seed), param_shardings,
                                         partitioner, self.optimizer)
        self.state = init_sharded_state(params, self.optimizer, self.shardings, seed=online.seed)
        self._step = make_train_step(loss_fn, self.optimizer)
        self.step_fn = None  # compiled on the first minibatch, whose shapes every later one shares
        self._take = None
        self.checkpointer = Checkpointer(paths.resolve(run_dir) / "checkpoints",
                                         save_every=online.save_every or online.num_rollouts,
                                         keep=online.keep_checkpoints, resume_from=ResumeConfig().from_step)
        self.writer = MetricsWriter(run_dir)
        if jax.process_index() == 0:  # the step and optimizer are built: an interrupted run keeps its config
            paths.atomic_write_text(paths.resolve(run_dir) / "operative_config.gin", gin.operative_config_str())

    def restore(self, prompts: Any) -> dict | None:
        """Restores the newest checkpoint (state and prompt position); returns its online extras or None."""
        restored = self.checkpointer.restore_latest(abstract_with_shardings(self.state))
        self.writer.resume_at(0 if restored is None else restored.step)  # records are per rollout
        if restored is None:
            return None
        self.state = restored.state
        prompts.set_state(restored.data_state["prompts"])
        return dict(restored.data_state["online"])

    def _compile(self, batch: Mapping[str, jax.Array]) -> None:
        shardings = batch_shardings(batch, self.partitioner)
        self.step_fn = compile_train_step(self._step, self.shardings, shardings, self.frozen_shardings)
        # Minibatch rows are gathered on the devices straight into the step's input layout.
        self._take = jax.jit(lambda b, idx: jax.tree.map(lambda x: x[idx], b), out_shardings=shardings)

    def update(self, batch: Mapping[str, jax.Array], orders: Sequence[np.ndarray]) -> dict[str, float]:
        """One train step per index array of ``orders`` (rows of ``batch``); mean metrics.

        Raises :class:`NonFiniteLossError` before anything is saved when a
        step's loss or gradient norm is not finite.
        """
        records = []
        for idx in orders:
            if self.step_fn is None:
                self._compile({k: jax.ShapeDtypeStruct((len(idx),) + v.shape[1:], v.dtype) for k, v in batch.items()})
            mb = self._take(dict(batch), jax.device_put(idx, self.partitioner.replicated))
            self.state, metrics = self.step_fn(self.state, mb, self.frozen)
            records.append(metrics)
        if not records:
            return {}
        flags = jax.device_get([m["is_finite"] for m in records])
        if not all(bool(f) for f in flags):
            self.checkpointer.wait_until_finished()
            saved = self.checkpointer.all_steps()
            raise NonFiniteLossError(int(jax.device_get(self.state.step)), saved[-1] if saved else None, saved)
        return mean_metrics(records)

    def save(self, rollout: int, prompts: Any, extras: Mapping[str, Any]) -> None:
        """Checkpoints after rollout number ``rollout`` (1-based) when due or last."""
        last = rollout == self.online.num_rollouts
        if last or self.checkpointer.should_save(rollout):
            self.checkpointer.save(rollout, self.state, force=last,
                                   data_state={"prompts": prompts.get_state(), "online": dict(extras)})

    def log(self, rollout: int, record: Mapping[str, Any]) -> None:
        """Writes one record per rollout (its step is the rollout number) and prints its console line.

        The line is the offline loop's (:func:`jaxpost.train.format_log_line`):
        ``rollout 3/100 | loss ... | lr ... | reward ... | kl ...``, main process only.
        """
        values = {k: float(v) for k, v in record.items()}
        self.writer.write(rollout, values)
        if jax.process_index() == 0:
            print(format_log_line(rollout, self.online.num_rollouts, values, unit="rollout"), flush=True)

    def close(self) -> None:
        """Waits for pending saves and closes the writers."""
        self.writer.close()
        self.checkpointer.close()


def check_single_process(what: str) -> None:
    """Online runs decode and score on one host; raise clearly on multi-process launches."""
    if jax.process_count() > 1:
        raise RuntimeError(f"{what} runs in one process (rollouts are decoded and scored on one host); "
                                  f"got jax.process_count()={jax.process_count()}")
