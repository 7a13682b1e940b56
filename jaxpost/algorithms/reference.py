"""Reference log-probs computed once and cached, so DPO trains with one model in memory."""

from __future__ import annotations

import io
import os
from typing import Any, Callable

import datasets
import jax
import numpy as np

from jaxpost import paths
from jaxpost.algorithms.preference import pair_column, pair_sequence_logps
from jaxpost.sharding import Partitioner
from jaxpost.train.batches import MeshBatches


def reference_logps(graphdef, config, ref_params, batches: MeshBatches,
                    ld_alpha: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Summed response log-probs of chosen and rejected under the reference, per source row.

    Returns ``(row_index, ref_chosen_logps, ref_rejected_logps)`` over every
    real (non-padding) pair the batches hold, gathered from all hosts. Either
    batch layout (one pair per row or packed): pairs are keyed by their
    ``row_index`` (-1 on padding rows and empty packed slots). ``ld_alpha``:
    LD-DPO's weighted sums, as the loss that reads them takes them.
    """
    @jax.jit
    def score(params, batch):
        c, r, _, _ = pair_sequence_logps(graphdef, config, params, batch, ld_alpha=ld_alpha)
        return pair_column(batch, "row_index"), c, r

    idx, chosen, rejected = [], [], []
    for batch in batches:
        i, c, r = score(ref_params, batch)
        got = _to_host({"i": i, "c": c, "r": r})
        keep = got["i"] >= 0
        idx.append(got["i"][keep]); chosen.append(got["c"][keep]); rejected.append(got["r"][keep])
    return (np.concatenate(idx) if idx else np.zeros(0, np.int64),
            np.concatenate(chosen) if chosen else np.zeros(0, np.float32),
            np.concatenate(rejected) if rejected else np.zeros(0, np.float32))


def _to_host(tree: dict) -> dict:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return {k: np.asarray(v) for k, v in multihost_utils.process_allgather(tree, tiled=True).items()}
    return {k: np.asarray(jax.device_get(v)) for k, v in tree.items()}


def with_reference_logps(rows: Any, graphdef, config, ref_params, make_pipeline: Callable, partitioner: Partitioner,
                         cache_dir: str | os.PathLike, ld_alpha: float | None = None) -> datasets.Dataset:
    """``rows`` plus columns ``ref_chosen_logps``/``ref_rejected_logps``, computed once and cached.

    ``make_pipeline(rows, num_epochs=1, shuffle=False)`` must yield
    preference batches with ``row_index``. The values are stored in
    ``cache_dir/ref_logps.npz`` and reused when the run resumes. Rows the
    pipeline drops (counted in its stats) get NaN and stay dropped.
    ``ld_alpha`` (LD-DPO's weighting, :func:`reference_logps`) is stored
    with them; a cache made with another value is refused.
    """
    cache = paths.resolve(cache_dir) / "ref_logps.npz"
    n = len(rows)
    if cache.exists():
        saved = np.load(io.BytesIO(cache.read_bytes()))
        chosen, rejected = saved["chosen"], saved["rejected"]
        if len(chosen) != n:
            raise ValueError(f"{cache} holds {len(chosen)} rows but the dataset has {n}; delete it to recompute")
        stored = float(saved["ld_alpha"]) if "ld_alpha" in saved else None  # older caches: plain sums
        stored = None if stored is not None and np.isnan(stored) else stored
        if stored != ld_alpha:
            raise ValueError(f"{cache} holds reference log-probs summed with ld_alpha={stored}, this run uses "
                             f"make_dpo_loss.ld_alpha={ld_alpha}; delete it to recompute")
    else:
        idx, c, r = reference_logps(graphdef, config, ref_params,
                                    MeshBatches(make_pipeline(rows, num_epochs=1, shuffle=False), partitioner),
                                    ld_alpha=ld_alpha)
        chosen = np.full(n, np.nan, np.float32)
        rejected = np.full(n, np.nan, np.float32)
        chosen[idx], rejected[idx] = c, r
        if jax.process_index() == 0:
            buf = io.BytesIO()
            np.savez(buf, chosen=chosen, rejected=rejected, ld_alpha=np.nan if ld_alpha is None else ld_alpha)
            paths.atomic_write_bytes(cache, buf.getvalue())
    if not isinstance(rows, datasets.Dataset):
        rows = datasets.Dataset.from_list(list(rows))
    for name in ("ref_chosen_logps", "ref_rejected_logps"):
        if name in rows.column_names:
            rows = rows.remove_columns(name)
    return rows.add_column("ref_chosen_logps", chosen.tolist()).add_column("ref_rejected_logps", rejected.tolist())
