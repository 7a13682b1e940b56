"""``jaxpost train`` as one process of a test run.

    python tests/multihost_worker.py SUMMARY_JSON --gin_file=F --gin.KEY=VALUE ...

Runs exactly ``jaxpost train``'s steps (``jaxpost.distributed.initialize``
from the ``JAXPOST_*`` variables, gin parse, ``run()``) and writes the run
summary of this process to ``SUMMARY_JSON`` (``{process}`` is replaced by
the process index). Every host reads the same global batches, so a single
process running the same command trains on the same data as N processes.

``JAXPOST_TEST_SIGTERM_AT_STEP=K`` (a test's setting, for one process):
the process sends itself SIGTERM, as a preempted VM's process receives it,
once its loop has run K steps; a run stopped so writes ``{"interrupted":
...}`` and exits with the command line's status (143).
"""

from __future__ import annotations

import json
import os
import signal
import sys


def main(argv: list[str]) -> int:
    summary_path, args = argv[0], argv[1:]
    import jax

    from jaxpost import config, distributed, recipes

    from jaxpost.errors import RunInterrupted

    files, bindings, rest = config.split_gin_args(args)
    if rest:
        raise SystemExit(f"unexpected arguments {rest}")
    distributed.initialize()
    config.parse(files, bindings)
    _sigterm_at(os.environ.get("JAXPOST_TEST_SIGTERM_AT_STEP"))
    info, status = {}, 0
    try:
        info["summary"] = recipes.run()
    except RunInterrupted as e:
        info["interrupted"] = {"signal": e.signal_name, "step": e.step, "message": str(e)}
        status = e.exit_status
    with open(summary_path.replace("{process}", str(jax.process_index())), "w") as f:
        json.dump({**info, "process_index": jax.process_index(),
                   "process_count": jax.process_count(), "device_count": jax.device_count(),
                   "local_device_count": jax.local_device_count()}, f, default=float)
    return status


def _sigterm_at(step: str | None) -> None:
    if not step:
        return
    from jaxpost.train import interrupt

    after_steps, ran = interrupt.StopRequests.after_steps, [0]

    def and_sigterm(self, steps, checkpointable=True):
        ran[0] += steps
        if ran[0] - steps < int(step) <= ran[0]:
            os.kill(os.getpid(), signal.SIGTERM)
        return after_steps(self, steps, checkpointable)

    interrupt.StopRequests.after_steps = and_sigterm


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
