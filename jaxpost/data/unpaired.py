"""The KTO input pipeline: TRL's unpaired rows (``prompt``, ``completion``, ``label``) -> ``KTO_KEYS`` batches.

In grain terms::

    MapDataset.source(rows).shuffle(seed).repeat(num_epochs)
      .map_with_index(encode + limits)   # prompt ids, completion ids; None = dropped (counted)
      .to_iter_dataset(read_options)
      .batch(batch_size, batch_fn=kto_batch)   # matched rows + the rotated KL rows

The pipeline yields the *global* batch (every row, no per-host shard): the
KL rows of a batch are built from that batch's own completions, rotated by
one over its real rows as TRL's ``KTOTrainer`` does (``(x_1, y_n), (x_2,
y_1), ..., (x_n, y_{n-1})``), so they must see the whole batch. TRL fixes
its batches in dataset order (it requires a sequential sampler); here the
rotation is within each batch as shuffled (with ``shuffle=False`` the two
give the same KL rows, tested against TRL's own dataset preparation). A KL
sequence ``prompt_i + completion_{i-1}`` longer than ``seq_len`` keeps the
start of the completion (TRL cuts at ``max_length`` the same way).

Limits per example are those of one side of a preference pair
(:func:`jaxpost.data.prepare.prepare_preference_pair`): the prompt keeps its
end when longer than ``max_prompt_len`` (``prompt_truncated``), the
completion is cut to fit ``seq_len`` (``truncated``), an empty completion is
dropped (``dropped_empty``).
"""

from __future__ import annotations

from typing import Any, Mapping

import grain
import numpy as np

from jaxpost.data import encode, formats
from jaxpost.data.packing import pad_lm
from jaxpost.data.pipeline import DEFAULT_READ_OPTIONS, PipelineIterator
from jaxpost.data.prepare import _fit_pair
from jaxpost.data.sources import source_name
from jaxpost.data.stats import DataStats
from jaxpost.errors import UserError

_DROPS = ("dropped_empty", "dropped_too_long", "dropped_truncated_empty")


def prepare_unpaired(tokenizer: Any, example: Mapping[str, Any], seq_len: int, *,
                     max_prompt_len: int | None = None, overlong: str = "truncate"):
    """One normalised unpaired example -> ``({"prompt_ids", "completion_ids", "trained", "label"}, events)``.

    Ids are unpadded int32; ``trained`` marks the completion tokens the loss
    reads (the chat template's own tokens after the turn are not). ``None``
    instead of the dict when the example is dropped.
    """
    pair = {"format": formats.PREFERENCE, "prompt": example["prompt"], "chosen": example["completion"],
            "rejected": example["completion"], "conversational": example["conversational"]}
    fitted, events = _fit_pair(tokenizer, pair, seq_len, max_prompt_len, overlong)
    if fitted is None:
        return None, events
    prompt_ids, (ids, trained), _ = fitted
    return {"prompt_ids": np.asarray(prompt_ids, np.int32), "completion_ids": np.asarray(ids, np.int32),
            "trained": np.asarray(trained, bool), "label": np.float32(example["label"])}, events


def _sequence(prompt_ids, ids, trained, seq_len: int, pad: int) -> dict[str, np.ndarray]:
    ids, trained = ids[:seq_len - len(prompt_ids)], trained[:seq_len - len(prompt_ids)]
    arrays = encode.lm_arrays(np.r_[prompt_ids, ids], np.r_[np.zeros(len(prompt_ids), bool), trained], pad)
    return pad_lm(arrays, seq_len, pad)


def kto_batch(examples: list[Mapping[str, Any]], batch_size: int, seq_len: int, pad: int) -> dict[str, np.ndarray]:
    """Stacks prepared examples into one ``KTO_KEYS`` batch of ``batch_size`` rows (padding rows at the end).

    Row ``i`` holds ``prompt_i + completion_i``; its KL row
    ``prompt_i + completion_{(i - 1) mod n}`` over the ``n`` real rows.
    """
    n = len(examples)
    if not 0 < n <= batch_size:
        raise ValueError(f"kto_batch needs 1..{batch_size} examples, got {n}")
    empty = {k: np.zeros(seq_len, np.float32 if k == "loss_mask" else np.int32)
             for k in ("tokens", "positions", "segment_ids", "targets", "loss_mask")}
    empty["tokens"][:] = empty["targets"][:] = pad
    rows, kl_rows = [], []
    for i, ex in enumerate(examples):
        other = examples[(i - 1) % n]
        rows.append(_sequence(ex["prompt_ids"], ex["completion_ids"], ex["trained"], seq_len, pad))
        kl_rows.append(_sequence(ex["prompt_ids"], other["completion_ids"], other["trained"], seq_len, pad))
    rows += [empty] * (batch_size - n)
    kl_rows += [empty] * (batch_size - n)
    out = {k: np.stack([r[k] for r in rows]) for k in empty}
    out.update({f"kl_{k}": np.stack([r[k] for r in kl_rows]) for k in empty})
    out["label"] = np.array([ex["label"] for ex in examples] + [0.0] * (batch_size - n), np.float32)
    out["example_mask"] = np.array([1.0] * n + [0.0] * (batch_size - n), np.float32)
    out["row_index"] = np.array([ex["row_index"] for ex in examples] + [-1] * (batch_size - n), np.int32)
    return out


def make_unpaired_pipeline(rows: Any, tokenizer: Any, seq_len: int, batch_size: int, seed: int = 0, *,
                           max_prompt_len: int | None = None, overlong: str = "truncate",
                           num_epochs: int | None = None, shuffle: bool = True,
                           read_options: grain.ReadOptions | None = None,
                           stats: DataStats | None = None) -> PipelineIterator:
    """KTO batches (``KTO_KEYS``, ``[batch_size, seq_len]`` each) from unpaired rows; see the module docstring.

    ``rows``: a ``datasets.Dataset`` or a list of dicts in TRL's unpaired
    format (plain or conversational). ``get_state``/``set_state`` resume the
    exact stream, as the other pipelines'.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None (forever), got {num_epochs}")
    stats = stats if stats is not None else DataStats()
    source = source_name(rows)
    fmt = formats.check_rows(rows, source)
    if fmt != formats.UNPAIRED:
        raise ValueError(f"the KTO pipeline takes unpaired rows (prompt, completion, label), but "
                         f"{source or 'the data'} is {fmt!r}")
    pad, epoch_len = encode.pad_id(tokenizer), len(rows)

    def encode_row(index: int, indexed_row):
        row_index, row = indexed_row
        example = formats.normalize_row(row, fmt, row_index, source)
        out, events = prepare_unpaired(tokenizer, example, seq_len, max_prompt_len=max_prompt_len, overlong=overlong)
        stats.record(index, events)
        if out is None:
            counts = stats.counts()
            if index + 1 >= epoch_len and sum(counts[r] for r in _DROPS) >= counts["examples"] >= epoch_len:
                raise UserError(f"Every example of {source or 'the data'} was dropped ({counts}); raise seq_len or "
                                "check the data")
            return None
        out["row_index"] = np.int32(row_index)
        return out

    ds = grain.MapDataset.source(rows).map_with_index(lambda i, row: (i, row))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs).map_with_index(encode_row)
    it = ds.to_iter_dataset(read_options or DEFAULT_READ_OPTIONS)
    it = it.batch(batch_size, batch_fn=lambda exs: kto_batch(exs, batch_size, seq_len, pad))
    return PipelineIterator(it, stats)
