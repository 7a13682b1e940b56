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
``unpaired``           ``prompt`` + ``completion`` + ``label``         KTO
=====================  ==============================================  ===============

``prompt``/``completion``/``chosen``/``rejected`` are either plain strings or
*conversational* lists of messages. Without a ``prompt`` column, preference
rows have an *implicit* prompt: the shared beginning of chosen and rejected
(:func:`extract_prompt`). An optional ``margin`` column (float) rides along
with preference rows. ``label`` of unpaired rows (TRL's unpaired preference
type) is a boolean, true for a desirable completion (0/1 are accepted too).

Every normalised example is a dict with ``"format"`` plus that format's
fields, and ``"conversational"`` where it applies.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import datasets

from jaxpost.errors import UserError

TEXT, MESSAGES, PROMPT_COMPLETION, PREFERENCE, PROMPT_ONLY, UNPAIRED = (
    "text", "messages", "prompt_completion", "preference", "prompt_only", "unpaired")
FORMATS = (TEXT, MESSAGES, PROMPT_COMPLETION, PREFERENCE, PROMPT_ONLY, UNPAIRED)


ROLES = ("system", "user", "assistant", "tool")
"""Message roles conversational rows may use (TRL's, plus ``tool`` for tool results)."""


def line_of_row(source: str | None, index: int) -> int | None:
    """1-based line of the 0-based row ``index`` in a local JSON-lines file, else None.

    ``datasets`` skips blank lines, so row and line numbers differ when the
    file has any. Reads the file: call it only to word an error.
    """
    if not source or not source.endswith((".jsonl", ".json")):
        return None
    try:
        with open(source, encoding="utf-8") as f:
            seen = -1
            for lineno, line in enumerate(f, start=1):
                stripped = line.strip()
                if lineno == 1 and stripped.startswith("["):
                    return None  # a JSON array: rows have no lines of their own
                if stripped:
                    seen += 1
                    if seen == index:
                        return lineno
    except OSError:
        return None
    return None


def row_location(index: int | None, source: str | None) -> str:
    """How errors name a row: ``"row 3 of data.jsonl (line 4)"``, 1-based (``index`` is 0-based)."""
    if index is None:
        return source or "row"
    if not source:
        return f"row {index + 1}"
    line = line_of_row(source, index)
    return f"row {index + 1} of {source}" + (f" (line {line})" if line is not None else "")


class _Where:
    """A row's location, worded only when an error prints it (normalising a row must stay cheap)."""

    __slots__ = ("index", "source")

    def __init__(self, index: int | None, source: str | None):
        self.index, self.source = index, source

    def __str__(self) -> str:
        return row_location(self.index, self.source)


def _where(index: int | None, source: str | None) -> _Where:
    return _Where(index, source)


def detect_format(columns: Iterable[str], source: str | None = None) -> str:
    """Picks the format from column names (first rule that matches).

    ``chosen`` or ``rejected`` -> preference (both required); ``messages`` ->
    messages; ``completion`` and ``label`` -> unpaired (``prompt`` required);
    ``completion`` -> prompt_completion (``prompt`` required);
    ``text`` -> text; ``prompt`` -> prompt_only. Raises naming the missing
    field, or listing the columns when no rule matches.
    """
    cols = set(columns)
    where = f" in {source}" if source else ""
    if "chosen" in cols or "rejected" in cols:
        for f in ("chosen", "rejected"):
            if f not in cols:
                raise UserError(f"Preference data{where} is missing required field {f!r} "
                                f"(columns: {sorted(cols)})")
        return PREFERENCE
    if "messages" in cols:
        return MESSAGES
    if "label" in cols and "completion" in cols:
        if "prompt" not in cols:
            raise UserError(f"Unpaired (KTO) data{where} is missing required field 'prompt' "
                            f"(columns: {sorted(cols)})")
        return UNPAIRED
    if "completion" in cols:
        if "prompt" not in cols:
            raise UserError(f"Prompt-completion data{where} is missing required field 'prompt' "
                            f"(columns: {sorted(cols)})")
        return PROMPT_COMPLETION
    if "text" in cols:
        return TEXT
    if "prompt" in cols:
        return PROMPT_ONLY
    raise UserError(f"Cannot tell the data format{where} from columns {sorted(cols)}: expected "
                    "'text', 'messages', 'prompt'+'completion', [prompt]+'chosen'+'rejected', "
                    "'prompt'+'completion'+'label' or 'prompt'")


def required_fields(fmt: str, columns: Iterable[str] = ()) -> tuple[str, ...]:
    """Fields every row of ``fmt`` must hold (non-null)."""
    if fmt == PREFERENCE:
        return ("prompt", "chosen", "rejected") if "prompt" in set(columns) else ("chosen", "rejected")
    return {TEXT: ("text",), MESSAGES: ("messages",), PROMPT_COMPLETION: ("prompt", "completion"),
            PROMPT_ONLY: ("prompt",), UNPAIRED: ("prompt", "completion", "label")}[fmt]


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
    """Detects the format of ``rows`` and validates every row; returns the format name.

    Checks that required fields are never null, that text fields are strings
    or conversations, and that every message of a conversational field has a
    string ``role`` (one of :data:`ROLES`) and ``content``. For a
    ``datasets.Dataset`` this runs on Arrow columns (no Python loop over
    rows); a list of dicts is normalised row by row. Raises
    :class:`jaxpost.errors.UserError` naming the field, the first bad row
    (1-based, with its line in a JSON-lines file) and ``source``.
    """
    if len(rows) == 0:
        raise UserError(f"No rows in {source or 'the dataset'}; give a file with at least one example")
    cols = columns(rows)
    fmt = detect_format(cols, source)
    fields = required_fields(fmt, cols)
    fingerprint = getattr(rows, "_fingerprint", None) if isinstance(rows, datasets.Dataset) else None
    if fingerprint is not None and fingerprint in _VALIDATED:
        return fmt  # the same Arrow data again (each evaluation builds a pipeline): checked already
    if isinstance(rows, datasets.Dataset):
        import pyarrow.compute as pc
        table = rows.with_format("arrow")
        for f in fields:
            column = table[f]
            if column.null_count:
                first = pc.index(pc.is_null(column), True).as_py()
                raise UserError(f"{_where(first, source)}: required field {f!r} is missing "
                                f"(null) for format {fmt!r}")
        row_by_row = False
        if fmt == UNPAIRED and not _labels_are_binary(table["label"]):
            row_by_row = True  # normalize_row names the first row whose label is not a boolean
        for f in fields:
            if f == "label":
                continue
            bad = _first_bad_arrow_row(table[f], f, source)
            if bad == _UNCHECKED:
                row_by_row = True
            elif bad is not None:
                normalize_row(rows[bad], fmt, bad, source)  # raises the precise message
                raise UserError(f"{_where(bad, source)}: field {f!r} is not a string or a list of "
                                "{role, content} messages")
        if fmt == PREFERENCE and "prompt" not in cols:
            same = _first_identical_pair(table["chosen"], table["rejected"])
            if same is not None:
                normalize_row(rows[same], fmt, same, source)  # raises "'chosen' and 'rejected' are identical"
        if row_by_row:
            # Messages whose keys differ between rows arrive as JSON values, not Arrow structs.
            for i, row in enumerate(rows):
                normalize_row(row, fmt, i, source)
    else:
        for i, row in enumerate(rows):
            for f in fields:
                if row.get(f) is None:
                    raise UserError(f"{_where(i, source)}: required field {f!r} is missing "
                                    f"for format {fmt!r}")
            normalize_row(row, fmt, i, source)
    if fingerprint is not None:
        _VALIDATED.add(fingerprint)
    return fmt


_VALIDATED: set[str] = set()
"""Fingerprints of the ``datasets.Dataset`` objects :func:`check_rows` has passed (they are immutable)."""


_UNCHECKED = -1
"""What :func:`_first_bad_arrow_row` returns for a column it cannot check on Arrow."""


def _first_bad_arrow_row(column: Any, field: str, source: str | None) -> int | None:
    """0-based index of the first row whose ``field`` is neither a string nor valid messages, or None.

    Vectorised: a conversational column is ``list<struct<role, content, ...>>``;
    its messages are flattened and checked at once, and the row of the first
    bad one is found from the list offsets. Messages stored as JSON values
    (``datasets`` does that when their keys differ between rows) give
    :data:`_UNCHECKED`: the caller checks those rows one by one.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    typ = column.type
    if pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_null(typ):
        return None
    if isinstance(typ, pa.BaseExtensionType) or (
            (pa.types.is_list(typ) or pa.types.is_large_list(typ)) and isinstance(typ.value_type, pa.BaseExtensionType)):
        return _UNCHECKED
    if not (pa.types.is_list(typ) or pa.types.is_large_list(typ)) or not pa.types.is_struct(typ.value_type):
        raise UserError(f"{source or 'the data'}: field {field!r} holds {typ}, but it must be a string or a list "
                        "of {role, content} messages")
    struct = typ.value_type
    offset = 0
    for chunk in (column.chunks if isinstance(column, pa.ChunkedArray) else [column]):
        flat = pc.list_flatten(chunk)
        if len(flat):
            bad = None
            for key in ("role", "content"):
                if struct.get_field_index(key) < 0:
                    bad = pc.is_valid(flat)  # every message lacks the key
                    break
                values = pc.struct_field(flat, key)
                if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
                    bad = pc.is_valid(flat)
                    break
                missing = pc.is_null(values)
                if key == "role":
                    missing = pc.or_(missing, pc.invert(pc.is_in(values, value_set=pa.array(ROLES))))
                bad = missing if bad is None else pc.or_(bad, missing)
            if bad is not None and pc.any(bad).as_py():
                k = pc.index(bad, True).as_py()
                return offset + pc.list_parent_indices(chunk)[k].as_py()
        offset += len(chunk)
    return None


def _labels_are_binary(column: Any) -> bool:
    """True when an Arrow ``label`` column holds only booleans, or integers 0/1."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_boolean(column.type):
        return True
    return pa.types.is_integer(column.type) and bool(pc.all(pc.is_in(column, value_set=pa.array([0, 1],
                                                                                              column.type))).as_py())


def _first_identical_pair(chosen: Any, rejected: Any) -> int | None:
    """0-based index of the first row with equal plain-string chosen and rejected (no implicit prompt), or None."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not all(pa.types.is_string(c.type) or pa.types.is_large_string(c.type) for c in (chosen, rejected)):
        return None  # conversations: normalize_row checks them when the pipeline reads the row
    equal = pc.fill_null(pc.equal(chosen, rejected), False)
    return pc.index(equal, True).as_py() if pc.any(equal).as_py() else None


def is_conversational_data(rows: Any, fmt: str) -> bool:
    """Whether rows of format ``fmt`` are conversations (rendered with a chat template).

    ``messages`` always; other formats when their first row's prompt or
    completion is a list of messages (a row mixing strings and messages is
    an error of :func:`normalize_row`).
    """
    if fmt == MESSAGES:
        return True
    first = rows[0]
    return any(is_conversational(first.get(f)) for f in ("prompt", "completion", "chosen", "rejected"))


def is_conversational(value: Any) -> bool:
    """True for a list of messages (dicts with a ``role``)."""
    return isinstance(value, (list, tuple)) and len(value) > 0 and isinstance(value[0], Mapping) \
        and "role" in value[0]


def _messages(value: Any, field: str, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, (list, tuple)):
        raise UserError(f"{where}: field {field!r} must be a list of messages, got {type(value).__name__}")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, Mapping):
            raise UserError(f"{where}: {field}[{j}] must be a {{role, content}} dict, got {type(m).__name__}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise UserError(f"{where}: {field}[{j}] is missing required field {key!r} "
                                f"(a string), got {m.get(key)!r}")
        if m["role"] not in ROLES:
            raise UserError(f"{where}: {field}[{j}] has unknown role {m['role']!r}; allowed roles: "
                            f"{', '.join(ROLES)} (rename it, e.g. to 'assistant' for the model's turns)")
        # Arrow gives every message the union of keys (None where absent);
        # templates test keys with "is defined", so drop the Nones.
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def _text_or_messages(row: Mapping[str, Any], field: str, where: str) -> str | list[dict[str, Any]]:
    value = row.get(field)
    if value is None:
        raise UserError(f"{where}: required field {field!r} is missing")
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
        raise UserError(f"{where}: 'chosen' and 'rejected' must both be strings or both conversations")
    if chosen == rejected:
        raise UserError(f"{where}: 'chosen' and 'rejected' are identical")
    k = _common_prefix_len(chosen, rejected)
    if isinstance(chosen, str):
        cut = max((i for i in range(k) if chosen[i].isspace()), default=0)
        return chosen[:cut], chosen[cut:], rejected[cut:]
    if k == len(chosen) or k == len(rejected):
        raise UserError(f"{where}: one of 'chosen'/'rejected' is a prefix of the other; "
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
            raise UserError(f"{where}: required field 'text' must be a string, got {text!r}")
        return {"format": TEXT, "text": text}
    if fmt == MESSAGES:
        if row.get("messages") is None:
            raise UserError(f"{where}: required field 'messages' is missing")
        return {"format": MESSAGES, "messages": _messages(row["messages"], "messages", where),
                "conversational": True}
    if fmt == PROMPT_ONLY:
        prompt = _text_or_messages(row, "prompt", where)
        return {"format": PROMPT_ONLY, "prompt": prompt, "conversational": not isinstance(prompt, str)}
    if fmt == PROMPT_COMPLETION:
        prompt = _text_or_messages(row, "prompt", where)
        completion = _text_or_messages(row, "completion", where)
        if isinstance(prompt, str) != isinstance(completion, str):
            raise UserError(f"{where}: 'prompt' and 'completion' must both be strings or both conversations")
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
            raise UserError(f"{where}: 'prompt', 'chosen' and 'rejected' must all be strings or all conversations")
        out = {"format": PREFERENCE, "prompt": prompt, "chosen": chosen, "rejected": rejected,
               "conversational": not isinstance(prompt, str)}
        if row.get("margin") is not None:
            out["margin"] = float(row["margin"])
        return out
    if fmt == UNPAIRED:
        prompt = _text_or_messages(row, "prompt", where)
        completion = _text_or_messages(row, "completion", where)
        if isinstance(prompt, str) != isinstance(completion, str):
            raise UserError(f"{where}: 'prompt' and 'completion' must both be strings or both conversations")
        label = row.get("label")
        if isinstance(label, bool) or (isinstance(label, int) and label in (0, 1)):
            return {"format": UNPAIRED, "prompt": prompt, "completion": completion, "label": bool(label),
                    "conversational": not isinstance(prompt, str)}
        raise UserError(f"{where}: field 'label' must be true (desirable) or false (undesirable), got {label!r}")
    raise ValueError(f"Unknown format {fmt!r}; expected one of {FORMATS}")
