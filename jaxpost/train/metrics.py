"""Run metrics: JSONL + TensorBoard (+ W&B) writer, console lines, progress bar, MFU.

Only process 0 writes, so a multi-host run produces one log. Values are
plain Python floats by the time they get here: the loop fetches them from
the devices once per logging interval.

``metrics.jsonl`` keeps the loop's own keys (``loss``, ``eval/loss``...);
TensorBoard and W&B get them grouped as ``train/...`` and ``eval/...``
(:func:`tracking_tag`). The console shows one line per logged step
(:func:`format_log_line`), the same for offline steps and online rollouts.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping

import gin
import jax
import numpy as np

from jaxpost import paths
from jaxpost.errors import UserError

__all__ = ["MetricsWriter", "ProgressBar", "Console", "Stopwatch", "format_log_line", "tracking_tag", "mfu",
           "peak_flops_per_device", "read_jsonl", "PEAK_BF16_FLOPS"]

# Peak dense bf16 FLOP/s per device (per chip for TPUs), from vendor data
# sheets. Matched as case-insensitive substrings of ``device.device_kind``,
# first match wins, so more specific names come first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("v6 lite", 918e12),  # TPU v6e (Trillium)
    ("v6e", 918e12),
    ("v5 lite", 197e12),  # TPU v5e
    ("v5e", 197e12),
    ("v5p", 459e12),
    ("tpu v5", 459e12),   # v5p reports itself as "TPU v5"
    ("tpu v4", 275e12),
    ("b200", 2250e12),
    ("h200", 989e12),
    ("h100 pcie", 756e12),
    ("h100", 989e12),     # SXM / HBM3
    ("a100", 312e12),
)


def peak_flops_per_device(device_kind: str) -> float | None:
    """Peak dense bf16 FLOP/s for a ``device_kind`` string, or None if unknown (e.g. CPU)."""
    kind = device_kind.lower()
    for key, flops in PEAK_BF16_FLOPS:
        if key in kind:
            return flops
    return None


def mfu(flops_per_step: float, step_seconds: float, n_devices: int, device_kind: str) -> float | None:
    """Model FLOPs utilisation ``= flops_per_step / step_seconds / (n_devices * peak)``.

    ``flops_per_step`` counts the model's useful FLOPs for one whole step over
    all devices (e.g. ``6 * n_params * tokens`` for a dense LM). Returns None
    when the peak of ``device_kind`` is unknown (CPU) or ``step_seconds <= 0``.
    """
    peak = peak_flops_per_device(device_kind)
    if peak is None or step_seconds <= 0 or n_devices <= 0:
        return None
    return float(flops_per_step) / float(step_seconds) / (n_devices * peak)


def _scalar(v: Any) -> float | int | bool | None:
    a = np.asarray(v)
    if a.size != 1:
        raise ValueError(f"Metrics must be scalars, got an array of shape {a.shape}")
    x = a.reshape(()).item()
    return x


def tracking_tag(key: str) -> str:
    """TensorBoard/W&B tag of a metrics key: ``eval/...`` as it is, every other key under ``train/``.

    So the dashboards group a run's curves in two sections (``train/loss``,
    ``train/objective/kl``; ``eval/loss``) while ``metrics.jsonl`` keeps the
    plain keys its readers use.
    """
    return key if key.startswith(("train/", "eval/")) else f"train/{key}"


def _import_wandb(project: str) -> Any:
    try:
        import wandb
    except ImportError:
        raise UserError(f"MetricsWriter.wandb_project = {project!r} asks for Weights & Biases logging, but the "
                        f"wandb package is not installed; pip install wandb (and wandb login), or remove the "
                        f"MetricsWriter.wandb_project binding") from None
    return wandb


@gin.configurable
class MetricsWriter:
    """Writes one record per logged step to ``run_dir/metrics.jsonl`` and TensorBoard.

    Args:
      run_dir: created if missing.
      tensorboard: also write TensorBoard event files to ``run_dir/tb``.
      wandb_project: when set, also log to W&B; :class:`UserError` (on every
        process, before any file is written) when ``wandb`` is not installed.
      config: a dict stored with the W&B run.

    TensorBoard and W&B tags are :func:`tracking_tag` of each key
    (``train/loss``, ``eval/loss``); :meth:`log_config` adds the run's gin
    config and hyperparameters.

    Non-finite values are written as JSON ``NaN``/``Infinity`` (Python's json
    default) so a diverging run stays visible in the log.
    """

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = True, wandb_project: str | None = None,
                 config: Mapping[str, Any] | None = None):
        self.run_dir = paths.resolve(run_dir)  # a local path (relative to the cwd) or a gs:// URL
        self.enabled = jax.process_index() == 0
        self.tensorboard = tensorboard
        self._jsonl = self._tb = self._wandb = None
        self._config_pending: tuple[str, dict] | None = None  # log_config's, written once TensorBoard is open
        wandb = _import_wandb(wandb_project) if wandb_project else None  # all processes: fail alike, early
        self._lines: list[str] | None = None  # remote run dirs: the whole file, rewritten at each flush
        self._purge_step: int | None = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if wandb is not None:
            self._wandb = wandb.init(project=wandb_project, dir=os.fspath(self.run_dir), config=dict(config or {}))

    def resume_at(self, step: int) -> None:
        """Drops the records after ``step`` (a resumed run restored that step), so curves never repeat.

        ``metrics.jsonl`` is rewritten atomically without them, and
        TensorBoard is told to discard its events from ``step + 1`` on
        (``purge_step``). Call before the first :meth:`write`.
        """
        if not self.enabled:
            return
        if self._jsonl is not None or self._lines is not None:
            raise RuntimeError("MetricsWriter.resume_at must be called before the first write")
        path = self.run_dir / "metrics.jsonl"
        if path.exists():
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            kept = [ln for ln in lines if ln.strip() and _record_step(ln) <= step]
            if len(kept) != len([ln for ln in lines if ln.strip()]):
                paths.atomic_write_text(path, "".join(kept))
        self._purge_step = step + 1 if step > 0 else None

    def _open(self) -> None:
        path = self.run_dir / "metrics.jsonl"
        if paths.is_remote(path):
            # Object storage has no append: keep the file's lines and upload them whole at each flush.
            self._lines = path.read_text(encoding="utf-8").splitlines(keepends=True) if path.exists() else []
        else:
            self._jsonl = open(os.fspath(path), "a", buffering=1, encoding="utf-8")
        if self.tensorboard:
            tensorboardx = import_tensorboardx()
            _register_tensorboard_object_storage()
            self._tb = tensorboardx.SummaryWriter(os.fspath(self.run_dir / "tb"), purge_step=self._purge_step)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record ``metrics`` (scalars: Python numbers or 0-d/size-1 arrays) at ``step``."""
        if not self.enabled:
            return
        if self._jsonl is None and self._lines is None:
            self._open()
        values = {k: _scalar(v) for k, v in metrics.items()}
        line = json.dumps({"step": int(step), **values}) + "\n"
        if self._lines is not None:
            self._lines.append(line)
        else:
            self._jsonl.write(line)
        if self._tb is not None:
            for k, v in values.items():
                if v is not None:
                    self._tb.add_scalar(tracking_tag(k), float(v), int(step))
            if self._config_pending is not None:
                self._write_config_to_tensorboard(*self._config_pending)
        if self._wandb is not None:
            self._wandb.log({tracking_tag(k): v for k, v in values.items()}, step=int(step))

    def log_config(self, gin_config: str, hparams: Mapping[str, Any] | None = None) -> None:
        """Records the run's configuration with its curves: TensorBoard and W&B (``metrics.jsonl`` is untouched).

        TensorBoard gets ``gin_config`` as a text summary ``config/gin`` at
        step 0 and ``hparams`` (scalars and strings; None values skipped) in
        its HParams tab, both in the run's own event file, written with the
        first record (after a resumed run has dropped its later events). W&B
        gets ``hparams`` as its run config.
        """
        if not self.enabled:
            return
        clean = {k: v for k, v in dict(hparams or {}).items() if v is not None}
        bad = {k: type(v).__name__ for k, v in clean.items() if not isinstance(v, (bool, int, float, str))}
        if bad:
            raise TypeError(f"hparams must be bool, int, float or str; got {bad}")
        if self._wandb is not None:
            self._wandb.config.update(clean, allow_val_change=True)
        if self.tensorboard:
            self._config_pending = (gin_config, clean)
            if self._tb is not None:
                self._write_config_to_tensorboard(gin_config, clean)

    def _write_config_to_tensorboard(self, gin_config: str, hparams: dict) -> None:
        from tensorboardX.summary import hparams as hparams_summary
        self._config_pending = None
        # Indented lines: TensorBoard renders text summaries as Markdown, and this keeps the gin verbatim.
        self._tb.add_text("config/gin", "\n".join("    " + line for line in gin_config.splitlines()), 0)
        if hparams:
            # In this run's own event file (SummaryWriter.add_hparams would open a second run beside it).
            for summary in hparams_summary(hparams, {"train/loss": None, "eval/loss": None}):
                self._tb.file_writer.add_summary(summary, 0)

    def flush(self) -> None:
        """Push buffered records to disk (to the bucket, for a remote run directory)."""
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._lines is not None:
            paths.atomic_write_text(self.run_dir / "metrics.jsonl", "".join(self._lines))
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close every sink; later writes are dropped."""
        if self._lines is not None:
            self.flush()
            self._lines = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _record_step(line: str) -> float:
    try:
        return float(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return float("inf")  # a torn last line of a killed run: drop it with the later steps


class _ObjectStorageEvents:
    """A TensorBoard event file on object storage: buffered, uploaded whole at each flush (epath/gcsfs)."""

    def __init__(self, path: str):
        self.path, self.buffer = path, bytearray()

    def write(self, data: bytes) -> None:
        self.buffer += data

    def flush(self) -> None:
        paths.atomic_write_bytes(self.path, bytes(self.buffer))

    def close(self) -> None:
        self.flush()


class _ObjectStorageEventsFactory:
    def open(self, path: str) -> _ObjectStorageEvents:
        return _ObjectStorageEvents(path)

    def directory_check(self, path: str) -> None:
        pass  # object stores have no directories to create


def import_tensorboardx():
    """The ``tensorboardX`` package, imported without importing torch.

    Its writer module imports torch when torch is installed, only so that
    torch tensors pass as values (about 1.6 s of every run's start on 2
    cores); jaxpost writes Python floats. A ``None`` entry in
    ``sys.modules`` makes that one import fail as if torch were absent, for
    the duration of this import only; a process that already imported
    torch, or tensorboardX, is left as it is.
    """
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        import tensorboardX
        return tensorboardX
    sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        import tensorboardX
    finally:
        del sys.modules["torch"]
    return tensorboardX


def _register_tensorboard_object_storage() -> None:
    """tensorboardX's own ``gs://`` writer needs google-cloud-storage; route it through epath/gcsfs instead."""
    from tensorboardX import record_writer
    record_writer.register_writer_factory("gs", _ObjectStorageEventsFactory())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All records of a ``metrics.jsonl`` file, in order; a line that is not JSON is named ``path:line``."""
    rows = []
    with paths.resolve(path).open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not JSON ({e})") from None
    return rows


class ProgressBar:
    """tqdm bar over steps showing loss and tokens/s; tqdm supplies rate and ETA. Process 0 only."""

    def __init__(self, total: int, initial: int = 0, disable: bool | None = None, unit: str = "step"):
        from tqdm.auto import tqdm
        if disable is None:
            disable = jax.process_index() != 0
        self._bar = tqdm(total=total, initial=initial, unit=unit, disable=disable, dynamic_ncols=True)

    def write(self, line: str) -> None:
        """Prints ``line`` above the bar (``tqdm.write``: the bar is cleared and redrawn, not garbled)."""
        self._bar.write(line)

    def update(self, step: int, loss: float | None = None, tokens_per_s: float | None = None) -> None:
        """Move the bar to ``step`` (absolute) and show the latest loss and throughput."""
        post = {}
        if loss is not None:
            post["loss"] = f"{loss:.4g}" if math.isfinite(loss) else str(loss)
        if tokens_per_s is not None:
            post["tok/s"] = f"{tokens_per_s:.4g}"
        if post:
            self._bar.set_postfix(post, refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        """Finish the bar."""
        self._bar.close()


# What one console line shows, in this order (label, key); every ``eval/`` key of the record follows.
CONSOLE_KEYS: tuple[tuple[str, str], ...] = (
    ("loss", "loss"), ("grad_norm", "grad_norm"), ("lr", "learning_rate"), ("epoch", "epoch"),
    ("tok/s", "tokens_per_s"), ("mfu", "mfu"),
    # online runs (rollout metrics, jaxpost.generate.rollout)
    ("scores", "objective/scores"), ("kl", "objective/kl"), ("length", "rollout/completion_length"),
    ("gen tok/s", "rollout/tokens_per_s"),
)


def _format_value(key: str, value: Any) -> str:
    if isinstance(value, (bool, np.bool_)) or isinstance(value, (int, np.integer)):
        return str(value)
    v = float(value)
    if not math.isfinite(v):
        return str(v)
    if key == "learning_rate":
        return f"{v:.3e}"
    if key == "mfu":
        return f"{100 * v:.1f}%"
    if key == "epoch":
        return f"{v:.2f}"
    if key.endswith("tokens_per_s") and abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.4g}"


def format_log_line(step: int, total: int, record: Mapping[str, Any], unit: str = "step") -> str:
    """One console line for a logged step (or online rollout): ``step  10/100 | loss 2.31 | ... | eval/loss 2.4``.

    Shows the keys of :data:`CONSOLE_KEYS` that ``record`` holds (train loss,
    gradient norm, learning rate, epoch, tokens/s, MFU; for online runs the
    scores, KL, completion length and sampling speed), then every ``eval/``
    key in sorted order. The
    same formatter serves offline and online runs (one loop), so
    their lines read alike.
    """
    parts = [f"{unit} {step:>{len(str(total))}}/{total}"]
    parts += [f"{label} {_format_value(key, record[key])}" for label, key in CONSOLE_KEYS
              if record.get(key) is not None]
    parts += [f"{key} {_format_value(key, record[key])}" for key in sorted(record)
              if key.startswith("eval/") and record[key] is not None]
    return " | ".join(parts)


def interactive() -> bool:
    """Whether a progress bar would be seen: stderr is a terminal, or the run is in a notebook.

    Elsewhere (a pod's log file, ``nohup``, a pipe) every redraw of a bar
    would be kept as text, so runs print their logged lines alone.
    """
    try:
        if sys.stderr.isatty():
            return True
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False
    return "ipykernel" in sys.modules


class Console:
    """What a run prints, on the main process only: a tqdm bar (``progress`` and :func:`interactive`) and one line per logged step.

    Lines go through the bar's ``tqdm.write`` when the bar is on (so they sit
    above it, ungarbled) and to stdout when it is off (``progress=False``):
    logged steps are printed either way.
    """

    def __init__(self, total: int, initial: int = 0, progress: bool = True, unit: str = "step"):
        self.total, self.unit = total, unit
        self.enabled = jax.process_index() == 0
        show = progress and self.enabled and interactive()
        self.bar = ProgressBar(total, initial=initial, unit=unit) if show else None

    def update(self, step: int, loss: float | None = None, tokens_per_s: float | None = None) -> None:
        """Moves the bar (if any) to ``step``, showing the latest loss and throughput."""
        if self.bar is not None:
            self.bar.update(step, loss, tokens_per_s)

    def print(self, line: str) -> None:
        """Prints one line (main process only), above the bar when there is one."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def log(self, step: int, record: Mapping[str, Any]) -> None:
        """Prints :func:`format_log_line` of ``record`` at ``step``."""
        self.print(format_log_line(step, self.total, record, self.unit))

    def close(self) -> None:
        """Finishes the bar."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Stopwatch:
    """Wall time between :meth:`lap` calls (``time.perf_counter``)."""

    def __init__(self):
        self._t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self._t = now - self._t, now
        return dt
