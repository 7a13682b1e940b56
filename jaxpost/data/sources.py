"""Reading rows: local files and saved datasets, and Hub datasets, via ``datasets``.

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

from jaxpost import paths
from jaxpost.errors import UserError

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
    """Raises ``UserError("<path>:<line>: ...")`` for the first bad line of a JSON file (1-based).

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
            raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno}); "
                            "fix the file") from None
        for i, row in enumerate(data, start=1):
            if not isinstance(row, dict):
                raise UserError(f"{path}: element {i} of the top-level array is a "
                                f"{type(row).__name__}; every element must be a JSON object")
        return None
    for lineno, line in enumerate(paths.jsonl_lines(text), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: malformed JSON line ({e.msg}, column {e.colno}); "
                            "each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
    return None


def _has_text(path: Path) -> bool:
    """Whether the file holds anything but whitespace (read in blocks: a large file stops at its first block)."""
    with open(path, "rb") as f:
        while block := f.read(1 << 16):
            if block.strip():
                return True
    return False


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
        raise UserError(f"{where} has no split {split!r}; available: {sorted(dd)}; pick one of them "
                        "('name@split' or load_rows.split)")
    return dd[split]


def parse_data_name(path_or_name: str | os.PathLike) -> tuple[str, str | None, str | None]:
    """``"org/ds:config@split"`` -> ``("org/ds", "config", "split")``; absent parts are None.

    A path that exists is returned whole. ``":config"`` and ``"@split"``
    are each optional (``"org/ds@test"``, ``"org/ds:main"``); the split may
    slice (``"org/ds@train[:10%]"``); ``"data/saved@test"`` names a split
    of a local directory or file the same way.
    """
    text = os.fspath(path_or_name)
    if Path(text).exists():
        return text, None, None
    name, split = (text.split("@", 1) + [None])[:2] if "@" in text else (text, None)
    name, config = (name.split(":", 1) + [None])[:2] if ":" in name else (name, None)
    return name, config or None, split or None


def _load_hub(name: str, config: str | None, split: str, where: str) -> datasets.Dataset:
    """A Hub dataset: from huggingface_hub's cache when there, else ``datasets.load_dataset(name)``."""
    from jaxpost.hub import cached_dataset_dir, hub_cache_dir, hub_offline

    cached = cached_dataset_dir(name)
    try:
        if cached is not None:
            # The snapshot is a plain directory: its README's `configs:` name the
            # data files of each config and split, as on the Hub. No network.
            return datasets.load_dataset(str(cached), config, split=split)
        return datasets.load_dataset(name, config, split=split)
    except (ValueError, OSError) as e:  # unknown name, config or split; no network (ConnectionError)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        looked = (f"the Hugging Face cache {hub_cache_dir()}" +
                  (" (HF_HUB_OFFLINE=1: nothing is downloaded)" if hub_offline() and cached is None else "") +
                  ("" if cached is not None or hub_offline() else " and the Hub"))
        raise UserError(f"data {where!r} could not be loaded: no local file or directory of that name, and as a "
                        f"Hub dataset (config {config!r}, split {split!r}) from {looked}: {first}; give an existing "
                        "file/directory, or a cached or reachable Hub dataset ('org/name:config@split')") from e


@gin.configurable
def load_rows(path_or_name: str | os.PathLike, split: str | None = None, *, config: str | None = None,
              validate: bool = True) -> datasets.Dataset:
    """Loads a dataset as a ``datasets.Dataset``.

    * ``*.jsonl`` / ``*.json`` / ``*.parquet`` file: read with the matching
      ``datasets`` builder; ``split`` may slice (``"train[:10%]"``).
    * ``*.arrow`` file: ``Dataset.from_file`` (memory-mapped).
    * directory written by ``save_to_disk``: ``load_from_disk`` (``split``
      picks from a ``DatasetDict``).
    * other directory: ``load_dataset(dir)`` (a folder of data files).
    * anything else: a Hub dataset name, as TRL's ``dataset_name``,
      ``dataset_config`` and split: ``config`` and ``split`` here, or in the
      name itself, ``"org/name:config@split"`` (so ``train_data`` and
      ``eval_data`` can name different splits of one dataset). Read from
      huggingface_hub's cache when it holds the dataset's snapshot (offline,
      no waiting), else with ``datasets.load_dataset(name, config,
      split=split)`` (a download unless ``HF_HUB_OFFLINE=1``; never runs
      remote code).

    ``split`` defaults to ``"train"``. A local path that does not exist and
    cannot be a Hub name, an unreadable name, a missing split, and a
    malformed JSON line (``"<file>:<line>: ..."``, 1-based) raise
    :class:`jaxpost.errors.UserError`. With ``validate`` the rows are checked
    against the TRL formats (:func:`jaxpost.data.formats.check_rows`):
    missing or null fields and bad messages raise naming the field, the
    1-based row and the file.
    """
    where = str(path_or_name)
    if paths.is_remote(where):  # gs://, s3://: a local copy, read like a local file or directory
        path_or_name = paths.local_copy(where)
    name, name_config, name_split = parse_data_name(path_or_name)
    path = Path(name)  # "data/dd@test" is the split "test" of the local directory "data/dd"
    if name_split is not None and split is not None and name_split != split:
        raise UserError(f"data {where!r} names split {name_split!r} but split={split!r} is also set; keep one")
    if name_config is not None and config is not None and name_config != config:
        raise UserError(f"data {where!r} names config {name_config!r} but config={config!r} is also set; keep one")
    split = split or name_split or "train"
    config = config or name_config
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".arrow":
            ds = datasets.Dataset.from_file(str(path))
        elif suffix in _BUILDERS:
            if suffix in (".json", ".jsonl") and not _has_text(path):
                raise UserError(f"data file {path} is empty: it holds no rows (looked in {path.absolute()})")
            try:
                ds = datasets.load_dataset(_BUILDERS[suffix], data_files=str(path), split=split)
            except Exception as e:
                if suffix in (".json", ".jsonl"):
                    find_json_error(path)  # raises with file:line when it finds the culprit
                raise UserError(f"Could not read {path}: {str(e) or type(e).__name__}") from e
        else:
            raise UserError(f"Unsupported data file {path}: expected one of "
                            f"{sorted([*_BUILDERS, '.arrow'])}")
    elif path.is_dir():
        if any((path / m).exists() for m in _SAVED_MARKERS):
            loaded = datasets.load_from_disk(str(path))
            ds = _pick_split(loaded, split, where) if isinstance(loaded, datasets.DatasetDict) else loaded
        else:
            ds = datasets.load_dataset(str(path), config, split=split)
    elif _looks_like_path(name):
        raise UserError(f"Data file or directory {where} does not exist (looked in {Path(where).absolute()}); "
                        "check the path, or give a Hub dataset name 'org/name'")
    else:
        from jaxpost.hub import is_hub_name
        if not is_hub_name(name):
            raise UserError(f"data {where!r} is neither an existing file/directory nor a Hub dataset name "
                            "('org/name', optionally ':config' and '@split')")
        ds = _load_hub(name, config, split, where)
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
        raise UserError("Pass exactly one of eval_fraction and eval_path (eval_data)")
    if eval_path is not None:
        return rows, load_rows(eval_path)
    n = len(rows)
    if not 0.0 < eval_fraction < 1.0:
        raise UserError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    n_eval = math.ceil(n * eval_fraction)
    if n_eval >= n:
        raise UserError(f"eval_fraction={eval_fraction} of {n} rows leaves no training rows; lower it")
    perm = np.random.default_rng(seed).permutation(n)
    eval_idx = np.sort(perm[:n_eval]).tolist()
    train_idx = np.sort(perm[n_eval:]).tolist()
    return _select(rows, train_idx), _select(rows, eval_idx)
