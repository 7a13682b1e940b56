"""Preference batches from token ids: prompt, chosen and rejected ids -> the arrays the losses read.

Two layouts (specs in :mod:`jaxpost.algorithms.batch`):

* **unpacked** (``PREFERENCE_KEYS``): each side is ``prompt + reply`` in its
  own row of ``seq_len`` slots, right-padded::

      chosen_tokens      p p c c c <pad>       rejected_tokens    p p r r <pad> <pad>
      chosen_positions   0 1 2 3 4 0           rejected_positions 0 1 2 3 0     0
      chosen_segment_ids 1 1 1 1 1 0           ...
      chosen_targets     p c c c x x           (x = pad)
      chosen_loss_mask   0 1 1 1 0 0           (1 where the target is a trained reply token)

* **shared prompt** (``SHARED_PROMPT_KEYS``, see
  :mod:`jaxpost.algorithms.shared_prompt`): the prompt once, left-padded to
  ``prompt_len``, and each reply alone, right-padded to ``reply_len``, with
  ``{side}_loss_mask[t]`` the weight of reply token ``t``.

Nothing is truncated here: a pair that does not fit raises. The data
pipeline (:mod:`jaxpost.data.prepare`) applies its truncation policy first
and then builds every row with these functions.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxpost.data.encode import lm_arrays
from jaxpost.data.packing import pad_lm

SIDES = ("chosen", "rejected")


def _trained(ids: np.ndarray, trained: Sequence[bool] | None) -> np.ndarray:
    if trained is None:
        return np.ones(len(ids), bool)
    trained = np.asarray(trained, bool)
    if trained.shape != ids.shape:
        raise ValueError(f"trained mask {trained.shape} must match the reply's ids {ids.shape}")
    return trained


def _ids(ids: Sequence[int]) -> np.ndarray:
    return np.asarray(ids, np.int32).reshape(-1)


def preference_example(prompt_ids: Sequence[int], chosen_ids: Sequence[int], rejected_ids: Sequence[int],
                       seq_len: int, *, pad: int = 0, chosen_trained: Sequence[bool] | None = None,
                       rejected_trained: Sequence[bool] | None = None) -> dict[str, np.ndarray]:
    """One pair -> the unpacked layout: ``chosen_*`` and ``rejected_*`` (``tokens, positions,
    segment_ids, targets, loss_mask``), each ``[seq_len]``.

    Side ``s`` is ``tokens = prompt_ids + s_ids`` followed by ``pad``;
    ``positions = 0..n-1`` and ``segment_ids = 1`` on its ``n`` real tokens
    (0 on padding); ``targets[t] = tokens[t + 1]`` (``pad`` at and after the
    last real token); ``loss_mask[t] = 1`` where ``targets[t]`` is a reply
    token whose ``s_trained`` flag is set (default: every reply token), else
    0. The reply ids exclude the prompt (for a chat template, the end-of-turn
    marker belongs to the reply). Raises ``ValueError`` if
    ``len(prompt_ids) + len(s_ids) > seq_len``.
    """
    prompt = _ids(prompt_ids)
    out: dict[str, np.ndarray] = {}
    for side, ids, trained in (("chosen", chosen_ids, chosen_trained), ("rejected", rejected_ids, rejected_trained)):
        ids = _ids(ids)
        full = np.r_[prompt, ids].astype(np.int32)
        if len(full) > seq_len:
            raise ValueError(f"prompt ({len(prompt)}) + {side} ({len(ids)}) tokens do not fit seq_len={seq_len}")
        lm = lm_arrays(full, np.r_[np.zeros(len(prompt), bool), _trained(ids, trained)], pad)
        for name, arr in pad_lm(lm, seq_len, pad).items():
            out[f"{side}_{name}"] = arr
    return out


def shared_prompt_example(prompt_ids: Sequence[int], chosen_ids: Sequence[int], rejected_ids: Sequence[int],
                          prompt_len: int, reply_len: int, *, pad: int = 0,
                          chosen_trained: Sequence[bool] | None = None,
                          rejected_trained: Sequence[bool] | None = None) -> dict[str, np.ndarray]:
    """One pair -> the shared-prompt layout: ``prompt_tokens``, ``prompt_mask`` ``[prompt_len]``
    and ``{side}_tokens``, ``{side}_mask``, ``{side}_loss_mask`` ``[reply_len]``.

    The prompt is left-padded with ``pad`` (``prompt_mask`` 1 on its real
    tokens); each reply is right-padded (``{side}_mask`` 1 on its real
    tokens). ``{side}_loss_mask[t]`` is reply token ``t``'s ``trained`` flag
    (default 1) and 0 on padding, except for the first reply token after an
    empty prompt, which nothing predicts (0). Same model view and loss as
    :func:`preference_example` of the same ids. Raises ``ValueError`` if the
    prompt is longer than ``prompt_len`` or a reply longer than
    ``reply_len``.
    """
    prompt = _ids(prompt_ids)
    P, R, p = prompt_len, reply_len, len(prompt)
    if p > P:
        raise ValueError(f"prompt of {p} tokens does not fit prompt_len={P}")
    out = {"prompt_tokens": np.full(P, pad, np.int32), "prompt_mask": np.zeros(P, np.int32)}
    out["prompt_tokens"][P - p:], out["prompt_mask"][P - p:] = prompt, 1
    for side, ids, trained in (("chosen", chosen_ids, chosen_trained), ("rejected", rejected_ids, rejected_trained)):
        ids = _ids(ids)
        n = len(ids)
        if n > R:
            raise ValueError(f"{side} reply of {n} tokens does not fit reply_len={R}")
        weight = _trained(ids, trained).astype(np.float32)
        if p == 0 and n:
            weight[0] = 0.0
        out[f"{side}_tokens"] = np.r_[ids, np.full(R - n, pad)].astype(np.int32)
        out[f"{side}_mask"] = (np.arange(R) < n).astype(np.int32)
        out[f"{side}_loss_mask"] = np.r_[weight, np.zeros(R - n)].astype(np.float32)
    return out


def _stack(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def preference_batch(prompts: Sequence[Sequence[int]], chosen: Sequence[Sequence[int]],
                     rejected: Sequence[Sequence[int]], seq_len: int, *, pad: int = 0) -> dict[str, np.ndarray]:
    """``B`` pairs of ids -> an unpacked preference batch (``PREFERENCE_KEYS``, ``[B, seq_len]`` each).

    Row ``b`` is :func:`preference_example` of ``(prompts[b], chosen[b],
    rejected[b])`` with every reply token trained.
    """
    if not len(prompts) == len(chosen) == len(rejected) > 0:
        raise ValueError(f"need as many prompts, chosen and rejected (> 0), got "
                         f"{len(prompts)}, {len(chosen)}, {len(rejected)}")
    return _stack([preference_example(p, c, r, seq_len, pad=pad) for p, c, r in zip(prompts, chosen, rejected)])


def shared_prompt_batch(prompts: Sequence[Sequence[int]], chosen: Sequence[Sequence[int]],
                        rejected: Sequence[Sequence[int]], prompt_len: int, reply_len: int, *,
                        pad: int = 0) -> dict[str, np.ndarray]:
    """``B`` pairs of ids -> a shared-prompt preference batch (``SHARED_PROMPT_KEYS``).

    ``prompt_*`` ``[B, prompt_len]``, reply keys ``[B, reply_len]``; row ``b``
    is :func:`shared_prompt_example` with every reply token trained.
    """
    if not len(prompts) == len(chosen) == len(rejected) > 0:
        raise ValueError(f"need as many prompts, chosen and rejected (> 0), got "
                         f"{len(prompts)}, {len(chosen)}, {len(rejected)}")
    return _stack([shared_prompt_example(p, c, r, prompt_len, reply_len, pad=pad)
                   for p, c, r in zip(prompts, chosen, rejected)])
