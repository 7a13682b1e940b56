"""A teacher's top-k log-probs stored on disk, so distillation runs without the teacher in memory.

Built once by running the teacher over a dataset; layout of the directory::

    meta.json          {"num_rows", "seq_len", "top_k", "num_tokens", "teacher", "vocab_size", ...}
    tokens.npy ...     tokens, positions, segment_ids, targets int32, loss_mask float32: [num_rows, seq_len]
    offsets.npy        int64 [num_rows + 1]: row r's trained tokens are entries offsets[r]:offsets[r+1]
    topk_logps.f32     raw float32 [num_tokens, top_k]  (memory-mapped)
    topk_ids.i32       raw int32   [num_tokens, top_k]  (memory-mapped)

Rows are the dataset's examples, one per row (no packing), in dataset
order (examples with nothing to train are dropped and counted in
``meta.json``). Top-k entries exist only for trained tokens (``loss_mask
= 1``), in position order, so the cache costs ``2 k`` numbers per trained
token. Everything is plain numpy: nothing is unpickled on load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np

from jaxpost.algorithms.distill import make_teacher_topk_fn
from jaxpost.data import DataStats, PipelineIterator, make_lm_pipeline
from jaxpost.sharding import Partitioner
from jaxpost.train.batches import on_mesh

LM_ARRAYS = ("tokens", "positions", "segment_ids", "targets", "loss_mask")
_FORMAT_VERSION = 1


def build_teacher_cache(out_dir: str | os.PathLike, rows: Any, tokenizer: Any, teacher: tuple, seq_len: int,
                        top_k: int, *, batch_size: int = 8, partitioner: Partitioner | None = None,
                        chunk_size: int = 128, train_on_prompt: bool = False) -> "TeacherCache":
    """Runs ``teacher = (config, graphdef, params)`` over ``rows`` and writes its top-k per trained token.

    ``rows`` go through :func:`jaxpost.data.make_lm_pipeline` (one example per
    row, one epoch, in order); each batch's top-k comes from one jitted
    forward (:func:`jaxpost.algorithms.distill.make_teacher_topk_fn`) and is
    appended to the raw files, so memory holds one batch at a time. Writes
    ``meta.json`` last: a directory without it is an unfinished cache.
    Single process only.
    """
    if jax.process_count() > 1:
        raise RuntimeError("build_teacher_cache runs in one process; build the cache once, then train")
    config, graphdef, params = teacher
    part = partitioner or Partitioner()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats = DataStats()
    it = make_lm_pipeline(rows, tokenizer, seq_len, batch_size, packing=False, num_epochs=1, shuffle=False,
                          train_on_prompt=train_on_prompt, stats=stats)
    topk = jax.jit(make_teacher_topk_fn(graphdef, config, top_k, chunk_size))
    lm: dict[str, list[np.ndarray]] = {k: [] for k in LM_ARRAYS}
    counts = [0]
    with (out / "topk_logps.f32").open("wb") as flp, (out / "topk_ids.i32").open("wb") as fid, part.activate():
        for batch in it:
            real = np.asarray(batch["segment_ids"]).any(-1)  # padding rows of the last batch
            lp, ids = jax.device_get(topk(params, on_mesh({k: batch[k] for k in LM_ARRAYS}, part)))
            for r in np.flatnonzero(real):
                trained = np.asarray(batch["loss_mask"][r]) != 0
                flp.write(np.ascontiguousarray(lp[r][trained], np.float32).tobytes())
                fid.write(np.ascontiguousarray(ids[r][trained], np.int32).tobytes())
                counts.append(int(trained.sum()))
                for k in LM_ARRAYS:
                    lm[k].append(np.asarray(batch[k][r]))
    if len(counts) == 1:
        raise ValueError(f"build_teacher_cache: no trainable example in the data ({stats.as_metrics()})")
    for k in LM_ARRAYS:
        np.save(out / f"{k}.npy", np.stack(lm[k]))
    offsets = np.cumsum(np.asarray(counts, np.int64))
    np.save(out / "offsets.npy", offsets)
    meta = {"version": _FORMAT_VERSION, "num_rows": len(counts) - 1, "seq_len": seq_len, "top_k": top_k,
            "num_tokens": int(offsets[-1]), "vocab_size": config.vocab_size,
            "teacher_layers": config.num_layers, "teacher_hidden": config.hidden_size,
            "train_on_prompt": train_on_prompt, "data": stats.as_metrics()}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return TeacherCache(out)


class TeacherCache:
    """A finished cache directory, memory-mapped; ``cache[r]`` is row ``r`` as a training example.

    ``cache[r]`` holds the LM arrays ``[seq_len]`` of row ``r`` plus
    ``teacher_topk_logps`` float32 and ``teacher_topk_ids`` int32
    ``[seq_len, top_k]``: the stored entries at trained positions, and
    ``0`` logps / id ``0`` elsewhere (masked out by ``loss_mask``).
    A random-access source for grain (``len`` and ``__getitem__``).
    """

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        meta_path = self.dir / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{self.dir} is not a finished teacher cache (no meta.json); build it with "
                                    "build_teacher_cache")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("version") != _FORMAT_VERSION:
            raise ValueError(f"{meta_path}: cache format version {self.meta.get('version')}, expected {_FORMAT_VERSION}")
        n, L, k, t = (self.meta[x] for x in ("num_rows", "seq_len", "top_k", "num_tokens"))
        self.top_k, self.seq_len, self.num_tokens = k, L, t
        self.arrays = {name: np.load(self.dir / f"{name}.npy", mmap_mode="r") for name in LM_ARRAYS}
        for name, a in self.arrays.items():
            if a.shape != (n, L):
                raise ValueError(f"{self.dir / (name + '.npy')} has shape {a.shape}, expected [num_rows, seq_len]="
                                 f"{(n, L)} from meta.json")
        self.offsets = np.load(self.dir / "offsets.npy")
        if self.offsets.shape != (n + 1,) or int(self.offsets[-1]) != t:
            raise ValueError(f"{self.dir / 'offsets.npy'} has shape {self.offsets.shape} / last {self.offsets[-1:]}, "
                             f"expected [{n + 1}] ending at num_tokens={t}")
        self.logps = np.memmap(self.dir / "topk_logps.f32", np.float32, mode="r", shape=(t, k))
        self.ids = np.memmap(self.dir / "topk_ids.i32", np.int32, mode="r", shape=(t, k))

    def __len__(self) -> int:
        return int(self.meta["num_rows"])

    def __getitem__(self, r: int) -> dict[str, np.ndarray]:
        r = int(r)
        row = {name: np.array(a[r]) for name, a in self.arrays.items()}
        trained = np.flatnonzero(row["loss_mask"] != 0)
        lo, hi = int(self.offsets[r]), int(self.offsets[r + 1])
        if hi - lo != trained.size:
            raise ValueError(f"teacher cache {self.dir} row {r}: {trained.size} trained tokens but {hi - lo} "
                             "stored top-k entries (corrupt cache)")
        lp = np.zeros((self.seq_len, self.top_k), np.float32)
        ids = np.zeros((self.seq_len, self.top_k), np.int32)
        lp[trained], ids[trained] = self.logps[lo:hi], self.ids[lo:hi]
        row["teacher_topk_logps"], row["teacher_topk_ids"] = lp, ids
        return row

    def check_compatible(self, seq_len: int, vocab_size: int) -> None:
        """Raises unless the cache was built for ``seq_len`` and ids fit a ``vocab_size`` student."""
        if self.seq_len != seq_len:
            raise ValueError(f"teacher cache {self.dir} has seq_len {self.seq_len}, the run asks for {seq_len}")
        if self.meta["vocab_size"] != vocab_size:
            raise ValueError(f"teacher cache {self.dir} was built by a teacher with vocab_size "
                             f"{self.meta['vocab_size']}, the student has vocab_size {vocab_size}")


def make_cache_pipeline(cache: TeacherCache, batch_size: int, seed: int = 0, *, num_epochs: int | None = None,
                        shuffle: bool = True, rows: np.ndarray | None = None) -> PipelineIterator:
    """Checkpointable batches of a :class:`TeacherCache` (batch spec ``CACHED_KEYS``).

    ``rows`` selects cache rows (e.g. a train/held-out split; default all).
    Shuffled per epoch with ``seed``; with finite ``num_epochs`` the last
    batch is completed with all-zero rows (mask 0). ``batch_size`` is the
    global batch: every host reads all selected rows and yields the same
    batches (see :mod:`jaxpost.data.pipeline`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    index = np.arange(len(cache)) if rows is None else np.asarray(rows)
    if index.size == 0:
        raise ValueError(f"teacher cache {cache.dir}: no rows selected")
    ds = grain.MapDataset.source(index.tolist()).map(lambda r: cache[r])
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs).to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=16))

    def stack(examples):
        out = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
        missing = batch_size - len(examples)
        if missing:
            out = {k: np.concatenate([v, np.zeros((missing,) + v.shape[1:], v.dtype)]) for k, v in out.items()}
        return out

    return PipelineIterator(ds.batch(batch_size, batch_fn=stack), DataStats())
