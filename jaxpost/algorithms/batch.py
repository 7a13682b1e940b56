"""Batch specs: the keys (and dtypes) each algorithm reads from a batch."""

from __future__ import annotations

from typing import Mapping

import numpy as np

LM_KEYS: Mapping[str, type] = {
    "tokens": np.int32, "positions": np.int32, "segment_ids": np.int32,
    "targets": np.int32, "loss_mask": np.float32,
}
"""A language-modelling batch (SFT, distillation): ``[B, L]`` each."""

PREFERENCE_KEYS: Mapping[str, type] = {
    **{f"chosen_{k}": v for k, v in LM_KEYS.items()},
    **{f"rejected_{k}": v for k, v in LM_KEYS.items()},
}
"""A preference batch (DPO family, reward model): the LM keys twice.

Optional extras: ``margin`` ``[B]`` (reward model), ``ref_chosen_logps`` and
``ref_rejected_logps`` ``[B]`` (precomputed reference), ``pair_mask`` ``[B]``.
"""


def check_batch(batch: Mapping, spec: Mapping[str, type], what: str) -> None:
    """Raises ``KeyError`` naming every key of ``spec`` missing from ``batch``."""
    missing = [k for k in spec if k not in batch]
    if missing:
        raise KeyError(f"{what} batch is missing {missing}; it has {sorted(batch)}")
