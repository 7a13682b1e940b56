"""A run directory belongs to one run: a lock, a config check on resume, a restart that keeps the old run.

``open_run_dir`` is the first thing every run does (before any model loads):

1. **Lock.** ``RUN_DIR/jaxpost.lock`` is created only if absent (``O_EXCL``
   locally, a create-only precondition on GCS) and names the host and
   process holding it. A second run into the same directory refuses with
   that name. A lock whose process is gone (same host, pid not running) or
   whose heartbeat (refreshed every ``HEARTBEAT_S``) is older than
   ``STALE_AFTER_S`` is stale and taken over with a warning.
2. **Resume check.** When the directory holds checkpoints, the gin config of
   this launch is compared with the one the run was started with
   (``config.gin``). A change that matters (data, model, method,
   hyperparameters: any binding outside :data:`RESUMABLE_KEYS`) is refused,
   naming each key with its old and new value, unless
   ``ResumeConfig.on_config_change`` says ``'allow'`` (continue with the new
   values) or ``'restart'`` (move the old run aside to
   ``RUN_DIR.previous-<UTC time>`` and start from step 0). Nothing is
   deleted.

Only process 0 touches the directory; the others learn the outcome through
a broadcast, so every process raises the same error.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import json
import logging
import os
import re
import socket
import threading
import time
from typing import Any, Mapping

import gin
import jax
import numpy as np
from etils import epath

from jaxpost import paths
from jaxpost.distributed import is_main_process
from jaxpost.errors import UserError
from jaxpost.models.config import ModelConfig, model_config_gin

log = logging.getLogger("jaxpost")

__all__ = ["ResumeConfig", "RunLock", "open_run_dir", "config_changes", "release_run_dirs", "LOCK_NAME",
           "RESUMABLE_KEYS", "prepare_run_dir", "write_operative_config", "write_summary"]

LOCK_NAME = "jaxpost.lock"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0

# Bindings a resumed run may change without it being another run: how long
# it goes, how often it logs, evaluates and saves, where files go, and
# resume controls. Matched against ``configurable.param`` (scopes ignored).
RESUMABLE_KEYS = (
    "LoopConfig.num_steps", "LoopConfig.num_epochs", "LoopConfig.log_every", "LoopConfig.eval_every",
    "LoopConfig.eval_batches", "LoopConfig.save_every", "LoopConfig.keep_checkpoints", "LoopConfig.progress",
    "LoopConfig.patience", "LoopConfig.min_delta",
    "OnlineConfig.num_rollouts", "OnlineConfig.save_every", "OnlineConfig.keep_checkpoints",
    "OnlineConfig.log_every", "OnlineConfig.eval_every", "OnlineConfig.samples_every", "OnlineConfig.progress",
    "OnlineConfig.patience", "OnlineConfig.min_delta",
    "*.run_dir", "MetricsWriter.*", "compilation_cache.*", "ResumeConfig.*",
    "make_mesh.*",  # a checkpoint restores onto any mesh
    "ModelConfig.scan_layers",  # ... and into either layout of the layers
)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ResumeConfig:
    """What a run does with a run directory that already holds a run.

    Attributes:
      on_config_change: ``'refuse'`` (default) stops with the list of changed
        keys; ``'allow'`` resumes with the new values; ``'restart'`` moves the
        old run aside (``RUN_DIR.previous-<time>``) and starts over.
        Command line: ``--on_config_change=allow``.
      from_step: resume from this checkpoint step instead of the newest; the
        later checkpoints are moved to ``RUN_DIR/abandoned_checkpoints/`` (the
        way back from a NaN halt). Allows config changes, listing them.
        Command line: ``--resume_from_step=N``.
    """

    on_config_change: str = "refuse"
    from_step: int | None = None

    def __post_init__(self):
        if self.on_config_change not in ("refuse", "allow", "restart"):
            raise UserError(f"ResumeConfig.on_config_change must be 'refuse', 'allow' or 'restart', "
                            f"got {self.on_config_change!r}")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``RUN_DIR/jaxpost.lock``: held by one process at a time, stale locks taken over (see module doc)."""

    def __init__(self, run_dir: epath.Path):
        self.path = run_dir / LOCK_NAME
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), "since": _now(), "heartbeat": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}  # half-written by a process killed mid-write: no owner to honour

    def _stale(self, holder: dict) -> str | None:
        """Why ``holder``'s lock may be taken over, or None when it is live."""
        if not holder:
            return "the lock file is unreadable"
        if holder.get("host") == self.info["host"]:
            if holder.get("pid") == self.info["pid"]:
                return "it is this process's own lock"
            if not _pid_alive(int(holder.get("pid", -1))):
                return f"process {holder.get('pid')} is no longer running"
            return None
        age = time.time() - float(holder.get("heartbeat", 0))
        if age > STALE_AFTER_S:
            return f"its heartbeat is {age:.0f} s old"
        return None

    def acquire(self) -> None:
        """Takes the lock or raises :class:`UserError` naming the run that holds it."""
        for _ in range(3):
            if paths.create_exclusive(self.path, json.dumps(self.info).encode()):
                self._start_heartbeat()
                return
            holder = self._holder()
            if holder is None:
                continue  # released between our create and our read
            why = self._stale(holder)
            if why is None:
                raise UserError(
                    f"run directory {self.path.parent} is in use by another run (host {holder.get('host')}, "
                    f"process {holder.get('pid')}, since {holder.get('since')}); wait for it to finish or stop "
                    f"it, or give this run another run_dir. If that process is gone, delete {self.path}.")
            if why != "it is this process's own lock":
                log.warning("Taking over the lock of %s: %s (held by host %s, process %s since %s).",
                            self.path.parent, why, holder.get("host"), holder.get("pid"), holder.get("since"))
            self.path.unlink(missing_ok=True)
        raise UserError(f"could not take the lock {self.path}: other processes keep creating it")

    def _start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(HEARTBEAT_S):
                try:
                    self.info["heartbeat"] = time.time()
                    paths.atomic_write_text(self.path, json.dumps(self.info))
                except Exception as e:  # a missed heartbeat must not kill the run
                    log.warning("Could not refresh the run lock %s: %s", self.path, e)

        self._thread = threading.Thread(target=beat, name="jaxpost-run-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stops the heartbeat and removes the lock if this process still holds it."""
        self._stop.set()
        holder = self._holder()
        if holder and holder.get("host") == self.info["host"] and holder.get("pid") == self.info["pid"]:
            self.path.unlink(missing_ok=True)


_HELD: dict[str, RunLock] = {}


def release_run_dirs() -> None:
    """Releases every run lock this process holds (at the end of a run, and at exit).

    A lock that cannot be removed (storage unreachable, or at interpreter exit
    after the storage client has shut down) is left behind with a warning: the
    next run finds this process gone and takes it over.
    """
    while _HELD:
        _, lock = _HELD.popitem()
        try:
            lock.release()
        except Exception as e:  # never mask the run's own outcome with a clean-up failure
            log.warning("Could not remove the run lock %s (%s); the next run takes it over.", lock.path, e)


atexit.register(release_run_dirs)

_LINE = re.compile(r"^([A-Za-z_][\w./]*)\s*=\s*(.*)$")


def config_bindings(text: str) -> dict[str, str]:
    """``{"scope/configurable.param": "value"}`` of a gin config text (``gin.config_str()`` output)."""
    out: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _LINE.match(line)
        if m and not line[0].isspace():
            key = m.group(1)
            out[key] = m.group(2).strip()
        elif key is not None:  # a value continued over several lines (lists, dicts)
            out[key] += " " + line.strip()
    return out


def _resumable(key: str) -> bool:
    name = key.rsplit("/", 1)[-1]
    cls, _, param = name.rpartition(".")
    return any(p == name or (p.startswith("*.") and p[2:] == param) or (p.endswith(".*") and p[:-2] == cls)
               for p in RESUMABLE_KEYS)


def config_changes(old: str, new: str) -> list[tuple[str, str | None, str | None]]:
    """Bindings that differ between two gin config texts and matter: ``(key, old, new)``; None = unset."""
    a, b = config_bindings(old), config_bindings(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not _resumable(k)]


def _has_checkpoints(run_dir: epath.Path) -> bool:
    ckpt = run_dir / "checkpoints"
    return ckpt.exists() and any(p.name.isdigit() for p in ckpt.iterdir())


def _move_aside(run_dir: epath.Path) -> epath.Path:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    aside = run_dir.parent / f"{run_dir.name}.previous-{stamp}"
    for child in list(run_dir.iterdir()):
        if child.name != LOCK_NAME:
            paths.move(child, aside / child.name)
    return aside


def _describe(changes) -> str:
    return "; ".join(f"{k}: {old if old is not None else '(unset)'} -> {new if new is not None else '(unset)'}"
                     for k, old, new in changes)


def _open_on_main(run_dir: epath.Path, resume: ResumeConfig, config: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir)
    lock.acquire()
    _HELD[os.fspath(run_dir)] = lock
    saved = run_dir / "config.gin"
    if _has_checkpoints(run_dir) and saved.exists():
        changes = config_changes(saved.read_text(), config)
        if changes and resume.from_step is None and resume.on_config_change == "refuse":
            lock.release()
            _HELD.pop(os.fspath(run_dir), None)
            raise UserError(
                f"run directory {run_dir} holds a run started with another config, and resuming it would mix "
                f"the two: {_describe(changes)}. To continue it with the new values pass "
                f"--on_config_change=allow; to start over (the old run is moved to "
                f"{run_dir.name}.previous-<time>, not deleted) pass --on_config_change=restart; or use "
                f"another run_dir.")
        if changes and resume.on_config_change == "restart" and resume.from_step is None:
            aside = _move_aside(run_dir)
            print(f"[jaxpost] config changed ({_describe(changes)}): the old run was moved to {aside}; "
                  f"starting over in {run_dir}", flush=True)
        elif changes:
            print(f"[jaxpost] resuming {run_dir} with changed config: {_describe(changes)}", flush=True)
            paths.atomic_write_text(run_dir / "config.previous.gin", saved.read_text())
    paths.atomic_write_text(saved, config)


def open_run_dir(run_dir: str | os.PathLike, resume: ResumeConfig | None = None) -> epath.Path:
    """Takes ``run_dir`` for this run (lock, resume check, ``config.gin``); returns it resolved.

    ``run_dir`` is relative to the working directory or a ``gs://``/``s3://``
    URL. Raises :class:`UserError` when another live run holds the directory
    or when a resumed run's config changed in a way that matters (see the
    module docstring). The lock is released by :func:`release_run_dirs`
    (called when a run finishes, and at exit).
    """
    resume = resume or ResumeConfig()
    path = paths.resolve(run_dir)
    config = gin.config_str()
    error = None
    if jax.process_index() == 0:
        try:
            _open_on_main(path, resume, config)
        except UserError as e:
            error = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
        if int(failed) and error is None:
            raise UserError(f"run directory {path} could not be opened (process 0 says why)")
    if error is not None:
        raise error
    return path


def prepare_run_dir(run_dir: str | os.PathLike) -> epath.Path:
    """Takes ``run_dir`` for this run and returns it resolved (a local absolute path or a ``gs://`` URL).

    Locks it, checks a resumed run's config against the one it started with,
    and writes ``config.gin`` (see :func:`open_run_dir`;
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

def write_summary(run_dir: str | os.PathLike, summary: Mapping[str, Any]) -> None:
    """``run_dir/summary.json`` (main process): final metrics of the run, for scripts and reports."""
    if is_main_process():
        paths.atomic_write_text(paths.resolve(run_dir) / "summary.json",
                                json.dumps(summary, indent=2, sort_keys=True, default=float))
