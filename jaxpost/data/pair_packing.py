"""Packed preference rows: whole pairs (chosen and rejected) first-fit into shared rows.

One packed row ``[R]`` (``R = 2 * seq_len`` in the pipeline, the tokens one
unpacked pair holds) carries up to ``K`` pairs. Pair ``k`` (slot ``1..K``)
occupies two consecutive segments, chosen then rejected::

    tokens       p p c c c  p p r r  p c c  p r r r  <pad>
    segment_ids  1 1 1 1 1  2 2 2 2  3 3 3  4 4 4 4  0 ...
    positions    0 1 2 3 4  0 1 2 3  0 1 2  0 1 2 3  0 ...
    pair_ids     1 1 1 1 1  1 1 1 1  2 2 2  2 2 2 2  0 ...
    pair_sides   1 1 1 1 1  2 2 2 2  1 1 1  2 2 2 2  0 ...

so ``segment_ids = 2 * pair_ids - (pair_sides == 1)``: the model sees every
sequence alone (segment mask, positions restarting at 0), and the loss sums
tokens per ``(pair_ids, pair_sides)``. Per-pair values (``pair_mask``,
``row_index``, optional ``margin``, ``ref_chosen_logps``,
``ref_rejected_logps``) are ``[K]`` per row, slot ``k`` at index ``k - 1``;
empty slots have ``pair_mask = 0``, ``row_index = -1``, 0 elsewhere.

A pair never straddles two rows, so every row is self-contained: batches
shard, split into micro-batches and gather across hosts along the row axis
exactly like unpacked ones.

Packing is grain's ``FirstFitPackIterDataset`` (as for LM rows, see
:mod:`jaxpost.data.packing`): one element per pair, token features of
length ``n_chosen + n_rejected`` and one scalar per pair-level feature, whose
capacity ``K`` bounds the pairs per row.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import grain
import numpy as np

TOKEN_FEATURES = ("tokens", "positions", "targets", "loss_mask", "pair_sides")
"""Per-token features packed along the row (``positions`` restart per side)."""

PAIR_FEATURES = {"pair_mask": 0.0, "row_index": -1, "margin": 0.0, "ref_chosen_logps": 0.0,
                 "ref_rejected_logps": 0.0}
"""Per-pair features and the value of an empty slot."""

CHOSEN, REJECTED = 1, 2
"""``pair_sides`` values; 0 is padding."""


def pair_element(chosen: Mapping[str, np.ndarray], rejected: Mapping[str, np.ndarray],
                 pair_values: Mapping[str, float | int]) -> dict[str, np.ndarray]:
    """One pair as a packing element: chosen then rejected tokens, plus its per-pair scalars.

    ``chosen``/``rejected`` are unpadded ``tokens, targets, loss_mask`` (each
    side shifted on its own, so no target crosses into the other side).
    """
    nc, nr = len(chosen["tokens"]), len(rejected["tokens"])
    out = {k: np.concatenate([chosen[k], rejected[k]]) for k in ("tokens", "targets", "loss_mask")}
    out["positions"] = np.r_[np.arange(nc), np.arange(nr)].astype(np.int32)
    out["pair_sides"] = np.r_[np.full(nc, CHOSEN), np.full(nr, REJECTED)].astype(np.int32)
    for key, value in pair_values.items():
        out[key] = np.asarray(value, np.int32 if key == "row_index" else np.float32)
    return out


def _finish_row(row: Mapping[str, np.ndarray], pair_keys: Sequence[str]) -> dict[str, np.ndarray]:
    # grain numbers the elements of a row 1..k in "<feature>_segment_ids";
    # the tokens' copy is the pair slot of every token.
    pair_ids = row["tokens_segment_ids"].astype(np.int32)
    sides = np.where(pair_ids > 0, row["pair_sides"], 0).astype(np.int32)
    out = {
        "tokens": row["tokens"].astype(np.int32),
        "positions": np.where(pair_ids > 0, row["positions"], 0).astype(np.int32),
        "segment_ids": np.where(pair_ids > 0, 2 * pair_ids - (sides == CHOSEN), 0).astype(np.int32),
        "targets": row["targets"].astype(np.int32),
        "loss_mask": row["loss_mask"].astype(np.float32),
        "pair_ids": pair_ids,
        "pair_sides": sides,
    }
    for key in pair_keys:
        out[key] = row[key].astype(np.int32 if key == "row_index" else np.float32)
    return out


def pack_pairs(ds: grain.IterDataset, row_len: int, max_pairs: int, *, num_bins: int, pad: int,
               pair_keys: Sequence[str], seed: int = 0, shuffle_bins: bool = True) -> grain.IterDataset:
    """Packs :func:`pair_element` elements into rows of ``row_len`` tokens and ``max_pairs`` pairs.

    ``pair_keys`` are the per-pair features every element carries (always
    ``pair_mask`` and ``row_index``; ``margin`` and the reference log-probs
    when the data has them). ``num_bins`` rows are filled at a time (first
    fit, in arrival order) and emitted, permuted when ``shuffle_bins``
    (deterministic in ``seed``). A pair longer than ``row_len`` raises.
    """
    unknown = [k for k in pair_keys if k not in PAIR_FEATURES]
    if unknown:
        raise ValueError(f"Unknown per-pair features {unknown}; known: {sorted(PAIR_FEATURES)}")
    if max_pairs < 1:
        raise ValueError(f"max_pairs must be >= 1, got {max_pairs}")
    keys = (*TOKEN_FEATURES, *pair_keys)
    packed = grain.experimental.FirstFitPackIterDataset(
        ds.map(lambda ex: {k: ex[k] for k in keys}),
        length_struct={**{k: row_len for k in TOKEN_FEATURES}, **{k: max_pairs for k in pair_keys}},
        num_packing_bins=num_bins,
        seed=seed,
        shuffle_bins=shuffle_bins,
        padding_struct={"tokens": pad, "targets": pad, "loss_mask": 0.0, "positions": 0, "pair_sides": 0,
                        **{k: PAIR_FEATURES[k] for k in pair_keys}},
    )
    return packed.map(lambda row: _finish_row(row, pair_keys))
