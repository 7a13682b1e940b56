"""Reading rows: local files and saved datasets (and Hub names) via ``datasets``.

The result is a ``datasets.Dataset``: memory-mapped Arrow, random access by
integer index, so it serves directly as a grain ``MapDataset.source`` (grain
only needs ``__len__`` and ``__getitem__``). Plain Python lists of dicts are
accepted everywhere rows are, too.

Nothing here unpickles: JSON, Parquet and Arrow only.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import datasets
import gin
import numpy as np

Rows = Any
"""A ``datasets.Dataset`` or a sequence of dict rows."""

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_SOURCE_TAG = "jaxpost-source:"


def source_name(rows: Rows) -> str | None:
    """The file or dataset name ``rows`` came from, if :func:`load_rows` read it."""
    if isinstance(rows, datasets.Dataset):
        desc = rows.info.description or ""
        if desc.startswith(_SOURCE_TAG):
            return desc[len(_SOURCE_TAG):]
    return None


def find_json_error(path: str | os.PathLike) -> None:
    """Raises ``ValueError("<path>:<line>: ...")`` for the first bad line of a JSON file.

    A ``.jsonl`` file must hold one JSON object per non-blank line. A ``.json``
    file may be a single array of objects or JSON lines. Returns None when the
    file is well formed (the caller then re-raises the original error).
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise ValueError(f"{path}: element {i} of the top-level array is a "
                                 f"{type(row).__name__}, expected a JSON object")
        return None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: malformed JSON line ({e.msg}, column {e.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
    return None


def _looks_like_path(where: str) -> bool:
    # Hub names are "name" or "org/name"; anything else is a missing local path.
    return (Path(where).suffix.lower() in (*_BUILDERS, ".arrow")
            or where.startswith(("/", ".", "~")) or where.count("/") > 1)


def _tag(ds: datasets.Dataset, name: str) -> datasets.Dataset:
    # The description travels with the Dataset (also through select/shuffle),
    # so later errors can name the file a bad row came from.
    ds.info.description = _SOURCE_TAG + name
    return ds


def _pick_split(dd: datasets.DatasetDict, split: str, where: str) -> datasets.Dataset:
    if split not in dd:
        raise KeyError(f"{where} has no split {split!r}; available: {sorted(dd)}")
    return dd[split]


@gin.configurable
def load_rows(path_or_name: str | os.PathLike, split: str = "train", *,
              validate: bool = True) -> datasets.Dataset:
    """Loads a dataset as a ``datasets.Dataset``.

    * ``*.jsonl`` / ``*.json`` / ``*.parquet`` file: read with the matching
      ``datasets`` builder; ``split`` may slice (``"train[:10%]"``).
    * ``*.arrow`` file: ``Dataset.from_file`` (memory-mapped).
    * directory written by ``save_to_disk``: ``load_from_disk`` (``split``
      picks from a ``DatasetDict``).
    * other directory: ``load_dataset(dir)`` (a folder of data files).
    * anything else: a Hub dataset name, ``load_dataset(name, split=split)``
      (needs a network; never runs remote code).

    A malformed JSON line raises ``ValueError("<file>:<line>: ...")``. With
    ``validate`` the rows are checked against the TRL formats
    (:func:`jaxpost.data.formats.check_rows`): missing columns or null fields
    raise naming the field, the row and the file.
    """
    where = str(path_or_name)
    path = Path(path_or_name)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".arrow":
            ds = datasets.Dataset.from_file(str(path))
        elif suffix in _BUILDERS:
            try:
                ds = datasets.load_dataset(_BUILDERS[suffix], data_files=str(path), split=split)
            except Exception as e:
                if suffix in (".json", ".jsonl"):
                    find_json_error(path)  # raises with file:line when it finds the culprit
                raise ValueError(f"Could not read {path}: {e}") from e
        else:
            raise ValueError(f"Unsupported data file {path}: expected one of "
                             f"{sorted([*_BUILDERS, '.arrow'])}")
    elif path.is_dir():
        if any((path / m).exists() for m in _SAVED_MARKERS):
            loaded = datasets.load_from_disk(str(path))
            ds = _pick_split(loaded, split, where) if isinstance(loaded, datasets.DatasetDict) else loaded
        else:
            ds = datasets.load_dataset(str(path), split=split)
    elif _looks_like_path(where):
        raise FileNotFoundError(f"Data file or directory {where} does not exist")
    else:
        try:
            ds = datasets.load_dataset(where, split=split)
        except Exception as e:
            raise ValueError(f"{where!r} is neither a local file/directory nor a loadable "
                             f"Hub dataset (split {split!r}): {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        ds = _pick_split(ds, split, where)
    ds = _tag(ds, where)
    if validate:
        from jaxpost.data.formats import check_rows
        check_rows(ds, source=where)
    return ds


def _select(rows: Rows, idx: Sequence[int]) -> Rows:
    if isinstance(rows, datasets.Dataset):
        return rows.select(idx)
    return [rows[i] for i in idx]


@gin.configurable
def train_eval_split(rows: Rows, *, eval_fraction: float | None = None,
                     eval_path: str | os.PathLike | None = None,
                     seed: int = 0) -> tuple[Rows, Rows]:
    """Splits off held-out rows; returns ``(train_rows, eval_rows)``.

    Either ``eval_path`` (a separate file, loaded with :func:`load_rows`; the
    training rows are returned unchanged) or ``eval_fraction`` in (0, 1):
    ``n_eval = ceil(n * eval_fraction)`` rows chosen by
    ``np.random.default_rng(seed).permutation(n)[:n_eval]``; both parts keep
    the original row order. Deterministic given ``seed``.
    """
    if (eval_fraction is None) == (eval_path is None):
        raise ValueError("Pass exactly one of eval_fraction and eval_path")
    if eval_path is not None:
        return rows, load_rows(eval_path)
    n = len(rows)
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    n_eval = math.ceil(n * eval_fraction)
    if n_eval >= n:
        raise ValueError(f"eval_fraction={eval_fraction} of {n} rows leaves no training rows")
    perm = np.random.default_rng(seed).permutation(n)
    eval_idx = np.sort(perm[:n_eval]).tolist()
    train_idx = np.sort(perm[n_eval:]).tolist()
    return _select(rows, train_idx), _select(rows, eval_idx)
