"""Normalised examples -> token ids and loss masks (chat templates included).

Every encoder returns token ids ``ids`` ``[n]`` and a boolean ``trained``
``[n]``: ``trained[i]`` says token ``i`` is a training *target* (it is
predicted from the tokens before it). :func:`lm_arrays` turns that into the
contract's shifted form::

    tokens[t] = ids[t]      targets[t] = ids[t+1]      loss_mask[t] = trained[t+1]

with ``targets[n-1] = pad`` and ``loss_mask[n-1] = 0`` (nothing follows the
last token of a sequence).

What is trained:

* ``text``: every token after bos, eos included.
* plain ``prompt``/``completion``: ``[bos] + tok(prompt) + tok(completion) +
  [eos]``; the completion tokens and eos.
* conversations: rendered with the tokenizer's own chat template; the tokens
  of each assistant turn (``messages``) or of every completion message, from
  after the turn header up to and including its last special token (the
  end-of-turn marker, e.g. ``<|im_end|>``); template whitespace after the
  marker is not trained. ``train_on_prompt=True`` trains every token.

Turn boundaries come from rendering message prefixes, so templates need no
``{% generation %}`` tags: for a trained message ``i`` the template must
render ``messages[:i]`` (+ generation prompt) as a prefix of
``messages[:i+1]``, and that of the whole conversation, and the token ids of
those prefixes must be prefixes of the conversation's ids. A template for
which this fails raises an error naming the message index.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from jaxpost.data import formats

Encoded = tuple[np.ndarray, np.ndarray]
"""``(ids int32 [n], trained bool [n])``."""


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens added by the tokenizer.

    The same ids as ``tokenizer(text, add_special_tokens=False)``. For a fast
    tokenizer whose Rust backend is set up as that call would set it (no
    truncation, no padding, special tokens not split) the backend encodes
    directly: a third of the time, which matters because pipelines encode
    every example of every epoch.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (backend is not None and backend.truncation is None and backend.padding is None
            and not getattr(tokenizer, "split_special_tokens", False) and not backend.encode_special_tokens):
        return backend.encode(text, add_special_tokens=False).ids
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _bos(tokenizer: Any) -> list[int]:
    return [] if tokenizer.bos_token_id is None else [int(tokenizer.bos_token_id)]


def _eos(tokenizer: Any) -> list[int]:
    if tokenizer.eos_token_id is None:
        raise ValueError(f"Tokenizer {type(tokenizer).__name__} has no eos token; cannot end plain completions")
    return [int(tokenizer.eos_token_id)]


def pad_id(tokenizer: Any) -> int:
    """The padding id: the tokenizer's pad token, else eos, else 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def special_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of every special token (named ones and special added tokens)."""
    ids = set(int(i) for i in tokenizer.all_special_ids)
    for tid, tok in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(tok, "special", False):
            ids.add(int(tid))
    return frozenset(ids)


def render(tokenizer: Any, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> str:
    """The chat template's text for ``messages`` (``""`` for no messages and no prompt)."""
    if not messages and not add_generation_prompt:
        return ""
    if tokenizer.chat_template is None:
        raise ValueError(f"Tokenizer {type(tokenizer).__name__} has no chat_template; "
                         "conversational data needs one")
    return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def _trim_after_last_special(ids: Sequence[int], start: int, end: int, special: frozenset[int]) -> int:
    for j in range(end - 1, start - 1, -1):
        if ids[j] in special:
            return j + 1
    return end


def _check_prefix(short_text: str, long_text: str, short_ids: Sequence[int], long_ids: Sequence[int],
                  what: str) -> None:
    if not long_text.startswith(short_text):
        raise ValueError(f"Chat template is not prefix-stable: the rendering of {what} is not a prefix of "
                         f"the longer conversation's rendering ({short_text[-60:]!r} vs "
                         f"{long_text[len(short_text) - 60:len(short_text)]!r}); cannot locate turn boundaries")
    if list(long_ids[:len(short_ids)]) != list(short_ids):
        raise ValueError(f"Tokenization is not prefix-stable at {what}: tokens of the shorter rendering "
                         "are not a prefix of the longer one's")


def chat_encode(tokenizer: Any, messages: Sequence[Mapping[str, Any]], trained_messages: Sequence[bool]
                ) -> Encoded:
    """Renders ``messages`` with the chat template; marks tokens of trained messages.

    For a trained message ``i`` the trained span runs from the end of the
    rendering of ``messages[:i]`` (with the generation prompt if message
    ``i`` is an assistant turn, so the header is not trained) to the end of
    ``messages[:i+1]``, cut after the span's last special token.
    """
    if len(trained_messages) != len(messages):
        raise ValueError(f"trained_messages has {len(trained_messages)} entries for {len(messages)} messages")
    full_text = render(tokenizer, messages)
    full_ids = encode_text(tokenizer, full_text)
    trained = np.zeros(len(full_ids), bool)
    special = special_ids(tokenizer)
    for i, is_trained in enumerate(trained_messages):
        if not is_trained:
            continue
        gen = messages[i]["role"] == "assistant"
        start_text = render(tokenizer, messages[:i], add_generation_prompt=gen)
        last = i + 1 == len(messages)  # its prefix is the whole conversation: rendered and encoded already
        end_text = full_text if last else render(tokenizer, messages[:i + 1])
        start_ids = encode_text(tokenizer, start_text)
        end_ids = full_ids if last else encode_text(tokenizer, end_text)
        _check_prefix(start_text, end_text, start_ids, end_ids,
                      f"messages[:{i}]" + (" + generation prompt" if gen else ""))
        _check_prefix(end_text, full_text, end_ids, full_ids, f"messages[:{i + 1}]")
        start, end = len(start_ids), len(end_ids)
        trained[start:_trim_after_last_special(full_ids, start, end, special)] = True
    return np.asarray(full_ids, np.int32), trained


def encode_lm(tokenizer: Any, example: Mapping[str, Any], train_on_prompt: bool = False) -> Encoded:
    """One LM/SFT example (``text``, ``messages``, ``prompt_completion``) -> ids, trained."""
    fmt = example["format"]
    if fmt == formats.TEXT:
        ids = _bos(tokenizer) + encode_text(tokenizer, example["text"]) + _eos(tokenizer)
        trained = np.ones(len(ids), bool)
        return np.asarray(ids, np.int32), trained
    if fmt == formats.MESSAGES:
        msgs = example["messages"]
        ids, trained = chat_encode(tokenizer, msgs, [m["role"] == "assistant" for m in msgs])
        return ids, np.ones_like(trained) if train_on_prompt else trained
    if fmt == formats.PROMPT_COMPLETION:
        if example["conversational"]:
            prompt, completion = example["prompt"], example["completion"]
            ids, trained = chat_encode(tokenizer, [*prompt, *completion],
                                       [False] * len(prompt) + [m["role"] == "assistant" for m in completion])
        else:
            p = _bos(tokenizer) + encode_text(tokenizer, example["prompt"])
            c = encode_text(tokenizer, example["completion"]) + _eos(tokenizer)
            ids, trained = np.asarray(p + c, np.int32), np.r_[np.zeros(len(p), bool), np.ones(len(c), bool)]
        return ids, np.ones_like(trained) if train_on_prompt else trained
    raise ValueError(f"Format {fmt!r} is not language-modelling data (use the preference or prompt pipeline)")


def encode_prompt(tokenizer: Any, prompt: str | Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Prompt ids as the model sees them before its reply.

    Plain: ``[bos] + tok(prompt)``. Conversational: the template rendering
    with the generation prompt (assistant header) appended.
    """
    if isinstance(prompt, str):
        return np.asarray(_bos(tokenizer) + encode_text(tokenizer, prompt), np.int32)
    return np.asarray(encode_text(tokenizer, render(tokenizer, prompt, add_generation_prompt=True)), np.int32)


def encode_preference(tokenizer: Any, example: Mapping[str, Any]
                      ) -> tuple[np.ndarray, Encoded, Encoded]:
    """Preference example -> ``(prompt_ids, (chosen_ids, trained), (rejected_ids, trained))``.

    The completion parts exclude the prompt; ``prompt_ids + chosen_ids`` is
    the full chosen sequence. Plain completions end with eos. Raises if the
    template does not render the prompt as a prefix of prompt + completion.
    """
    prompt = example["prompt"]
    prompt_ids = encode_prompt(tokenizer, prompt)
    sides = []
    for key in ("chosen", "rejected"):
        completion = example[key]
        if isinstance(prompt, str):
            ids = np.asarray(encode_text(tokenizer, completion) + _eos(tokenizer), np.int32)
            sides.append((ids, np.ones(len(ids), bool)))
            continue
        ids, trained = chat_encode(tokenizer, [*prompt, *completion],
                                   [False] * len(prompt) + [m["role"] == "assistant" for m in completion])
        p = len(prompt_ids)
        if list(ids[:p]) != list(prompt_ids):
            raise ValueError(f"The tokens of the prompt (with generation prompt) are not a prefix of the "
                             f"tokens of prompt + {key}; the chat template is not prefix-stable")
        sides.append((ids[p:], trained[p:]))
    return prompt_ids, sides[0], sides[1]


def lm_arrays(ids: np.ndarray, trained: np.ndarray, pad: int) -> dict[str, np.ndarray]:
    """Shifts an encoded sequence into ``tokens``, ``targets``, ``loss_mask`` (all ``[n]``).

    ``targets[t] = ids[t+1]``, ``loss_mask[t] = trained[t+1]``; the last
    position gets ``targets = pad`` and ``loss_mask = 0``.
    """
    ids = np.asarray(ids, np.int32)
    trained = np.asarray(trained, bool)
    targets = np.empty_like(ids)
    targets[:-1], targets[-1:] = ids[1:], pad
    loss_mask = np.zeros(len(ids), np.float32)
    loss_mask[:-1] = trained[1:]
    return {"tokens": ids, "targets": targets, "loss_mask": loss_mask}


def has_content(ids: np.ndarray, trained: np.ndarray, special: frozenset[int]) -> bool:
    """True if some trained token is not a special token (an empty completion
    trains only its end marker, which counts as empty)."""
    return any(bool(t) and int(i) not in special for i, t in zip(ids, trained))
