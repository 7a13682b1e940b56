"""Batch specs: every batch layout an algorithm reads, with each key's dtype and shape.

This module is the one source of the batch layouts; the batch section of
``docs/contracts.md`` is rendered from it by :func:`render_batch_specs` (a
test checks they agree). A spec is a :class:`BatchSpec`: a read-only mapping
``key -> numpy dtype`` of the keys a loss requires (so ``{**LM_KEYS, ...}``
and :func:`check_batch` work on it), plus each key's shape and the optional
keys the loss reads when present. Shape letters: ``B`` batch rows, ``L``
tokens per row, ``P`` prompt tokens, ``R`` reply tokens, ``K`` pair slots
per packed row, ``k`` stored teacher top-k.
"""

from __future__ import annotations

from typing import Iterator, Mapping

import numpy as np


class BatchSpec(Mapping):
    """The keys of one batch layout: ``spec[key]`` is the dtype of a required key.

    ``shapes[key]`` gives the shape of every key (required or optional) as
    text, e.g. ``"[B, L]"``; ``optional`` maps the keys read only when
    present to their dtypes. Iterating yields the required keys.
    """

    def __init__(self, required: Mapping[str, type], shapes: Mapping[str, str],
                 optional: Mapping[str, type] | None = None):
        self._required = dict(required)
        self.optional: Mapping[str, type] = dict(optional or {})
        missing = [k for k in (*self._required, *self.optional) if k not in shapes]
        if missing:
            raise ValueError(f"BatchSpec: no shape given for {missing}")
        self.shapes: Mapping[str, str] = {k: shapes[k] for k in (*self._required, *self.optional)}

    def __getitem__(self, key: str) -> type:
        return self._required[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._required)

    def __len__(self) -> int:
        return len(self._required)

    def __repr__(self) -> str:
        return f"BatchSpec({self._required}, optional={self.optional})"

    def extend(self, required: Mapping[str, type] = (), shapes: Mapping[str, str] = (),
               optional: Mapping[str, type] | None = None) -> "BatchSpec":
        """A new spec with this one's keys plus ``required``/``optional`` (shapes for the new keys)."""
        return BatchSpec({**self._required, **dict(required)}, {**self.shapes, **dict(shapes)},
                         {**self.optional, **dict(optional or {})})


_LM_DTYPES = {"tokens": np.int32, "positions": np.int32, "segment_ids": np.int32, "targets": np.int32,
              "loss_mask": np.float32}
_PAIR_EXTRAS = {"margin": np.float32, "ref_chosen_logps": np.float32, "ref_rejected_logps": np.float32,
                "pair_mask": np.float32}

LM_KEYS = BatchSpec(_LM_DTYPES, {k: "[B, L]" for k in _LM_DTYPES})
"""A language-modelling batch (SFT, distillation): ``[B, L]`` each.

Token conventions: ``segment_ids`` 0 = padding, ``1..k`` = documents packed
in a row; ``positions`` restart at 0 in every segment; ``targets[b, t]`` is
the next token of the same segment; ``loss_mask`` 1.0 where that prediction
is trained.
"""

PREFERENCE_KEYS = BatchSpec(
    {f"{side}_{k}": v for side in ("chosen", "rejected") for k, v in _LM_DTYPES.items()},
    {**{f"{side}_{k}": "[B, L]" for side in ("chosen", "rejected") for k in _LM_DTYPES},
     **{k: "[B]" for k in _PAIR_EXTRAS}},
    _PAIR_EXTRAS)
"""A preference batch (DPO family, reward model), one pair per row: the LM keys twice.

Optional: ``margin`` (reward model), ``ref_chosen_logps`` and
``ref_rejected_logps`` (precomputed reference), ``pair_mask`` (0 = no pair).
"""

PACKED_PREFERENCE_KEYS = BatchSpec(
    {**_LM_DTYPES, "pair_ids": np.int32, "pair_sides": np.int32, "pair_mask": np.float32},
    {**{k: "[B, L]" for k in (*_LM_DTYPES, "pair_ids", "pair_sides")},
     **{k: "[B, K]" for k in (*_PAIR_EXTRAS, "row_index")}},
    {"row_index": np.int32, **{k: v for k, v in _PAIR_EXTRAS.items() if k != "pair_mask"}})
"""A packed preference batch (DPO family, reward model; layout in :mod:`jaxpost.data.pair_packing`).

Token keys ``[B, L]``: the LM keys, every chosen or rejected sequence its
own segment (``segment_ids`` ``2k - 1`` and ``2k`` for pair slot ``k``);
``pair_ids`` (slot ``1..K`` of the row, 0 = padding) and ``pair_sides``
(1 = chosen, 2 = rejected, 0 = padding). Pair keys ``[B, K]``, slot ``k`` at
index ``k - 1``: ``pair_mask`` (0 = empty slot), and optionally
``row_index``, ``margin``, ``ref_chosen_logps``, ``ref_rejected_logps``.
A pair's two sequences always share a row, so rows are independent.
"""

_REPLY_DTYPES = {"tokens": np.int32, "mask": np.int32, "loss_mask": np.float32}
SHARED_PROMPT_KEYS = BatchSpec(
    {"prompt_tokens": np.int32, "prompt_mask": np.int32,
     **{f"{side}_{k}": v for side in ("chosen", "rejected") for k, v in _REPLY_DTYPES.items()}},
    {"prompt_tokens": "[B, P]", "prompt_mask": "[B, P]",
     **{f"{side}_{k}": "[B, R]" for side in ("chosen", "rejected") for k in _REPLY_DTYPES},
     **{k: "[B]" for k in _PAIR_EXTRAS}},
    _PAIR_EXTRAS)
"""A preference batch whose prompt is shared by both replies (layout in :mod:`jaxpost.algorithms.shared_prompt`).

``prompt_tokens``, ``prompt_mask`` ``[B, P]``: the prompt left-padded
(mask 1 on real tokens). ``{side}_tokens``, ``{side}_mask``,
``{side}_loss_mask`` ``[B, R]``: the reply alone, right-padded; the loss
weight of reply token ``t`` is ``{side}_loss_mask[t]``. Pair keys ``[B]`` as
in ``PREFERENCE_KEYS``.
"""

CACHED_KEYS = LM_KEYS.extend({"teacher_topk_logps": np.float32, "teacher_topk_ids": np.int32},
                             {"teacher_topk_logps": "[B, L, k]", "teacher_topk_ids": "[B, L, k]"})
"""Distillation from a teacher cache: an LM batch plus the teacher's top-k log-probs and ids per position."""

ROLLOUT_KEYS = LM_KEYS.extend({"old_logp": np.float32, "ref_logp": np.float32},
                              {"old_logp": "[B, L]", "ref_logp": "[B, L]"})
"""A critic-free rollout batch: the LM keys (``loss_mask`` = 1 on the sampled
completion), ``old_logp`` and ``ref_logp`` (policy and reference log-probs
of ``targets`` at sampling time), aligned with ``targets``."""

GRPO_KEYS = ROLLOUT_KEYS.extend({"advantages": np.float32}, {"advantages": "[B]"})
"""A GRPO/RLOO batch: a rollout batch plus one advantage per sequence."""

PPO_KEYS = LM_KEYS.extend({"old_logp": np.float32, "old_values": np.float32, "advantages": np.float32,
                           "returns": np.float32},
                          {"old_logp": "[B, L]", "old_values": "[B, L]", "advantages": "[B, L]",
                           "returns": "[B, L]"})
"""A PPO batch: the LM keys and ``old_logp``, ``old_values``, ``advantages``
(whitened GAE) and ``returns`` (GAE returns), aligned with ``targets``."""

KTO_KEYS = BatchSpec(
    {**_LM_DTYPES, **{f"kl_{k}": v for k, v in _LM_DTYPES.items()}, "label": np.float32, "example_mask": np.float32},
    {**{k: "[B, L]" for k in _LM_DTYPES}, **{f"kl_{k}": "[B, L]" for k in _LM_DTYPES},
     **{k: "[B]" for k in ("label", "example_mask", "row_index", "ref_logps", "ref_kl_logps")}},
    {"row_index": np.int32, "ref_logps": np.float32, "ref_kl_logps": np.float32})
"""A KTO batch (unpaired feedback, layout in :mod:`jaxpost.data.unpaired`): one example per row.

The LM keys hold ``prompt_i + completion_i`` (``loss_mask`` 1 on the
completion); the ``kl_`` LM keys hold the mismatched sequence
``prompt_i + completion_{i-1}`` (the batch's completions rotated by one over
its real rows, as TRL builds its KL batch). ``label`` 1.0 desirable, 0.0
undesirable; ``example_mask`` 0 on padding rows. Optional: ``row_index``
(source row, -1 padding), ``ref_logps``/``ref_kl_logps`` (precomputed reference).
"""

PROMPT_KEYS = BatchSpec({"prompt_tokens": np.int32, "prompt_mask": np.int32},
                        {"prompt_tokens": "[B, P]", "prompt_mask": "[B, P]"})
"""Prompt-only input of online methods: ``prompt_tokens`` left-padded, ``prompt_mask`` 1 on real tokens."""

BATCH_SPECS: Mapping[str, BatchSpec] = {
    "LM_KEYS": LM_KEYS, "PREFERENCE_KEYS": PREFERENCE_KEYS, "PACKED_PREFERENCE_KEYS": PACKED_PREFERENCE_KEYS,
    "SHARED_PROMPT_KEYS": SHARED_PROMPT_KEYS, "CACHED_KEYS": CACHED_KEYS, "ROLLOUT_KEYS": ROLLOUT_KEYS,
    "GRPO_KEYS": GRPO_KEYS, "PPO_KEYS": PPO_KEYS, "KTO_KEYS": KTO_KEYS, "PROMPT_KEYS": PROMPT_KEYS,
}
"""Every spec by name, in the order ``docs/contracts.md`` lists them."""

_USED_BY = {
    "LM_KEYS": "SFT, distillation with a live teacher",
    "PREFERENCE_KEYS": "DPO family, reward model: one pair per row",
    "PACKED_PREFERENCE_KEYS": "DPO family, reward model: whole pairs packed per row (`packing=True`)",
    "SHARED_PROMPT_KEYS": "DPO family, reward model: the prompt run once for both replies",
    "CACHED_KEYS": "distillation from a teacher cache",
    "ROLLOUT_KEYS": "an online rollout (before advantages)",
    "GRPO_KEYS": "GRPO / RLOO",
    "PPO_KEYS": "PPO",
    "KTO_KEYS": "KTO: unpaired desirable / undesirable examples",
    "PROMPT_KEYS": "online methods' prompts (input of the sampler)",
}


def render_batch_specs() -> str:
    """The markdown of every spec in :data:`BATCH_SPECS` (what ``docs/contracts.md`` holds).

    One table per spec: key, dtype, shape, and whether the key is optional.
    """
    out = []
    for name, spec in BATCH_SPECS.items():
        out += [f"### `{name}`: {_USED_BY[name]}", "", "| key | dtype | shape | |", "|---|---|---|---|"]
        for key, dtype in (*spec.items(), *spec.optional.items()):
            flag = "optional" if key in spec.optional else ""
            out.append(f"| `{key}` | {np.dtype(dtype).name} | `{spec.shapes[key]}` | {flag} |")
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def is_packed_preference(batch: Mapping) -> bool:
    """True for the packed preference layout (it has ``pair_ids``), False for one pair per row."""
    return "pair_ids" in batch


def check_batch(batch: Mapping, spec: Mapping[str, type], what: str) -> None:
    """Raises ``KeyError`` naming every key of ``spec`` missing from ``batch``."""
    missing = [k for k in spec if k not in batch]
    if missing:
        raise KeyError(f"{what} batch is missing {missing}; it has {sorted(batch)}")
