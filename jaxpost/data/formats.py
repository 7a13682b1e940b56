"""The TRL dataset formats: detection, validation and normalisation.

Formats (chosen by column names, same names as Hugging Face TRL):

=====================  ==============================================  ===============
format                 columns                                         used by
=====================  ==============================================  ===============
``text``               ``text``                                        LM / SFT
``messages``           ``messages``: list of ``{role, content}``       SFT
``prompt_completion``  ``prompt`` + ``completion``                     SFT, prompts
``preference``         [``prompt``] + ``chosen`` + ``rejected``        DPO, reward
``prompt_only``        ``prompt``                                      online methods
=====================  ==============================================  ===============

``prompt``/``completion``/``chosen``/``rejected`` are either plain strings or
*conversational* lists of messages. Without a ``prompt`` column, preference
rows have an *implicit* prompt: the shared beginning of chosen and rejected
(:func:`extract_prompt`). An optional ``margin`` column (float) rides along
with preference rows.

Every normalised example is a dict with ``"format"`` plus that format's
fields, and ``"conversational"`` where it applies.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import datasets

TEXT, MESSAGES, PROMPT_COMPLETION, PREFERENCE, PROMPT_ONLY = (
    "text", "messages", "prompt_completion", "preference", "prompt_only")
FORMATS = (TEXT, MESSAGES, PROMPT_COMPLETION, PREFERENCE, PROMPT_ONLY)


def _where(index: int | None, source: str | None) -> str:
    if index is None:
        return source or "row"
    return f"row {index} of {source}" if source else f"row {index}"


def detect_format(columns: Iterable[str], source: str | None = None) -> str:
    """Picks the format from column names (first rule that matches).

    ``chosen`` or ``rejected`` -> preference (both required); ``messages`` ->
    messages; ``completion`` -> prompt_completion (``prompt`` required);
    ``text`` -> text; ``prompt`` -> prompt_only. Raises naming the missing
    field, or listing the columns when no rule matches.
    """
    cols = set(columns)
    where = f" in {source}" if source else ""
    if "chosen" in cols or "rejected" in cols:
        for f in ("chosen", "rejected"):
            if f not in cols:
                raise ValueError(f"Preference data{where} is missing required field {f!r} "
                                 f"(columns: {sorted(cols)})")
        return PREFERENCE
    if "messages" in cols:
        return MESSAGES
    if "completion" in cols:
        if "prompt" not in cols:
            raise ValueError(f"Prompt-completion data{where} is missing required field 'prompt' "
                             f"(columns: {sorted(cols)})")
        return PROMPT_COMPLETION
    if "text" in cols:
        return TEXT
    if "prompt" in cols:
        return PROMPT_ONLY
    raise ValueError(f"Cannot tell the data format{where} from columns {sorted(cols)}: expected "
                     "'text', 'messages', 'prompt'+'completion', [prompt]+'chosen'+'rejected' or 'prompt'")


def required_fields(fmt: str, columns: Iterable[str] = ()) -> tuple[str, ...]:
    """Fields every row of ``fmt`` must hold (non-null)."""
    if fmt == PREFERENCE:
        return ("prompt", "chosen", "rejected") if "prompt" in set(columns) else ("chosen", "rejected")
    return {TEXT: ("text",), MESSAGES: ("messages",), PROMPT_COMPLETION: ("prompt", "completion"),
            PROMPT_ONLY: ("prompt",)}[fmt]


def columns(rows: Any) -> list[str]:
    """Column names of ``rows`` (a ``datasets.Dataset`` or a list of dicts: the union of their keys)."""
    if isinstance(rows, datasets.Dataset):
        return list(rows.column_names)
    if len(rows) == 0:
        return []
    cols: dict[str, None] = {}
    for row in rows:
        cols.update(dict.fromkeys(row))
    return list(cols)


def check_rows(rows: Any, source: str | None = None) -> str:
    """Detects the format of ``rows`` and checks required fields are never null.

    For a ``datasets.Dataset`` the null check runs on Arrow columns (no Python
    loop over rows). Returns the format name; raises ``ValueError`` naming the
    field, the first bad row index and ``source``.
    """
    if len(rows) == 0:
        raise ValueError(f"No rows in {source or 'the dataset'}")
    cols = columns(rows)
    fmt = detect_format(cols, source)
    fields = required_fields(fmt, cols)
    if isinstance(rows, datasets.Dataset):
        import pyarrow.compute as pc
        table = rows.with_format("arrow")
        for f in fields:
            column = table[f]
            if column.null_count:
                first = pc.index(pc.is_null(column), True).as_py()
                raise ValueError(f"{_where(first, source)}: required field {f!r} is missing "
                                 f"(null) for format {fmt!r}")
    else:
        for i, row in enumerate(rows):
            for f in fields:
                if row.get(f) is None:
                    raise ValueError(f"{_where(i, source)}: required field {f!r} is missing "
                                     f"for format {fmt!r}")
    return fmt


def is_conversational(value: Any) -> bool:
    """True for a list of messages (dicts with a ``role``)."""
    return isinstance(value, (list, tuple)) and len(value) > 0 and isinstance(value[0], Mapping) \
        and "role" in value[0]


def _messages(value: Any, field: str, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: field {field!r} must be a list of messages, got {type(value).__name__}")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, Mapping):
            raise ValueError(f"{where}: {field}[{j}] must be a {{role, content}} dict, got {type(m).__name__}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise ValueError(f"{where}: {field}[{j}] is missing required field {key!r} "
                                 f"(a string), got {m.get(key)!r}")
        # Arrow gives every message the union of keys (None where absent);
        # templates test keys with "is defined", so drop the Nones.
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def _text_or_messages(row: Mapping[str, Any], field: str, where: str) -> str | list[dict[str, Any]]:
    value = row.get(field)
    if value is None:
        raise ValueError(f"{where}: required field {field!r} is missing")
    if isinstance(value, str):
        return value
    return _messages(value, field, where)


def _common_prefix_len(a: Sequence[Any], b: Sequence[Any]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def extract_prompt(chosen: str | list, rejected: str | list, where: str = "row"
                   ) -> tuple[str | list, str | list, str | list]:
    """Splits an implicit-prompt pair into ``(prompt, chosen, rejected)``.

    Conversational: the prompt is the longest run of equal leading messages;
    the completions are the remaining messages (each side needs at least one).
    Strings: the prompt is the longest common prefix cut back to its last
    whitespace, the whitespace going to the completions, so a word shared by
    chance ("blue"/"black") is not split: ``("Sky? It is blue", "Sky? It is
    black") -> ("Sky? It is", " blue", " black")``.
    """
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise ValueError(f"{where}: 'chosen' and 'rejected' must both be strings or both conversations")
    if chosen == rejected:
        raise ValueError(f"{where}: 'chosen' and 'rejected' are identical")
    k = _common_prefix_len(chosen, rejected)
    if isinstance(chosen, str):
        cut = max((i for i in range(k) if chosen[i].isspace()), default=0)
        return chosen[:cut], chosen[cut:], rejected[cut:]
    if k == len(chosen) or k == len(rejected):
        raise ValueError(f"{where}: one of 'chosen'/'rejected' is a prefix of the other; "
                         "both need at least one completion message after the shared prompt")
    return list(chosen[:k]), list(chosen[k:]), list(rejected[k:])


def normalize_row(row: Mapping[str, Any], fmt: str, index: int | None = None,
                  source: str | None = None) -> dict[str, Any]:
    """Validates one row of format ``fmt`` and returns its normalised example.

    Errors name the field, ``row <index>`` and ``source``. Conversational
    fields must all be conversational (or all strings) within a row.
    """
    where = _where(index, source)
    if fmt == TEXT:
        text = row.get("text")
        if not isinstance(text, str):
            raise ValueError(f"{where}: required field 'text' must be a string, got {text!r}")
        return {"format": TEXT, "text": text}
    if fmt == MESSAGES:
        if row.get("messages") is None:
            raise ValueError(f"{where}: required field 'messages' is missing")
        return {"format": MESSAGES, "messages": _messages(row["messages"], "messages", where),
                "conversational": True}
    if fmt == PROMPT_ONLY:
        prompt = _text_or_messages(row, "prompt", where)
        return {"format": PROMPT_ONLY, "prompt": prompt, "conversational": not isinstance(prompt, str)}
    if fmt == PROMPT_COMPLETION:
        prompt = _text_or_messages(row, "prompt", where)
        completion = _text_or_messages(row, "completion", where)
        if isinstance(prompt, str) != isinstance(completion, str):
            raise ValueError(f"{where}: 'prompt' and 'completion' must both be strings or both conversations")
        return {"format": PROMPT_COMPLETION, "prompt": prompt, "completion": completion,
                "conversational": not isinstance(prompt, str)}
    if fmt == PREFERENCE:
        chosen = _text_or_messages(row, "chosen", where)
        rejected = _text_or_messages(row, "rejected", where)
        if row.get("prompt") is None:
            prompt, chosen, rejected = extract_prompt(chosen, rejected, where)
        else:
            prompt = _text_or_messages(row, "prompt", where)
        kinds = {isinstance(x, str) for x in (prompt, chosen, rejected)}
        if len(kinds) != 1:
            raise ValueError(f"{where}: 'prompt', 'chosen' and 'rejected' must all be strings or all conversations")
        out = {"format": PREFERENCE, "prompt": prompt, "chosen": chosen, "rejected": rejected,
               "conversational": not isinstance(prompt, str)}
        if row.get("margin") is not None:
            out["margin"] = float(row["margin"])
        return out
    raise ValueError(f"Unknown format {fmt!r}; expected one of {FORMATS}")
