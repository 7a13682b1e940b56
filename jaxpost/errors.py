"""User errors: a mistake in what the user gave (a key, a path, a value, a file), not a bug.

``jaxpost`` commands print a :class:`UserError` as one short paragraph,
``jaxpost: error: <what>, <where>; <how to fix>``, and exit 2; the
traceback is shown only with ``--debug``. Raise it (or a subclass) as early
as possible: before a model loads or a step compiles.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """A problem in the user's input, with a message that says what, where and how to fix it.

    A ``ValueError`` so that library callers who catch ``ValueError`` keep working.
    """
