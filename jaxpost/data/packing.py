"""Fixed-length rows: first-fit packing with segment ids, or one example per row.

Input elements are unpadded ``tokens, targets, loss_mask`` ``[n]`` (from
:func:`jaxpost.data.encode.lm_arrays`, ``n <= L``). Output rows are the LM
batch spec of ``docs/contracts.md`` for one row ``[L]``:

* ``segment_ids``: ``1..k`` for the k examples in the row, ``0`` on padding;
* ``positions``: ``0, 1, ...`` restarting at every segment;
* ``targets``/``loss_mask``: each example was shifted on its own, so a
  target never comes from the next segment and the last token of every
  segment has ``loss_mask = 0``; padding has ``targets = pad``, mask 0.

Packing is grain's ``FirstFitPackIterDataset``: it fills ``num_bins`` rows
in arrival order, each element going to the first row with room, and emits
all rows when an element fits none; deterministic, and checkpointable through
the grain iterator state.
"""

from __future__ import annotations

from typing import Mapping

import grain
import numpy as np

_PACKED = ("tokens", "targets", "loss_mask")


def pad_lm(example: Mapping[str, np.ndarray], seq_len: int, pad: int) -> dict[str, np.ndarray]:
    """One example per row: right-pads ``tokens, targets, loss_mask`` to ``[seq_len]``.

    Adds ``positions = 0..n-1`` and ``segment_ids = 1`` on the ``n`` real
    tokens (0 on padding). Raises if the example is longer than ``seq_len``.
    """
    n = len(example["tokens"])
    if n > seq_len:
        raise ValueError(f"Example of {n} tokens does not fit seq_len={seq_len} (truncate it first)")
    out = {
        "tokens": np.full(seq_len, pad, np.int32),
        "positions": np.zeros(seq_len, np.int32),
        "segment_ids": np.zeros(seq_len, np.int32),
        "targets": np.full(seq_len, pad, np.int32),
        "loss_mask": np.zeros(seq_len, np.float32),
    }
    out["tokens"][:n] = example["tokens"]
    out["targets"][:n] = example["targets"]
    out["loss_mask"][:n] = example["loss_mask"]
    out["positions"][:n] = np.arange(n, dtype=np.int32)
    out["segment_ids"][:n] = 1
    return out


def _rename_packed(row: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    # grain returns per-feature "<name>_segment_ids"/"<name>_positions"; the
    # three features were packed together, so the tokens' copies stand for all.
    return {
        "tokens": row["tokens"].astype(np.int32),
        "positions": row["tokens_positions"].astype(np.int32),
        "segment_ids": row["tokens_segment_ids"].astype(np.int32),
        "targets": row["targets"].astype(np.int32),
        "loss_mask": row["loss_mask"].astype(np.float32),
    }


def pack_lm(ds: grain.IterDataset, seq_len: int, *, num_bins: int, pad: int, seed: int = 0,
            shuffle_bins: bool = True) -> grain.IterDataset:
    """Packs a grain ``IterDataset`` of unpadded LM examples into ``[seq_len]`` rows.

    ``num_bins`` rows are filled at a time (first fit); with
    ``shuffle_bins`` their emission order is permuted with a seed derived
    from ``seed`` (deterministic). Elements longer than ``seq_len`` raise.
    """
    packed = grain.experimental.FirstFitPackIterDataset(
        ds.map(lambda ex: {k: ex[k] for k in _PACKED}),
        length_struct={k: seq_len for k in _PACKED},
        num_packing_bins=num_bins,
        seed=seed,
        shuffle_bins=shuffle_bins,
        padding_struct={"tokens": pad, "targets": pad, "loss_mask": 0.0},
    )
    return packed.map(_rename_packed)


def stack_rows(rows: list[Mapping[str, object]], batch_size: int,
               fill: Mapping[str, object] | None = None) -> dict[str, object]:
    """Stacks rows into a batch of exactly ``batch_size`` (grain ``batch_fn``).

    Array leaves are stacked on a new leading axis; a short final batch (end
    of a finite epoch) is completed with padding rows: zeros, or
    ``fill[key]``, which carry ``segment_ids``/``loss_mask``/``prompt_mask``
    of 0 and so train nothing. Non-array leaves (raw text/fields kept for
    reward functions) become lists, padded with None.
    """
    if not rows:
        raise ValueError("Cannot build a batch from no rows")
    fill = fill or {}
    missing = batch_size - len(rows)
    out: dict[str, object] = {}
    for key, first in rows[0].items():
        values = [r[key] for r in rows]
        if isinstance(first, (np.ndarray, np.generic)):
            arr = np.stack(values)
            if missing:
                pad_rows = np.full((missing, *arr.shape[1:]), fill.get(key, 0), arr.dtype)
                arr = np.concatenate([arr, pad_rows])
            out[key] = arr
        else:
            out[key] = values + [None] * missing
    return out
