"""Deterministic, checkpointable grain input pipelines producing the batch specs.

Each pipeline is, in grain terms::

    MapDataset.source(rows)            # datasets.Dataset or list of dicts: all rows, on every host
      .shuffle(seed)                   # a new permutation every epoch
      .repeat(num_epochs)              # None = forever
      .map_with_index(encode + limits) # counts events in DataStats; None = dropped
      .to_iter_dataset(read_options)   # prefetch threads (no worker processes)
      [pack]                           # LM / preference with packing only: bins over the global batch
      .batch(batch_size)               # the global [batch_size, ...] numpy arrays

and is iterated through a :class:`PipelineIterator`, whose
``get_state()`` (JSON-serialisable) and ``set_state()`` resume the exact
same stream of batches, and whose ``stats`` counts dropped and truncated
examples. It is a ``grain.DatasetIterator``, so grain's Orbax handlers
(``grain.checkpoint.CheckpointSave``) can save it directly.

Multi-host: the order of examples (shuffle, packing, batches) is a function
of the rows, the seed and the options alone, not of the number of hosts.
Every host reads all rows and yields the same *global* batch of
``batch_size`` rows; :func:`jaxpost.train.batches.on_mesh` then moves to
each host's devices only the shards they hold. So 1 and N processes train
on the same batches, every host's iterator state is the same, and a
checkpoint resumes exactly on another number of hosts. The price: every
host tokenizes (and packs) every row, and holds the whole global batch in
host memory (tiny next to the model).

The last batch of a finite run is completed with padding rows (all masks 0)
so every batch has the same shape.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import gin
import grain
import numpy as np

from jaxpost.errors import UserError
from jaxpost.data import encode, formats
from jaxpost.data.packing import pack_lm, pad_lm, stack_rows
from jaxpost.data.pair_packing import pack_pairs, pair_element
from jaxpost.data.prepare import (prepare_lm, prepare_preference, prepare_preference_pair,
                                  prepare_preference_shared, prepare_prompt)
from jaxpost.data.sources import source_name
from jaxpost.data.stats import DataStats

DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=64)
"""One prefetch thread: overlaps tokenization with the train step while the
tokenizer is only ever called from one thread at a time."""

REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
"""Precomputed reference log-probs (DPO) carried from rows into preference batches."""

_LM_FORMATS = (formats.TEXT, formats.MESSAGES, formats.PROMPT_COMPLETION)
_PROMPT_FORMATS = (formats.PROMPT_ONLY, formats.PROMPT_COMPLETION, formats.PREFERENCE)


class PipelineIterator(grain.DatasetIterator):
    """Iterator over batches with ``get_state``/``set_state`` and a ``stats`` attribute.

    State: ``{"grain": <grain iterator state>, "stats": <DataStats state>}``,
    plain JSON types only.
    """

    def __init__(self, dataset: grain.IterDataset, stats: DataStats):
        super().__init__(dataset.__iter__())
        self.stats = stats

    def __next__(self) -> dict[str, Any]:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position of the pipeline and its counters."""
        return {"grain": self._parent.get_state(), "stats": self.stats.get_state()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restores a state from :meth:`get_state` (same rows, seed and options)."""
        if not isinstance(state, Mapping) or "grain" not in state or "stats" not in state:
            raise ValueError(f"Not a jaxpost pipeline state (expected keys 'grain' and 'stats'): {state!r}")
        self._parent.set_state(state["grain"])
        self.stats.set_state(state["stats"])


def _rows_dataset(rows: Any, allowed: tuple[str, ...], kind: str, *, seed: int, shuffle: bool,
                  num_epochs: int | None) -> tuple[grain.MapDataset, str, str | None]:
    source = source_name(rows)
    fmt = formats.check_rows(rows, source)
    if fmt not in allowed:
        raise ValueError(f"{kind} pipeline takes formats {allowed}, but {source or 'the data'} is {fmt!r}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None (forever), got {num_epochs}")
    # Keep each row's original index: errors found while encoding name it.
    ds = grain.MapDataset.source(rows).map_with_index(lambda i, row: (i, row))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    return ds.repeat(num_epochs), fmt, source


_DROPS = ("dropped_empty", "dropped_too_long", "dropped_truncated_empty")


def _counted(stats: DataStats, fn: Callable[[int, Mapping[str, Any]], tuple[Any, tuple[str, ...]]],
             epoch_len: int, source: str | None):
    """Wraps an encoder so every element is counted, and a pass that keeps nothing is an error.

    Without the check, a pipeline repeating forever over rows that are all
    dropped (e.g. every example longer than ``seq_len`` with ``overlong="drop"``)
    would loop without ever yielding a batch.
    """
    def apply(index: int, indexed_row: tuple[int, Mapping[str, Any]]):
        row_index, row = indexed_row
        out, events = fn(row_index, row)
        stats.record(index, events)
        if out is None and index + 1 >= epoch_len:
            counts = stats.counts()
            if counts["examples"] >= epoch_len and sum(counts[r] for r in _DROPS) >= counts["examples"]:
                raise UserError(f"Every example of {source or 'the data'} ({counts['examples']} seen) was dropped: "
                                f"{ {r: counts[r] for r in _DROPS} }; raise seq_len (a prompt longer than it "
                                f"leaves no response to train on) or check the data format")
        return out
    return apply


def _finish(ds: grain.MapDataset, batch_size: int, read_options: grain.ReadOptions | None,
            fill: Mapping[str, Any], pack: Callable[[grain.IterDataset], grain.IterDataset] | None,
            stats: DataStats) -> PipelineIterator:
    if batch_size < 1:
        raise UserError(f"the run's batch_size (e.g. sft.batch_size) must be >= 1, got {batch_size}")
    it = ds.to_iter_dataset(read_options or DEFAULT_READ_OPTIONS)
    if pack is not None:
        it = pack(it)
    it = it.batch(batch_size, batch_fn=lambda rows: stack_rows(rows, batch_size, fill))
    return PipelineIterator(it, stats)


@gin.configurable
def make_lm_pipeline(rows: Any, tokenizer: Any, seq_len: int, batch_size: int, seed: int = 0, *,
                     packing: bool = True, train_on_prompt: bool = False, overlong: str = "truncate",
                     num_epochs: int | None = None, shuffle: bool = True,
                     packing_bins: int | None = None, read_options: grain.ReadOptions | None = None,
                     stats: DataStats | None = None) -> PipelineIterator:
    """SFT / LM batches: ``tokens, positions, segment_ids, targets`` int32 and
    ``loss_mask`` float32, all ``[batch_size, seq_len]``.

    Formats ``text``, ``messages``, ``prompt_completion``. Loss only on
    completions / assistant turns unless ``train_on_prompt``. With
    ``packing`` several examples share a row (first fit over
    ``packing_bins`` rows, default ``batch_size``); otherwise one example per
    row, right-padded. Over-long examples are truncated (``truncated``) or,
    with ``overlong="drop"``, dropped (``dropped_too_long``); examples with
    nothing to train are dropped (``dropped_empty``). ``batch_size`` is the
    global batch: every host yields the same batches (module docstring).
    """
    stats = stats if stats is not None else DataStats()
    ds, fmt, source = _rows_dataset(
        rows, _LM_FORMATS, "LM", seed=seed, shuffle=shuffle, num_epochs=num_epochs)
    pad = encode.pad_id(tokenizer)

    def encode_row(row_index: int, row: Mapping[str, Any]):
        example = formats.normalize_row(row, fmt, row_index, source)
        arrays, events = prepare_lm(tokenizer, example, seq_len, train_on_prompt=train_on_prompt,
                                    overlong=overlong)
        if arrays is not None and not packing:
            arrays = pad_lm(arrays, seq_len, pad)
        return arrays, events

    ds = ds.map_with_index(_counted(stats, encode_row, len(rows), source))
    pack = (lambda it: pack_lm(it, seq_len, num_bins=packing_bins or batch_size, pad=pad, seed=seed)) \
        if packing else None
    return _finish(ds, batch_size, read_options, {"tokens": pad, "targets": pad}, pack, stats)


@gin.configurable
def make_preference_pipeline(rows: Any, tokenizer: Any, seq_len: int, batch_size: int, seed: int = 0, *,
                             max_prompt_len: int | None = None, overlong: str = "truncate",
                             packing: bool = False, max_pairs_per_row: int | None = None,
                             packing_bins: int | None = None, shared_prompt: bool = False,
                             num_epochs: int | None = None, shuffle: bool = True,
                             read_options: grain.ReadOptions | None = None,
                             stats: DataStats | None = None) -> PipelineIterator:
    """DPO / reward batches, one pair per row or (``packing``) several pairs per row.

    Unpacked (default): the LM keys prefixed ``chosen_`` and ``rejected_``,
    each ``[batch_size, seq_len]``; ``row_index`` int32 ``[B]`` (the source
    row, -1 for padding rows) and ``pair_mask`` float32 ``[B]`` (0 for
    padding rows); ``margin`` float32 ``[B]`` when the data has a ``margin``
    column, and ``ref_chosen_logps``/``ref_rejected_logps`` when it carries
    precomputed reference log-probs.

    Packed (``PACKED_PREFERENCE_KEYS``, layout in
    :mod:`jaxpost.data.pair_packing`): the LM keys plus ``pair_ids`` and
    ``pair_sides``, each ``[batch_size, 2 * seq_len]`` (a row holds the
    tokens of one unpacked pair, so a batch costs the same and carries more
    pairs); the per-pair keys above become ``[batch_size, K]`` with
    ``K = max_pairs_per_row`` (default ``seq_len``: a pair has at least 2
    tokens, so the default never binds; the ``[B, K]`` arrays are small). Rows are filled first-fit over
    ``packing_bins`` rows at a time (default ``batch_size``). Each side is
    limited and truncated exactly as unpacked, so both layouts train the
    same pairs.

    Shared prompt (``shared_prompt``, ``SHARED_PROMPT_KEYS``, see
    :mod:`jaxpost.algorithms.shared_prompt`): one pair per row,
    ``prompt_tokens``/``prompt_mask`` ``[B, P]`` with ``P = max_prompt_len``
    and each reply ``[B, seq_len - P]``; the model runs the prompt once for
    both replies. Replies longer than ``seq_len - P`` are cut there
    (counted ``truncated``).

    Chosen and rejected start with the same prompt ids; the prompt keeps its
    end when longer than ``max_prompt_len`` (default ``seq_len // 2``) and
    completions are cut at their end to fit (see
    :func:`jaxpost.data.prepare.prepare_preference_pair`). ``batch_size``
    is the global batch: every host yields the same batches (module docstring).
    """
    if shared_prompt and packing:
        raise UserError("shared_prompt=True and packing=True are two layouts of the pairs (dpo.*, reward_model.*); "
                        "choose one")
    stats = stats if stats is not None else DataStats()
    ds, fmt, source = _rows_dataset(
        rows, (formats.PREFERENCE,), "Preference", seed=seed, shuffle=shuffle, num_epochs=num_epochs)
    pad = encode.pad_id(tokenizer)
    # Packed rows hold one array per pair-level key, so a key must be on every pair or on none.
    pair_keys = ["pair_mask", "row_index"]
    if packing:
        present = set(formats.columns(rows))
        pair_keys += [k for k in ("margin", *REFERENCE_COLUMNS) if k in present]

    def encode_row(row_index: int, row: Mapping[str, Any]):
        example = formats.normalize_row(row, fmt, row_index, source)
        prepare = (prepare_preference_pair if packing else
                   prepare_preference_shared if shared_prompt else prepare_preference)
        arrays, events = prepare(tokenizer, example, seq_len, max_prompt_len=max_prompt_len, overlong=overlong)
        if arrays is None:
            return arrays, events
        arrays["row_index"] = np.int32(row_index)
        arrays["pair_mask"] = np.float32(1.0)
        for key in REFERENCE_COLUMNS:
            if row.get(key) is not None:
                arrays[key] = np.float32(row[key])
        if packing:
            missing = [k for k in pair_keys if k not in arrays]
            if missing:
                raise ValueError(f"{formats.row_location(row_index, source)}: {missing} is null; packed preference "
                                 "batches need it on every row")
            arrays = pair_element(arrays["chosen"], arrays["rejected"], {k: arrays[k] for k in pair_keys})
        return arrays, events

    ds = ds.map_with_index(_counted(stats, encode_row, len(rows), source))
    if packing:
        max_pairs = max_pairs_per_row or seq_len
        pack = lambda it: pack_pairs(it, 2 * seq_len, max_pairs, num_bins=packing_bins or batch_size, pad=pad,
                                     pair_keys=pair_keys, seed=seed)
        fill = {"tokens": pad, "targets": pad, "row_index": -1, "pair_mask": 0.0}
        return _finish(ds, batch_size, read_options, fill, pack, stats)
    token_keys = ("tokens",) if shared_prompt else ("tokens", "targets")
    fill = {f"{side}_{k}": pad for side in ("chosen", "rejected") for k in token_keys}
    fill.update(row_index=-1, pair_mask=0.0)
    if shared_prompt:
        fill["prompt_tokens"] = pad
    return _finish(ds, batch_size, read_options, fill, None, stats)


@gin.configurable
def make_prompt_pipeline(rows: Any, tokenizer: Any, max_prompt_len: int, batch_size: int, seed: int = 0, *,
                         overlong: str = "truncate", num_epochs: int | None = None,
                         shuffle: bool = True, read_options: grain.ReadOptions | None = None,
                         stats: DataStats | None = None) -> PipelineIterator:
    """Prompts for online methods (PPO, GRPO/RLOO, online DPO, generation).

    Batch: ``prompt_tokens`` int32 ``[B, max_prompt_len]`` left-padded,
    ``prompt_mask`` int32 ``[B, P]`` (1 = real token), ``prompt`` (list of
    the prompt as given, string or messages) and ``row`` (list of the full
    source rows, e.g. reference answers for reward functions). Formats with
    a prompt: ``prompt_only``, ``prompt_completion``, ``preference``
    (implicit prompts are extracted). Padding rows of a short final batch
    have an all-zero mask and ``None`` for ``prompt``/``row``. ``B =
    batch_size`` is the global batch: every host yields the same prompts
    (module docstring).
    """
    stats = stats if stats is not None else DataStats()
    ds, fmt, source = _rows_dataset(
        rows, _PROMPT_FORMATS, "Prompt", seed=seed, shuffle=shuffle, num_epochs=num_epochs)
    pad = encode.pad_id(tokenizer)

    def encode_row(row_index: int, row: Mapping[str, Any]):
        example = formats.normalize_row(row, fmt, row_index, source)
        arrays, events = prepare_prompt(tokenizer, example["prompt"], max_prompt_len, overlong=overlong)
        if arrays is not None:
            arrays = {**arrays, "prompt": example["prompt"], "row": dict(row)}
        return arrays, events

    ds = ds.map_with_index(_counted(stats, encode_row, len(rows), source))
    return _finish(ds, batch_size, read_options, {"prompt_tokens": pad}, None, stats)


def array_entries(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The array entries of a batch (drops raw ``prompt``/``row`` lists)."""
    return {k: v for k, v in batch.items() if isinstance(v, np.ndarray)}
