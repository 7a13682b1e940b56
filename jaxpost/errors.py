"""User errors: a mistake in what the user gave (a key, a path, a value, a file), not a bug.

``jaxpost`` commands print a :class:`UserError` as one short paragraph,
``jaxpost: error: <what>, <where>; <how to fix>``, and exit 2; the
traceback is shown only with ``--debug``. Raise it (or a subclass) as early
as possible: before a model loads or a step compiles.

:class:`RunInterrupted` is not an error but the other way a command ends
in one line: a signal stopped a run at a saved step
(:mod:`jaxpost.train.interrupt`).
"""

from __future__ import annotations

import signal

__all__ = ["RunInterrupted", "UserError", "require"]


class UserError(ValueError):
    """A problem in the user's input, with a message that says what, where and how to fix it.

    A ``ValueError`` so that library callers who catch ``ValueError`` keep working.
    """


def require(key: str, value, ok: bool, rule: str) -> None:
    """Raises ``UserError("<key> must be <rule>, got <value>")`` unless ``ok``: one value check, one line."""
    if not ok:
        raise UserError(f"{key} must be {rule}, got {value!r}")


class RunInterrupted(BaseException):
    """A signal stopped a run before its last step, after it saved the step it reached; rerun to resume.

    A ``BaseException`` like ``KeyboardInterrupt``: code that catches
    ``Exception`` (to retry, or to record a failed round) must not take a
    requested stop for a failure. ``signal_name``: ``"SIGTERM"`` or
    ``"SIGINT"`` (``"SIGTERM"`` on a process that learned it from another);
    ``step``: the step of the saved state; ``checkpoint``: where it is
    (``None`` for a loop run without a checkpointer). ``exit_status`` is the
    shell's for that signal (128 + its number).
    """

    def __init__(self, signal_name: str, step: int, num_steps: int, checkpoint: str | None):
        self.signal_name, self.step, self.num_steps, self.checkpoint = signal_name, step, num_steps, checkpoint
        super().__init__(self.message())

    def message(self, resume: str = "run the same command again") -> str:
        """What happened and, with a checkpoint, ``resume`` (how to go on) "to resume from it"."""
        saved = (f"a checkpoint of step {self.step} is saved in {self.checkpoint}; {resume} to resume from it"
                 if self.checkpoint else "nothing was saved (no checkpointer)")
        return f"stopped by {self.signal_name} at step {self.step} of {self.num_steps}: {saved}"

    @property
    def exit_status(self) -> int:
        return 128 + int(getattr(signal, self.signal_name, signal.SIGTERM))
