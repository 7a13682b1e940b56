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

__all__ = ["RunInterrupted", "UserError"]


class UserError(ValueError):
    """A problem in the user's input, with a message that says what, where and how to fix it.

    A ``ValueError`` so that library callers who catch ``ValueError`` keep working.
    """


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
        saved = (f"a checkpoint of step {step} is saved in {checkpoint}; run the same command again to resume "
                 f"from it" if checkpoint else "nothing was saved (no checkpointer)")
        super().__init__(f"stopped by {signal_name} at step {step} of {num_steps}: {saved}")

    @property
    def exit_status(self) -> int:
        return 128 + int(getattr(signal, self.signal_name, signal.SIGTERM))
