"""Counts of examples the input pipeline truncated or dropped, by reason.

Nothing is dropped silently: every encoder reports what it did to each
example, and :class:`DataStats` adds it up. A pipeline owns one ``DataStats``
(``iterator.stats``); read it at any time with :meth:`DataStats.as_metrics`.

Counting happens inside grain map functions, which run in the training
process (grain's default, and the pipelines here use no worker processes). If
you turn on grain worker *processes*, each worker holds its own copy and the
counts you read in the main process stay at zero: keep
``worker_count=0`` (threads are fine).

Exactly-once counting: a pipeline element is identified by its index in the
host's (sharded, shuffled, repeated) stream. An index is counted the first
time it is encoded; prefetch threads may encode out of order, and after
``set_state`` grain replays a few elements (packing restarts from the last
emitted packed group) -- those replays are recognised and not counted again.
The set of counted indices is part of the iterator state, so a resumed run
reports the same totals as one that never stopped.
"""

from __future__ import annotations

import threading
from typing import Any, Iterable, Mapping

from jaxpost.distributed import is_main_process

EXAMPLES = "examples"
"""Every example the encoder saw (kept or dropped)."""

REASONS = (
    "dropped_empty",            # no trainable token (empty completion / no assistant turn)
    "dropped_too_long",         # longer than the limit, policy "drop"
    "dropped_truncated_empty",  # truncation removed every trainable token
    "truncated",                # response/text cut to fit, example kept
    "prompt_truncated",         # prompt cut (its end kept), example kept
)
"""Every reason an encoder may report; ``as_metrics`` always lists them all."""


class DataStats:
    """Thread-safe counters of pipeline events, counted once per element index.

    ``record(index, events)`` adds 1 to ``examples`` and to each reason in
    ``events`` unless ``index`` was already recorded.
    ``as_metrics()`` -> ``{"data/examples": n, "data/dropped_empty": n, ...}``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {EXAMPLES: 0, **{r: 0 for r in REASONS}}
        # Indices < _below are all recorded; _above holds recorded ones beyond
        # it (prefetch threads finish out of order). _above stays small: it is
        # at most the prefetch window.
        self._below = 0
        self._above: set[int] = set()

    def record(self, index: int, events: Iterable[str] = ()) -> bool:
        """Counts one element; returns False (and counts nothing) if seen before."""
        events = tuple(events)
        for e in events:
            if e not in REASONS:
                raise ValueError(f"Unknown data event {e!r}; expected one of {REASONS}")
        with self._lock:
            if index < self._below or index in self._above:
                return False
            self._above.add(index)
            while self._below in self._above:
                self._above.remove(self._below)
                self._below += 1
            self._counts[EXAMPLES] += 1
            for e in events:
                self._counts[e] += 1
            return True

    def counts(self) -> dict[str, int]:
        """A copy of the raw counters (``examples`` plus every reason)."""
        with self._lock:
            return dict(self._counts)

    def as_metrics(self, prefix: str = "data/") -> dict[str, int]:
        """Counters keyed ``prefix + name``, e.g. ``data/truncated``."""
        return {prefix + k: v for k, v in self.counts().items()}

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable snapshot: counters and the set of counted indices."""
        with self._lock:
            return {"counts": dict(self._counts), "below": self._below,
                    "above": sorted(self._above)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restores a snapshot from :meth:`get_state`."""
        try:
            counts = {str(k): int(v) for k, v in state["counts"].items()}
            below, above = int(state["below"]), {int(i) for i in state["above"]}
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"Malformed DataStats state {state!r}: {e}") from e
        with self._lock:
            self._counts = {EXAMPLES: 0, **{r: 0 for r in REASONS}, **counts}
            self._below, self._above = below, above

    def __repr__(self) -> str:
        return f"DataStats({self.counts()})"


def report_data_stats(stats: DataStats, what: str) -> dict[str, int]:
    """``stats.as_metrics()``, printed (main process) when anything was truncated or dropped: never silent.

    ``what`` names the data in the line (``"SFT"``, ``"DPO"``...). The counts
    are this host's share of the stream, the same numbers the run's
    ``summary.json`` (written by the main process) records.
    """
    metrics = stats.as_metrics()
    bad = {k: v for k, v in metrics.items() if v and not k.endswith("examples")}
    if bad and is_main_process():
        print(f"[jaxpost] {what} data: {metrics['data/examples']} examples seen; " +
              ", ".join(f"{k.split('/', 1)[1]}={v}" for k, v in sorted(bad.items())), flush=True)
    return metrics
