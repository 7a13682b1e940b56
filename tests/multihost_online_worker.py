"""Runs several ``jaxpost train`` jobs in one process (of a multi-process test run), one after another.

    python tests/multihost_online_worker.py OUT_DIR SPEC_JSON

``SPEC_JSON`` holds ``[{"name": ..., "args": ["--gin_file=...", "--gin.KEY=VALUE", ...]}, ...]``.
Each job runs exactly ``jaxpost train``'s steps (gin parse, ``run()``) after one
``jaxpost.distributed.initialize()`` from the ``JAXPOST_*`` variables. For
each job this process writes ``OUT_DIR/<name>_<process>.json`` (its summary) and
``OUT_DIR/<name>_<process>.npz`` (the tokens of every rollout, as gathered on
this process), so the test can compare what every process sampled.
"""

from __future__ import annotations

import json
import sys


def main(out_dir: str, spec: str) -> int:
    import jax
    import numpy as np

    from jaxpost import config, distributed, recipes
    from jaxpost.generate import rollout

    distributed.initialize()
    tokens: list = []
    call = rollout.Roller.__call__

    def recording(self, *args, **kwargs):
        r = call(self, *args, **kwargs)
        tokens.append(r.host["tokens"])
        return r

    rollout.Roller.__call__ = recording
    for job in json.loads(spec):
        tokens.clear()
        files, bindings, rest = config.split_gin_args(job["args"])
        if rest:
            raise SystemExit(f"unexpected arguments {rest}")
        config.parse(files, bindings)
        summary = recipes.run()
        name = f"{out_dir}/{job['name']}_{jax.process_index()}"
        np.savez(name + ".npz", *tokens)
        with open(name + ".json", "w") as f:
            json.dump({"summary": summary, "process_count": jax.process_count(),
                       "device_count": jax.device_count()}, f, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
