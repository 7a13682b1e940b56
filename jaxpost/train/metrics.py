"""Run metrics: JSONL + TensorBoard (+ W&B) writer, progress bar, MFU.

Only process 0 writes, so a multi-host run produces one log. Values are
plain Python floats by the time they get here: the loop fetches them from
the devices once per logging interval.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping

import gin
import jax
import numpy as np

__all__ = ["MetricsWriter", "ProgressBar", "Stopwatch", "mfu", "peak_flops_per_device", "read_jsonl", "PEAK_BF16_FLOPS"]

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


@gin.configurable
class MetricsWriter:
    """Writes one record per logged step to ``run_dir/metrics.jsonl`` and TensorBoard.

    Args:
      run_dir: created if missing.
      tensorboard: also write TensorBoard event files to ``run_dir/tb``.
      wandb_project: when set and ``wandb`` is installed, also log to W&B.
      config: a dict stored with the W&B run.

    Non-finite values are written as JSON ``NaN``/``Infinity`` (Python's json
    default) so a diverging run stays visible in the log.
    """

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = True, wandb_project: str | None = None,
                 config: Mapping[str, Any] | None = None):
        self.run_dir = os.fspath(run_dir)
        self.enabled = jax.process_index() == 0
        self._jsonl = self._tb = self._wandb = None
        if not self.enabled:
            return
        os.makedirs(self.run_dir, exist_ok=True)
        self._jsonl = open(os.path.join(self.run_dir, "metrics.jsonl"), "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(self.run_dir, "tb"))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                wandb = None
            if wandb is not None:
                self._wandb = wandb.init(project=wandb_project, dir=self.run_dir, config=dict(config or {}))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record ``metrics`` (scalars: Python numbers or 0-d/size-1 arrays) at ``step``."""
        if not self.enabled:
            return
        values = {k: _scalar(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if v is not None:
                    self._tb.add_scalar(k, float(v), int(step))
        if self._wandb is not None:
            self._wandb.log(values, step=int(step))

    def flush(self) -> None:
        """Push buffered records to disk."""
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close every sink; later writes are dropped."""
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


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All records of a ``metrics.jsonl`` file, in order; a line that is not JSON is named ``path:line``."""
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not JSON ({e})") from None
    return rows


class ProgressBar:
    """tqdm bar over steps showing loss and tokens/s; tqdm supplies rate and ETA. Process 0 only."""

    def __init__(self, total: int, initial: int = 0, disable: bool | None = None):
        from tqdm.auto import tqdm
        if disable is None:
            disable = jax.process_index() != 0
        self._bar = tqdm(total=total, initial=initial, unit="step", disable=disable, dynamic_ncols=True)

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


class Stopwatch:
    """Wall time between :meth:`lap` calls (``time.perf_counter``)."""

    def __init__(self):
        self._t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self._t = now - self._t, now
        return dt
