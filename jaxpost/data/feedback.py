"""Feedback logs: what a deployed model receives from its users, read, validated and turned into training rows.

One JSON object per line (``docs/feedback.md`` is the user's page)::

    {"prompt": "...", "completion": "...", "label": true, "model_version": "v3"}          # thumbs up / down
    {"prompt": "...", "completion": "...", "rating": 4, "model_version": "v3"}            # a rating
    {"prompt": "...", "chosen": "...", "rejected": "...", "model_version": "v3"}          # a choice of two
    {"messages": [..., {"role": "assistant", ...}], "label": false, "model_version": "v3"} # a whole conversation

``prompt``/``completion``/``chosen``/``rejected`` are strings or lists of
``{role, content}`` messages, as in TRL's formats; ``messages`` is a
conversation whose last message (the ``assistant``'s) is the completion.
Exactly one of ``label``, ``rating`` or ``chosen`` + ``rejected``; a
non-empty string ``model_version``. Other fields (``id``, ``timestamp``,
``user``...) are kept out of training.

Binary labels and ratings become TRL's unpaired rows (``prompt``,
``completion``, ``label``; a rating is desirable when ``>= rating_threshold``)
for KTO; choices become preference rows (``prompt``, ``chosen``,
``rejected``) for DPO (:func:`training_rows`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any, Iterable

from jaxpost import paths
from jaxpost.data import formats
from jaxpost.errors import UserError

BINARY, RATING, CHOICE = "binary", "rating", "choice"
SUFFIX = ".jsonl"
_CONTENT = ("prompt", "completion", "chosen", "rejected", "messages")


def _fail(source: str, line: int, message: str):
    raise UserError(f"{source} line {line}: {message} (feedback format: docs/feedback.md)")


def parse_record(obj: Any, source: str, line: int) -> dict[str, Any]:
    """One feedback object -> ``{"kind", "prompt", ..., "model_version", "line"}``; raises naming file and line."""
    if not isinstance(obj, dict):
        _fail(source, line, f"expected a JSON object, got {type(obj).__name__}")
    version = obj.get("model_version")
    if not isinstance(version, str) or not version.strip():
        _fail(source, line, f"'model_version' must be a non-empty string (the model that answered), got {version!r}")
    has = {k for k in ("label", "rating", "chosen", "rejected") if obj.get(k) is not None}
    kinds = [k for k, keys in ((BINARY, {"label"}), (RATING, {"rating"}), (CHOICE, {"chosen", "rejected"}))
             if keys & has]
    if len(kinds) != 1:
        _fail(source, line, "give exactly one of 'label' (true/false), 'rating' (a number) or 'chosen' + 'rejected'"
              f"; this record has {sorted(has) or 'none of them'}")
    kind = kinds[0]
    if "messages" in obj:
        if any(obj.get(k) is not None for k in ("prompt", "completion")):
            _fail(source, line, "give either 'messages' or 'prompt' + 'completion', not both")
        messages = obj["messages"]
        if not formats.is_conversational(messages) or messages[-1].get("role") != "assistant" or len(messages) < 2:
            _fail(source, line, "'messages' must be a list of {role, content} messages ending with the assistant's "
                  "reply (the completion the feedback is about)")
        obj = {**obj, "prompt": list(messages[:-1]), "completion": [messages[-1]]}
    where = f"{source} line {line}"
    try:
        if kind == CHOICE:
            for k in ("chosen", "rejected", "prompt"):
                if obj.get(k) is None:
                    _fail(source, line, f"a choice needs 'prompt', 'chosen' and 'rejected'; {k!r} is missing")
            row = formats.normalize_row(obj, formats.PREFERENCE)
            out = {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}
        else:
            for k in ("prompt", "completion"):
                if obj.get(k) is None:
                    _fail(source, line, f"a {kind} record needs 'prompt' and 'completion' (or 'messages'); "
                          f"{k!r} is missing")
            row = formats.normalize_row(obj, formats.PROMPT_COMPLETION)
            out = {"prompt": row["prompt"], "completion": row["completion"]}
    except UserError as e:
        raise UserError(f"{where}: {str(e).split(': ', 1)[-1]} (feedback format: docs/feedback.md)") from None
    if kind == BINARY:
        if not isinstance(obj["label"], bool):
            _fail(source, line, f"'label' must be true (thumbs up) or false (thumbs down), got {obj['label']!r}")
        out["label"] = obj["label"]
    elif kind == RATING:
        r = obj["rating"]
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
            _fail(source, line, f"'rating' must be a number, got {r!r}")
        out["rating"] = float(r)
    return {"kind": kind, **out, "model_version": version, "line": line}


def read_feedback(path: str | os.PathLike, key: str = "feedback log") -> list[dict[str, Any]]:
    """Every record of one feedback log, validated; a bad line raises :class:`UserError` naming file and line.

    A missing file raises :class:`UserError` naming ``key`` (the setting that gave the path).
    """
    source = os.fspath(path)
    try:
        content = paths.read_text(path)
    except FileNotFoundError as e:
        raise UserError(f"{key}={source!r} does not exist (looked in {paths.resolve(path)}); give a feedback log "
                        f"(*.jsonl, docs/feedback.md)") from e
    records = []
    for line, text in enumerate(paths.jsonl_lines(content), start=1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            _fail(source, line, f"not valid JSON ({e.msg} at column {e.colno})")
        records.append(parse_record(obj, source, line))
    return records


def training_rows(records: Iterable[dict[str, Any]], rating_threshold: float) -> tuple[list[dict], list[dict]]:
    """``(unpaired_rows, preference_rows)``: TRL's KTO rows from labels and ratings, DPO rows from choices."""
    unpaired, pairs = [], []
    for r in records:
        if r["kind"] == CHOICE:
            pairs.append({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]})
        else:
            label = r["label"] if r["kind"] == BINARY else r["rating"] >= rating_threshold
            unpaired.append({"prompt": r["prompt"], "completion": r["completion"], "label": bool(label)})
    return unpaired, pairs


def write_rows(path: str | os.PathLike, rows: list[dict]) -> None:
    """JSON lines, written atomically."""
    paths.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (what a feedback file is recognised by once consumed)."""
    return hashlib.sha256(paths.resolve(path).read_bytes()).hexdigest()


def feedback_files(directory: str | os.PathLike, key: str = "feedback directory") -> list[str]:
    """Names of the feedback logs in ``directory``: ``*.jsonl``, not hidden, sorted by name.

    Writers must make a file appear whole (write ``.name.jsonl.tmp`` or any
    other name, then rename): a file is read once, when a round takes it.
    A missing directory raises :class:`UserError` naming ``key``.
    """
    root = paths.resolve(directory)
    if not root.is_dir():
        raise UserError(f"{key}={str(directory)!r} does not exist (looked in {root}); create it (feedback logs go "
                        f"there as *.jsonl files)")
    return sorted(p.name for p in root.iterdir() if p.name.endswith(SUFFIX) and not p.name.startswith("."))
