"""``jaxpost plot``: draw the metrics of one or more runs (``metrics.jsonl``) to a PNG."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from etils import epath

from jaxpost import paths
from jaxpost.errors import UserError
from jaxpost.train.metrics import read_jsonl

DEFAULT_METRICS = ("loss", "eval/loss", "eval/accuracy", "eval/token_accuracy", "eval/rewards/accuracies",
                   "objective/scores", "objective/kl", "reward/mean")


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of ``run_dir/metrics.jsonl`` (one JSON object per logged step)."""
    path = paths.resolve(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise UserError(f"{path} not found: is {run_dir} a jaxpost run directory?")
    return read_jsonl(path)


def series(rows: Sequence[dict], metric: str) -> tuple[list[float], list[float]]:
    """``(steps, values)`` of one metric over the logged rows that have it."""
    pts = [(r["step"], r[metric]) for r in rows if metric in r and isinstance(r[metric], (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path | None = None,
              metrics: Sequence[str] | None = None, title: str | None = None) -> epath.Path:
    """One panel per metric, one line per run; returns the PNG path.

    ``metrics`` defaults to those of :data:`DEFAULT_METRICS` that any run
    has; metrics asked for that no run logged are left out (an empty panel
    says nothing), and ``ValueError`` names them if none is left.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {str(d): read_metrics(d) for d in run_dirs}
    present = {k for rows in runs.values() for r in rows for k in r}
    wanted = DEFAULT_METRICS if metrics is None else tuple(metrics)
    metrics = [m for m in wanted if m in present]
    if not metrics:
        raise ValueError(f"None of the metrics {list(wanted)} is in {list(runs)}; logged: {sorted(present)}")
    cols = min(3, len(metrics))
    rows_n = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 3.4 * rows_n), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        for name, rows in runs.items():
            steps, values = series(rows, metric)
            if steps:
                ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=Path(name).name)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(runs) > 1 and ax.get_legend_handles_labels()[0]:  # a metric no run logged has no lines
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = paths.resolve(out) if out else paths.resolve(run_dirs[0]) / "curves.png"
    with paths.atomic_open(out, "wb") as f:  # local or gs://; never a half-drawn PNG
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)
    return out
