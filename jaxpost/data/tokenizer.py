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

import os
from pathlib import Path
from typing import Iterable

import gin
# The direct module import avoids transformers' top-level AutoTokenizer path,
# which pulls in torch (seconds of import time) that tokenizing never needs.
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.tokenization_utils_tokenizers import PreTrainedTokenizerFast

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
    """Loads a tokenizer from a local Hugging Face directory (or a Hub name).

    Never runs repository code (``trust_remote_code=False``). If the
    tokenizer has no pad token, its eos token is used for padding (padding
    positions are masked anyway).
    """
    from transformers import AutoTokenizer

    where = str(path)
    if Path(where).exists() and not Path(where).is_dir():
        raise ValueError(f"{where} is a file; pass the tokenizer directory")
    tok = AutoTokenizer.from_pretrained(where, trust_remote_code=False)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"Tokenizer {where} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids that end a generation: eos and the chat end-of-turn marker if present."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for marker in (IM_END, "<|eot_id|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in ids \
                and marker in tokenizer.get_vocab():
            ids.append(tid)
    return ids
