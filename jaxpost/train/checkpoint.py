"""Orbax checkpoints of a run: train state, data-iterator position, gin config.

Each step directory holds three items saved together with
``ocp.args.Composite``:

* ``state``: the :class:`TrainState` (sharded arrays, ``StandardSave``); each
  host writes its own shards, restore reads straight into the *target*
  shardings, so a run saved on one mesh resumes on another;
* ``data``: the iterator's ``get_state()`` (``JsonSave``, written by
  process 0). Every host reads the same global batches (see
  :mod:`jaxpost.data.pipeline`), so every host's position is the same and
  a run resumes exactly also on another number of hosts;
* ``config``: ``{"gin": operative config text}`` (``JsonSave``).

Orbax writes a step to ``<step>.orbax-checkpoint-tmp-*`` and renames it when
complete (on GCS it marks a finished step with ``commit_success.txt``), so a
save interrupted by a crash is never listed as a step. A listed step that
cannot be read (a damaged file) is skipped on resume with a warning: the
newest step that restores is used and the damaged ones are moved to
``abandoned_checkpoints/`` beside the checkpoint directory, never deleted.
"""

from __future__ import annotations

import logging
import os
from typing import Any, NamedTuple

import gin
import jax
import orbax.checkpoint as ocp

from jaxpost import paths
from jaxpost.errors import UserError
from jaxpost.models.layout import is_scanned, to_layout
from jaxpost.train.state import TrainState

log = logging.getLogger("jaxpost")

__all__ = ["Checkpointer", "Restored", "abstract_with_shardings"]


class Restored(NamedTuple):
    """What :meth:`Checkpointer.restore_latest` returns."""

    step: int
    state: TrainState
    data_state: Any
    config: str
    data_states: list | None = None
    """The saved iterator states: ``[data_state]``, or every process's state
    for checkpoints written when hosts read disjoint shards (``process_states``)."""


def abstract_with_shardings(tree: Any, shardings: Any = None) -> Any:
    """``jax.ShapeDtypeStruct`` tree carrying the target sharding of every leaf.

    With ``shardings=None`` each leaf's own ``.sharding`` is used (pass a live
    state to restore into its layout); otherwise ``shardings`` is a matching
    tree of shardings (restore onto another mesh).
    """
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class _Manager(ocp.CheckpointManager):
    """Orbax's manager without its own questions to JAX's preemption service.

    The training loop asks the service whether to stop, once per step with
    ids of its own (:class:`jaxpost.train.interrupt.StopRequests`); Orbax
    asks it at every save with the step number, which would move the
    service's counter and so the step the processes agree to stop at. A
    stop's save is the loop's (``force``), so Orbax never needs the answer.
    """

    def reached_preemption(self, step: int) -> bool:
        del step
        return False


@gin.configurable
class Checkpointer:
    """Saves every ``save_every`` steps, keeps the newest ``keep``, asynchronously by default.

    Args:
      directory: the run's checkpoint directory (local path or ``gs://``).
      save_every: save at steps divisible by this (``should_save``); ``save(...,
        force=True)`` saves at any step.
      keep: number of most recent checkpoints kept (older ones deleted).
      async_save: write in a background thread; the arrays are copied off the
        devices first, so the caller may donate the state right after
        :meth:`save` returns. Call :meth:`wait_until_finished` before exiting.
      resume_from: :meth:`restore_latest` restores this step instead of the
        newest and moves the later steps to ``abandoned_checkpoints/``
        (``ResumeConfig.from_step``, ``--resume_from_step``).
    """

    def __init__(self, directory: str | os.PathLike, save_every: int = 1000, keep: int = 3,
                 async_save: bool = True, resume_from: int | None = None):
        if save_every < 1 or keep < 1:
            raise ValueError(f"save_every and keep must be >= 1, got save_every={save_every} keep={keep}")
        # Orbax and TensorStore need absolute paths; a user's run_dir is relative to the cwd.
        self.directory = os.fspath(paths.resolve(directory))
        self.save_every = save_every
        self.resume_from = resume_from
        # The save policy is ours (step % save_every == 0); Orbax's would also save the first step.
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=1, max_to_keep=keep, enable_async_checkpointing=async_save,
            create=True, cleanup_tmp_directories=True)
        # Handlers named up front, so that a fresh manager can read a step's metadata before any save or restore.
        self._manager = _Manager(self.directory, options=options, item_handlers={
            "state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
            "config": ocp.JsonCheckpointHandler()})

    def __repr__(self) -> str:
        return f"Checkpointer({self.directory!r}, save_every={self.save_every}, steps={self.all_steps()})"

    def should_save(self, step: int) -> bool:
        """Whether :meth:`save` at ``step`` would write: ``step % save_every == 0`` and not saved yet."""
        return step % self.save_every == 0 and step not in self._manager.all_steps()

    def save(self, step: int, state: TrainState, data_state: Any = None, config: str | None = None,
             force: bool = False) -> bool:
        """Save ``state``, the iterator state (JSON-serialisable) and the gin config.

        ``config`` defaults to ``gin.operative_config_str()``. Returns whether a
        save was started (False when ``step`` is not a save step and not
        forced, or is already saved).
        """
        if step in self._manager.all_steps() or not (force or step % self.save_every == 0):
            return False
        if config is None:
            config = gin.operative_config_str()
        data = {"state": data_state}  # the same on every process: process 0 writes it
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data),
            config=ocp.args.JsonSave({"gin": config}),
        )
        return bool(self._manager.save(step, args=args, force=True))

    def latest_step(self) -> int | None:
        """Newest *complete* step on disk (unfinished temporary directories are ignored), or None."""
        self._manager.reload()
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """All complete steps on disk, ascending."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def restore(self, step: int, abstract_state: TrainState) -> Restored:
        """Restore ``step`` into the shapes, dtypes and shardings of ``abstract_state``.

        ``abstract_state``: a tree of ``jax.ShapeDtypeStruct`` with ``sharding``
        set (:func:`abstract_with_shardings`); arrays are read directly into
        those shards, whatever mesh the checkpoint was written from.

        ``data_state`` is the saved iterator state, the same for every
        process, so a run resumes exactly on any number of processes. An
        older checkpoint that kept ``process_states`` (hosts then read
        disjoint shards) restores process 0's state, with a warning when it
        was written by several processes (its position is of one host's shard).
        A checkpoint whose layers are in the other layout than
        ``abstract_state``'s (``ModelConfig.scan_layers`` changed) is restored
        in its own layout and converted (:mod:`jaxpost.models.layout`).
        """
        if step not in self.all_steps():
            raise FileNotFoundError(f"No complete checkpoint for step {step} in {self.directory}; "
                                    f"available: {self.all_steps()}")
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
            if getattr(leaf, "sharding", None) is None:
                raise ValueError(f"abstract_state{jax.tree_util.keystr(path)} has no sharding; "
                                 "build the target with abstract_with_shardings(...)")
        target_scanned, saved_scanned = is_scanned(abstract_state.params), self._saved_scanned(step)
        convert = None not in (target_scanned, saved_scanned) and target_scanned != saved_scanned
        source = to_layout(abstract_state, saved_scanned) if convert else abstract_state
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(source),
            data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(),
        ))
        state = out["state"]
        if convert:  # ModelConfig.scan_layers changed since the save: same numbers, other layout
            log.warning("Checkpoint step %d holds the layers %s; converting them to the run's %s layout.", step,
                        "stacked (scan_layers)" if saved_scanned else "unrolled", "scanned" if target_scanned
                        else "unrolled")
            shardings = jax.tree.map(lambda x: x.sharding, abstract_state)
            # Eager (not one jit): the state's scalars may sit on other devices than its sharded arrays.
            state = jax.device_put(to_layout(state, target_scanned), shardings)
        data = out["data"]
        states = data.get("process_states")  # older checkpoints: one state per host's shard
        if states is not None and len(states) > 1:
            log.warning("Checkpoint step %d was written by %d processes that each read a shard of the rows (an "
                        "older jaxpost): the data iterators resume from process 0's position; the example order "
                        "differs from the saved run.", step, len(states))
        return Restored(step=step, state=state, data_state=data["state"], config=out["config"]["gin"],
                        data_states=states if states is not None else [data["state"]])

    def _saved_scanned(self, step: int) -> bool | None:
        """Whether ``step`` saved its params' layers stacked (scanned layout); None when it cannot tell."""
        try:
            layers = self._manager.item_metadata(step)["state"]["params"]["layers"]
        except Exception:  # no metadata, or a tree without layers: restore as asked
            return None
        return not all(str(k).isdigit() for k in layers.keys())

    def data_states(self, step: int) -> list:
        """The saved iterator states at ``step`` (reads only the ``data`` item), as in :class:`Restored`."""
        if step not in self.all_steps():
            raise FileNotFoundError(f"No complete checkpoint for step {step} in {self.directory}; "
                                    f"available: {self.all_steps()}")
        data = self._manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
        return data.get("process_states") or [data["state"]]

    def restore_latest(self, abstract_state: TrainState) -> Restored | None:
        """Restores the newest step that can be read (or ``resume_from``); None when there is none.

        Steps that fail to restore (damaged files) are skipped with a warning
        naming them and moved to ``abandoned_checkpoints/`` once an older step
        has restored. When no listed step restores, raises :class:`UserError`
        naming each step and its error (nothing is moved: the cause may be a
        changed model rather than damage).
        """
        steps = self.all_steps()
        if self.resume_from is not None:
            if self.resume_from not in steps:
                raise UserError(f"--resume_from_step={self.resume_from}: no complete checkpoint for that step in "
                                f"{self.directory}; saved steps: {steps or 'none'}")
            restored = self.restore(self.resume_from, abstract_state)
            later = [s for s in steps if s > self.resume_from]
            if later:
                self._abandon(later, f"resuming from step {self.resume_from} as asked")
            return restored
        failures = []
        for step in reversed(steps):
            try:
                restored = self.restore(step, abstract_state)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # tensorstore, JSON, missing files: the step is unreadable
                log.warning("Checkpoint step %d in %s cannot be restored (%s: %s); trying the previous one.",
                            step, self.directory, type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
                failures.append((step, e))
                continue
            if failures:
                self._abandon([s for s, _ in failures], f"unreadable; resumed from step {step}")
            return restored
        if failures:
            detail = "; ".join(f"step {s}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                               for s, e in failures)
            raise UserError(f"no checkpoint in {self.directory} can be restored into this run ({detail}). If the "
                            f"model or optimizer changed, start a new run_dir (or --on_config_change=restart); if "
                            f"the files are damaged, move the checkpoints away and rerun.")
        return None

    def _abandon(self, steps: list[int], why: str) -> None:
        """Moves ``steps`` out of the checkpoint directory to ``../abandoned_checkpoints/<step>``."""
        aside = paths.resolve(self.directory).parent / "abandoned_checkpoints"
        if jax.process_index() == 0:
            for step in steps:
                src = paths.resolve(self.directory) / str(step)
                dst = aside / str(step)
                n = 1
                while dst.exists():  # an earlier abandoned step of the same number is kept too
                    dst, n = aside / f"{step}.{n}", n + 1
                paths.move(src, dst)
            log.warning("Moved checkpoint step(s) %s to %s (%s).", ", ".join(map(str, steps)), aside, why)
            print(f"[jaxpost] checkpoint step(s) {', '.join(map(str, steps))} moved to {aside} ({why})", flush=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("jaxpost_abandon_checkpoints")
        self._manager.reload()

    def wait_until_finished(self) -> None:
        """Block until every pending asynchronous save is on disk and finalized."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release the manager's resources."""
        self._manager.close()
