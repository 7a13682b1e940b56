"""The shared side-by-side workload (/work/shared/bench/WORKLOAD.md) as plain numpy data.

Every system in the benchmark reads its token ids from here, so jaxpost,
TRL and the bare torch loop train on the same integers. Token ids are drawn
from ``[FIRST_FREE_ID, vocab)``; ids 0 and 1 are reserved for the pad and
end-of-sequence tokens of the word-level tokenizer TRL needs (its DPO
trainer only accepts text, which this tokenizer turns back into the exact
ids).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

PAD_ID, EOS_ID, FIRST_FREE_ID = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Shape:
    """Batch geometry of one task.

    SFT: ``batch`` rows of ``seq`` tokens, loss on every next-token
    prediction. DPO: ``batch`` pairs; each sequence is ``prompt`` prompt
    tokens followed by ``seq - prompt`` completion tokens, the last of which
    is EOS; loss on the completion tokens.
    """

    batch: int
    seq: int
    prompt: int = 0

    def __post_init__(self):
        if self.batch < 1 or self.seq < 2:
            raise ValueError(f"Need batch >= 1 and seq >= 2, got batch={self.batch} seq={self.seq}")
        if not 0 <= self.prompt < self.seq - 1:
            raise ValueError(f"prompt length {self.prompt} must be in [0, seq - 1) with seq={self.seq}")

    @property
    def completion(self) -> int:
        return self.seq - self.prompt


SFT_SHAPE = Shape(batch=8, seq=512)
DPO_SHAPE = Shape(batch=4, seq=512, prompt=128)


def sft_ids(shape: Shape, vocab: int, seed: int = 0) -> np.ndarray:
    """Token ids ``[batch, seq]`` int32, uniform on ``[FIRST_FREE_ID, vocab)`` (numpy seed ``seed``)."""
    rng = np.random.default_rng(seed)
    return rng.integers(FIRST_FREE_ID, vocab, size=(shape.batch, shape.seq), dtype=np.int64).astype(np.int32)


def dpo_ids(shape: Shape, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``prompt [B, P]``, ``chosen [B, C]``, ``rejected [B, C]`` int32; completions end with EOS.

    ``P = shape.prompt``, ``C = shape.completion``; a pair's chosen and
    rejected sequences share its prompt.
    """
    rng = np.random.default_rng(seed)
    draw = lambda n: rng.integers(FIRST_FREE_ID, vocab, size=(shape.batch, n), dtype=np.int64).astype(np.int32)
    prompt, chosen, rejected = draw(shape.prompt), draw(shape.completion), draw(shape.completion)
    chosen[:, -1] = EOS_ID
    rejected[:, -1] = EOS_ID
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def lm_batch(ids: np.ndarray, trained_from: int = 0) -> dict[str, np.ndarray]:
    """jaxpost LM batch (``LM_KEYS``) of unpacked rows ``ids [B, L]``.

    ``targets[:, t] = ids[:, t + 1]`` (0 at the last position), one segment
    per row, ``loss_mask[:, t] = 1`` for ``trained_from - 1 <= t < L - 1``:
    the predictions of tokens ``trained_from .. L-1`` (all of them when
    ``trained_from = 0``). This is the label convention of Hugging Face
    causal LMs (labels shifted inside the model).
    """
    B, L = ids.shape
    t = np.arange(L)
    targets = np.concatenate([ids[:, 1:], np.zeros((B, 1), np.int32)], axis=1)
    mask = ((t >= max(trained_from - 1, 0)) & (t < L - 1)).astype(np.float32)
    return {"tokens": ids.astype(np.int32), "positions": np.broadcast_to(t, (B, L)).astype(np.int32),
            "segment_ids": np.ones((B, L), np.int32), "targets": targets.astype(np.int32),
            "loss_mask": np.broadcast_to(mask, (B, L)).copy()}


def dpo_batch(pairs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """jaxpost preference batch (``PREFERENCE_KEYS``): prompt + completion, loss on the completion."""
    P = pairs["prompt"].shape[1]
    out = {}
    for side in ("chosen", "rejected"):
        ids = np.concatenate([pairs["prompt"], pairs[side]], axis=1)
        out.update({f"{side}_{k}": v for k, v in lm_batch(ids, trained_from=P).items()})
    return out


def shared_dpo_batch(pairs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same pairs as :func:`dpo_batch` in jaxpost's shared-prompt layout (``SHARED_PROMPT_KEYS``).

    The prompt is run once for both completions; the loss weighs the same
    completion tokens (every one of them).
    """
    B, P = pairs["prompt"].shape
    out = {"prompt_tokens": pairs["prompt"].astype(np.int32), "prompt_mask": np.ones((B, P), np.int32)}
    for side in ("chosen", "rejected"):
        ids = pairs[side].astype(np.int32)
        out.update({f"{side}_tokens": ids, f"{side}_mask": np.ones(ids.shape, np.int32),
                    f"{side}_loss_mask": np.ones(ids.shape, np.float32)})
    return out


def trained_tokens(batch: dict[str, np.ndarray]) -> int:
    """Number of trained predictions (sum of every ``*loss_mask``)."""
    return int(sum(v.sum() for k, v in batch.items() if k.endswith("loss_mask")))


def ids_to_text(ids) -> str:
    """Space-joined word tokens ``t<id>`` (``<pad>``/``</s>`` for ids 0/1): the inverse of the tokenizer."""
    names = {PAD_ID: "<pad>", EOS_ID: "</s>"}
    return " ".join(names.get(int(i), f"t{int(i)}") for i in ids)


def build_tokenizer(vocab: int, out_dir: str | os.PathLike):
    """Word-level fast tokenizer with ``vocab`` entries, id ``i`` <-> word ``t<i>``; saved to ``out_dir``.

    Splitting on whitespace only, no special tokens added on encode, so
    ``encode(ids_to_text(ids)) == ids`` and concatenating texts
    concatenates ids (what TRL's DPO prompt/completion split relies on).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": PAD_ID, "</s>": EOS_ID, **{f"t{i}": i for i in range(FIRST_FREE_ID, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")
    fast.save_pretrained(os.fspath(out_dir))
    return fast
