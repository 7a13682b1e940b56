"""Per-example limits: truncation, dropping, and the events counted in DataStats.

Each ``prepare_*`` function takes one normalised example and returns
``(arrays or None, events)``: ``None`` means the example is dropped, and
``events`` (names from :data:`jaxpost.data.stats.REASONS`) says why, or
what was cut from a kept example. Nothing is dropped without an event.

Policies (``overlong``): ``"truncate"`` (default) cuts and counts
``truncated`` / ``prompt_truncated``; ``"drop"`` drops and counts
``dropped_too_long``.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from jaxpost.data import encode
from jaxpost.data.preference import preference_example, shared_prompt_example

OVERLONG_POLICIES = ("truncate", "drop")


def _check_policy(overlong: str) -> None:
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")


def prepare_lm(tokenizer: Any, example: Mapping[str, Any], seq_len: int, *, train_on_prompt: bool = False,
               overlong: str = "truncate") -> tuple[dict[str, np.ndarray] | None, tuple[str, ...]]:
    """One SFT/LM example -> unpadded ``tokens, targets, loss_mask`` of length <= ``seq_len``.

    Dropped: ``dropped_empty`` when no non-special token is trained;
    ``dropped_too_long`` (policy drop) when longer than ``seq_len``;
    ``dropped_truncated_empty`` when keeping the first ``seq_len`` tokens
    leaves no trained target. Kept after cutting: ``truncated``.
    """
    _check_policy(overlong)
    ids, trained = encode.encode_lm(tokenizer, example, train_on_prompt=train_on_prompt)
    if not encode.has_content(ids, trained, encode.special_ids(tokenizer)):
        return None, ("dropped_empty",)
    events: tuple[str, ...] = ()
    if len(ids) > seq_len:
        if overlong == "drop":
            return None, ("dropped_too_long",)
        ids, trained = ids[:seq_len], trained[:seq_len]
        if not trained[1:].any():
            return None, ("dropped_truncated_empty",)
        events = ("truncated",)
    return encode.lm_arrays(ids, trained, encode.pad_id(tokenizer)), events


def _cut_prompt(prompt_ids: np.ndarray, max_len: int, bos: int | None) -> np.ndarray:
    # Keep the end of the prompt (the question nearest the reply), and the
    # leading bos when there is one, since the model always saw one there.
    if bos is not None and len(prompt_ids) and prompt_ids[0] == bos and max_len > 1:
        return np.r_[prompt_ids[:1], prompt_ids[len(prompt_ids) - (max_len - 1):]].astype(np.int32)
    return prompt_ids[len(prompt_ids) - max_len:]


def _end_at_last_trained(encoded):
    ids, trained = encoded
    hits = np.flatnonzero(trained)
    end = int(hits[-1]) + 1 if hits.size else len(ids)
    return ids[:end], trained[:end]


def _fit_pair(tokenizer: Any, example: Mapping[str, Any], seq_len: int, max_prompt_len: int | None,
              overlong: str):
    """Encodes a preference example and applies the limits of :func:`prepare_preference_pair`.

    Returns ``((prompt_ids, (chosen_ids, trained), (rejected_ids, trained)), events)``,
    or ``(None, events)`` when the pair is dropped.
    """
    _check_policy(overlong)
    max_prompt_len = seq_len // 2 if max_prompt_len is None else max_prompt_len
    if not 1 <= max_prompt_len <= seq_len - 2:
        raise ValueError(f"max_prompt_len={max_prompt_len} must be in [1, seq_len - 2={seq_len - 2}] so "
                         "that a completion token always fits")
    prompt_ids, chosen, rejected = encode.encode_preference(tokenizer, example)
    # End each reply at its last trained token (the end-of-turn marker): a
    # reward model reads its score at the last token, and sampled replies stop
    # there too, so training and scoring see the same position. The template's
    # trailing newline is never trained, so DPO is unaffected.
    chosen, rejected = _end_at_last_trained(chosen), _end_at_last_trained(rejected)
    special = encode.special_ids(tokenizer)
    if not all(encode.has_content(ids, tr, special) for ids, tr in (chosen, rejected)):
        return None, ("dropped_empty",)
    events: list[str] = []
    too_long = len(prompt_ids) > max_prompt_len or any(len(prompt_ids) + len(c[0]) > seq_len
                                                       for c in (chosen, rejected))
    if too_long and overlong == "drop":
        return None, ("dropped_too_long",)
    if len(prompt_ids) > max_prompt_len:
        prompt_ids = _cut_prompt(prompt_ids, max_prompt_len, tokenizer.bos_token_id)
        events.append("prompt_truncated")
    room = seq_len - len(prompt_ids)
    sides = []
    for ids, trained in (chosen, rejected):
        if len(ids) > room:
            ids, trained = ids[:room], trained[:room]
            if "truncated" not in events:
                events.append("truncated")
        sides.append((ids, trained))
    return (prompt_ids, sides[0], sides[1]), tuple(events)


def prepare_preference_pair(tokenizer: Any, example: Mapping[str, Any], seq_len: int, *,
                            max_prompt_len: int | None = None, overlong: str = "truncate"
                            ) -> tuple[dict[str, Any] | None, tuple[str, ...]]:
    """Preference example -> unpadded ``{"chosen": lm, "rejected": lm}`` of at most ``seq_len`` each.

    ``lm`` holds ``tokens, targets, loss_mask`` ``[n]`` (prompt + reply, as
    :func:`jaxpost.data.encode.lm_arrays`). Both sequences start with the
    same prompt ids. TRL-style limits: a prompt longer than
    ``max_prompt_len`` (default ``seq_len // 2``) keeps its last tokens (and
    its bos): ``prompt_truncated``; a completion that does not fit after the
    prompt is cut at its end: ``truncated`` (policy drop:
    ``dropped_too_long``). Either completion without trained content:
    ``dropped_empty``. ``margin`` (float32 scalar) is passed through.
    """
    fitted, events = _fit_pair(tokenizer, example, seq_len, max_prompt_len, overlong)
    if fitted is None:
        return None, events
    prompt_ids, chosen, rejected = fitted
    pad = encode.pad_id(tokenizer)
    out: dict[str, Any] = {}
    for key, (ids, trained) in (("chosen", chosen), ("rejected", rejected)):
        out[key] = encode.lm_arrays(np.r_[prompt_ids, ids], np.r_[np.zeros(len(prompt_ids), bool), trained], pad)
    if "margin" in example:
        out["margin"] = np.float32(example["margin"])
    out["prompt_len"] = len(prompt_ids)
    return out, events


def prepare_preference_shared(tokenizer: Any, example: Mapping[str, Any], seq_len: int, *,
                              max_prompt_len: int | None = None, overlong: str = "truncate"
                              ) -> tuple[dict[str, np.ndarray] | None, tuple[str, ...]]:
    """Preference example -> the shared-prompt layout (``SHARED_PROMPT_KEYS``) of one pair.

    ``prompt_tokens``/``prompt_mask`` ``[P]`` left-padded, ``P = max_prompt_len``
    (default ``seq_len // 2``); each reply's ``{side}_tokens``, ``{side}_mask``,
    ``{side}_loss_mask`` ``[R]`` right-padded, ``R = seq_len - P``, built by
    :func:`jaxpost.data.preference.shared_prompt_example`. The limits
    and events are :func:`prepare_preference_pair`'s, and a reply longer than
    ``R`` is cut at its end (``truncated``; policy drop: ``dropped_too_long``).
    Reply token ``t`` weighs ``trained[t]``, as in the unshared row, except
    the first token after an empty prompt, which nothing predicts.
    """
    P = seq_len // 2 if max_prompt_len is None else max_prompt_len
    fitted, events = _fit_pair(tokenizer, example, seq_len, P, overlong)
    if fitted is None:
        return None, events
    prompt_ids, *sides = fitted
    R, events = seq_len - P, list(events)
    for i, (ids, trained) in enumerate(sides):
        if len(ids) > R:
            if overlong == "drop":
                return None, ("dropped_too_long",)
            sides[i] = ids[:R], trained[:R]
            if "truncated" not in events:
                events.append("truncated")
    (chosen, chosen_trained), (rejected, rejected_trained) = sides
    out = shared_prompt_example(prompt_ids, chosen, rejected, P, R, pad=encode.pad_id(tokenizer),
                                chosen_trained=chosen_trained, rejected_trained=rejected_trained)
    if "margin" in example:
        out["margin"] = np.float32(example["margin"])
    return out, tuple(events)


def prepare_preference(tokenizer: Any, example: Mapping[str, Any], seq_len: int, *,
                       max_prompt_len: int | None = None, overlong: str = "truncate"
                       ) -> tuple[dict[str, np.ndarray] | None, tuple[str, ...]]:
    """Preference example -> fixed ``[seq_len]`` ``chosen_*`` and ``rejected_*`` arrays.

    The limits and events of :func:`prepare_preference_pair`, then
    :func:`jaxpost.data.preference.preference_example` (each side
    ``prompt + reply`` right-padded to one row).
    """
    fitted, events = _fit_pair(tokenizer, example, seq_len, max_prompt_len, overlong)
    if fitted is None:
        return None, events
    prompt_ids, (chosen, chosen_trained), (rejected, rejected_trained) = fitted
    out = preference_example(prompt_ids, chosen, rejected, seq_len, pad=encode.pad_id(tokenizer),
                             chosen_trained=chosen_trained, rejected_trained=rejected_trained)
    if "margin" in example:
        out["margin"] = np.float32(example["margin"])
    return out, events


def prepare_prompt(tokenizer: Any, prompt: str | list, max_prompt_len: int, *, overlong: str = "truncate"
                   ) -> tuple[dict[str, np.ndarray] | None, tuple[str, ...]]:
    """Prompt -> left-padded ``prompt_tokens`` int32 ``[P]`` and ``prompt_mask`` int32 ``[P]``.

    ``P = max_prompt_len``; ``prompt_mask`` is 1 on real tokens (the right
    end). Longer prompts keep their end (and bos): ``prompt_truncated``, or
    ``dropped_too_long`` under policy drop; a prompt of no tokens is
    ``dropped_empty``.
    """
    _check_policy(overlong)
    ids = encode.encode_prompt(tokenizer, prompt)
    if len(ids) == 0:
        return None, ("dropped_empty",)
    events: tuple[str, ...] = ()
    if len(ids) > max_prompt_len:
        if overlong == "drop":
            return None, ("dropped_too_long",)
        ids, events = _cut_prompt(ids, max_prompt_len, tokenizer.bos_token_id), ("prompt_truncated",)
    tokens = np.full(max_prompt_len, encode.pad_id(tokenizer), np.int32)
    mask = np.zeros(max_prompt_len, np.int32)
    tokens[max_prompt_len - len(ids):] = ids
    mask[max_prompt_len - len(ids):] = 1
    return {"prompt_tokens": tokens, "prompt_mask": mask}, events
