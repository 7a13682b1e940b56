"""Tokenizers: a small local byte-level BPE for tests and the offline demo, and
loading real Hugging Face tokenizer directories.

:func:`build_tokenizer` trains a byte-level BPE with the ``tokenizers``
library (or, with no texts, keeps the 256 byte symbols only: any text still
encodes) and wraps it as a ``transformers`` fast tokenizer with special
tokens and a ChatML chat template::

    <|bos|><|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello<|im_end|>\\n

Save it with ``save_pretrained(dir)``; ``AutoTokenizer.from_pretrained(dir)``
reads it back with no network.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import gin
# The direct module import avoids transformers' top-level AutoTokenizer path,
# which pulls in torch (seconds of import time) that tokenizing never needs.
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.tokenization_utils_tokenizers import PreTrainedTokenizerFast

from jaxpost.errors import UserError

PAD, BOS, EOS, IM_START, IM_END = "<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, IM_START, IM_END)
"""Ids 0..4 in this order (pad is 0, matching ``segment_ids == 0`` padding)."""

CHATML_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""ChatML with a leading bos; every assistant turn ends with ``<|im_end|>``."""

_N_BYTES = 256


@gin.configurable
def build_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = 512,
                    min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Builds a byte-level BPE tokenizer locally (no download).

    Vocabulary: the 5 :data:`SPECIAL_TOKENS` (ids 0-4), the 256 byte symbols,
    then BPE merges learned from ``texts`` up to ``vocab_size`` entries (fewer
    when the texts are small; ``texts=None`` gives bytes only). No special
    tokens are added on encode (``add_special_tokens`` has nothing to add);
    the encoders in :mod:`jaxpost.data.encode` place bos/eos themselves.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < len(SPECIAL_TOKENS) + _N_BYTES:
        raise ValueError(f"vocab_size={vocab_size} is below {len(SPECIAL_TOKENS) + _N_BYTES} "
                         "(special tokens + 256 byte symbols)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts) if texts is not None else [], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        extra_special_tokens=[IM_START, IM_END], chat_template=CHATML_TEMPLATE,
        model_max_length=1 << 30)


@gin.configurable
def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Loads a tokenizer from a local directory or a Hugging Face Hub name.

    ``path`` is a directory (relative to the working directory) when one
    exists; otherwise a Hub name resolved through huggingface_hub's cache (a
    cached name loads offline without waiting; see :mod:`jaxpost.hub`).
    Anything else raises :class:`jaxpost.errors.UserError` naming ``path``
    and where it was looked for. Never runs repository code
    (``trust_remote_code=False``). If the tokenizer has no pad token, its eos
    token is used for padding (padding positions are masked anyway); with
    neither it is a ``UserError``.
    """
    from jaxpost.hub import resolve_tokenizer_dir

    where = resolve_tokenizer_dir(path)  # first: a wrong path fails before transformers' slow import
    try:
        if plain_tokenizer_dir(where):  # what AutoTokenizer returns here, without its imports (torch: seconds)
            tok = PreTrainedTokenizerFast.from_pretrained(where)
        else:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(where, trust_remote_code=False)
    except (OSError, ValueError) as e:  # unreadable files, unknown tokenizer class
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"tokenizer {str(path)!r}: could not load {where} ({first}); it must be a Hugging Face "
                        "tokenizer directory (tokenizer.json / tokenizer_config.json) that needs no remote code") \
            from e
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise UserError(f"tokenizer {where} has neither a pad nor an eos token; add one (pad_token or "
                            "eos_token in its tokenizer_config.json)")
        tok.pad_token = tok.eos_token
    return tok


GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
PLAIN_MODEL_TYPES = (None, "llama", "mistral", "qwen3")
"""``config.json`` model types (None: no ``config.json``) for which transformers' ``AutoTokenizer`` loads a
tokenizer that declares a generic class as that class: no model-specific class overrides it there
(``tests/test_tokenizer_loading.py`` checks this against the installed ``AutoTokenizer``)."""


def plain_tokenizer_dir(where: str | os.PathLike) -> bool:
    """Whether the local tokenizer directory ``where`` loads as the generic fast tokenizer under ``AutoTokenizer``.

    True when its ``tokenizer_config.json`` declares one of
    :data:`GENERIC_TOKENIZER_CLASSES`, with a ``tokenizer.json``, no
    ``auto_map`` (remote code), no ``tekken.json`` (Mistral's own format),
    and a model type in :data:`PLAIN_MODEL_TYPES`. :func:`load_tokenizer`
    then loads that class directly: the same tokenizer, without importing
    ``AutoTokenizer``, whose model configs pull in torch where it is installed
    (about 3 s of every command's start).
    """
    d = Path(where)
    try:
        declared = json.loads((d / "tokenizer_config.json").read_text())
        model_type = json.loads((d / "config.json").read_text()).get("model_type", "") \
            if (d / "config.json").exists() else None
    except (OSError, ValueError, AttributeError):
        return False
    return (isinstance(declared, dict) and declared.get("tokenizer_class") in GENERIC_TOKENIZER_CLASSES
            and "auto_map" not in declared and (d / "tokenizer.json").is_file()
            and not (d / "tekken.json").exists() and model_type in PLAIN_MODEL_TYPES)


_PROBE = "jaxpost-end-of-turn-probe"
"""Assistant content whose rendering by a chat template shows what follows a turn's content."""

_KNOWN_END_OF_TURN = (IM_END, "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|eot|>")
"""Fallback for tokenizers whose chat template is absent or cannot render a probe conversation."""


def _turn_suffix(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The text a chat template puts after an assistant turn's content; None without a renderable template.

    A user turn and an assistant turn whose content is a probe string are
    rendered (then the assistant turn alone, for templates that must start
    with it); what follows the probe is the suffix.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    for conversation in ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}],
                         [{"role": "assistant", "content": _PROBE}]):
        try:
            text = tokenizer.apply_chat_template(conversation, tokenize=False)
        except Exception:  # noqa: BLE001 - templates raise anything (jinja errors, raise_exception(...))
            continue
        if isinstance(text, str) and _PROBE in text:
            return text[text.rindex(_PROBE) + len(_PROBE):]
    return None


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The special token the chat template puts right after an assistant turn's content, or None.

    Read from the template itself (:func:`_turn_suffix`): the first token
    after the content, whitespace skipped, when it is a special token
    (``<|im_end|>`` for ChatML and Qwen, ``<|eot_id|>`` for Llama 3,
    ``<end_of_turn>`` for Gemma, ``<|end|>`` for Phi-3, ``</s>`` for Llama 2
    and Mistral). None when there is no renderable template or plain text
    follows the content.
    """
    suffix = _turn_suffix(tokenizer)
    if not suffix:
        return None
    special = set(tokenizer.all_special_ids) | {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    for tid in tokenizer.encode(suffix, add_special_tokens=False):
        if tid in special:
            return int(tid)
        if tokenizer.decode([tid]).strip():
            return None  # text, not a marker, ends the turn (e.g. "### User:")
    return None


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids that end a generation: eos, then the chat template's end-of-turn token (:func:`end_of_turn_id`).

    The sampler stops on these, and exported models carry them as
    ``generation_config.json``'s ``eos_token_id`` so that ``transformers``
    stops at the same place. A tokenizer without a renderable template
    falls back to the known end-of-turn markers in its vocabulary
    (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ``<|end|>``, ``<|eot|>``).
    """
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if _turn_suffix(tokenizer) is not None:
        eot = end_of_turn_id(tokenizer)
        return ids + [eot] if eot is not None and eot not in ids else ids
    vocab = tokenizer.get_vocab()
    for marker in _KNOWN_END_OF_TURN:
        tid = vocab.get(marker)
        if tid is not None and tid not in ids:
            ids.append(int(tid))
    return ids
