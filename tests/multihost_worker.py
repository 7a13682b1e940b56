"""``jaxpost train`` as one process of a test run.

    python tests/multihost_worker.py SUMMARY_JSON --gin_file=F --gin.KEY=VALUE ...

Runs exactly ``jaxpost train``'s steps (``jaxpost.distributed.initialize``
from the ``JAXPOST_*`` variables, gin parse, ``run()``) and writes the run
summary of this process to ``SUMMARY_JSON`` (``{process}`` is replaced by
the process index). Every host reads the same global batches, so a single
process running the same command trains on the same data as N processes.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    summary_path, args = argv[0], argv[1:]
    import jax

    from jaxpost import config, distributed, recipes

    files, bindings, rest = config.split_gin_args(args)
    if rest:
        raise SystemExit(f"unexpected arguments {rest}")
    distributed.initialize()
    config.parse(files, bindings)
    summary = recipes.run()
    with open(summary_path.replace("{process}", str(jax.process_index())), "w") as f:
        json.dump({"summary": summary, "process_index": jax.process_index(),
                   "process_count": jax.process_count(), "device_count": jax.device_count(),
                   "local_device_count": jax.local_device_count()}, f, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
