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

PACKED_PREFERENCE_KEYS: Mapping[str, type] = {
    **LM_KEYS, "pair_ids": np.int32, "pair_sides": np.int32, "pair_mask": np.float32,
}
"""A packed preference batch (DPO family, reward model; layout in :mod:`jaxpost.data.pair_packing`).

Token keys ``[B, L]``: the LM keys, every chosen or rejected sequence its
own segment (``segment_ids`` ``2k - 1`` and ``2k`` for pair slot ``k``);
``pair_ids`` (slot ``1..K`` of the row, 0 = padding) and ``pair_sides``
(1 = chosen, 2 = rejected, 0 = padding). Pair keys ``[B, K]``, slot ``k`` at
index ``k - 1``: ``pair_mask`` (0 = empty slot), and optionally
``row_index``, ``margin``, ``ref_chosen_logps``, ``ref_rejected_logps``.
A pair's two sequences always share a row, so rows are independent.
"""


SHARED_PROMPT_KEYS: Mapping[str, type] = {
    "prompt_tokens": np.int32, "prompt_mask": np.int32,
    **{f"{side}_{k}": v for side in ("chosen", "rejected")
       for k, v in (("tokens", np.int32), ("mask", np.int32), ("loss_mask", np.float32))},
}
"""A preference batch whose prompt is shared by both replies (layout in :mod:`jaxpost.algorithms.shared_prompt`).

``prompt_tokens``, ``prompt_mask`` ``[B, P]``: the prompt left-padded
(mask 1 on real tokens). ``{side}_tokens``, ``{side}_mask``,
``{side}_loss_mask`` ``[B, R]``: the reply alone, right-padded; the loss
weight of reply token ``t`` is ``{side}_loss_mask[t]``. Pair keys ``[B]`` as
in ``PREFERENCE_KEYS``.
"""


def is_packed_preference(batch: Mapping) -> bool:
    """True for the packed preference layout (it has ``pair_ids``), False for one pair per row."""
    return "pair_ids" in batch


def check_batch(batch: Mapping, spec: Mapping[str, type], what: str) -> None:
    """Raises ``KeyError`` naming every key of ``spec`` missing from ``batch``."""
    missing = [k for k in spec if k not in batch]
    if missing:
        raise KeyError(f"{what} batch is missing {missing}; it has {sorted(batch)}")
