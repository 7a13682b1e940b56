"""Runs several ``jaxpost train`` jobs in one process (of a multi-process test run), one after another.

    python tests/multihost_online_worker.py OUT_DIR SPEC_JSON

``SPEC_JSON`` holds ``[{"name": ..., "args": ["--gin_file=...", "--gin.KEY=VALUE", ...]}, ...]``;
a job with ``"wait_for": PATH`` starts once ``PATH`` exists (the test writes it,
e.g. after copying another run's checkpoint into the job's run directory).
Each job runs exactly ``jaxpost train``'s steps (gin parse, ``run()``) after one
``jaxpost.distributed.initialize()`` from the ``JAXPOST_*`` variables. For
each job this process writes ``OUT_DIR/<name>_<process>.json`` (its summary) and
``OUT_DIR/<name>_<process>.npz`` (the tokens of every rollout, as gathered on
this process), so the test can compare what every process sampled. The
summary's ``layouts`` say where the weights lay during the last rollout: for
each model the rollout used (``policy``, ``reference``, ``value``, and the
``reward_model`` of a reward-model scorer), the mesh shape and the partition
spec of its first ``q_proj`` kernel; ``sampler_phases`` the (rows, cache slots)
of each decode phase of each rollout (a compacting sampler's; empty otherwise).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any


def wait_for(path: str) -> None:
    """Blocks until ``path`` exists; the test kills this process when it gives up."""
    while not os.path.exists(path):
        time.sleep(0.2)


def layout(params: Any) -> dict:
    """``{"mesh": {axis: size}, "q_proj": [mesh axes of each dim]}`` of a params tree on the mesh.

    The spec is padded to the kernel's rank (``None``: replicated), so equal
    layouts compare equal however JAX spells the ``PartitionSpec``.
    """
    import jax

    kernel = next(x for path, x in jax.tree_util.tree_leaves_with_path(params)
                  if "q_proj" in jax.tree_util.keystr(path) and "kernel" in jax.tree_util.keystr(path))
    spec = list(kernel.sharding.spec) + [None] * (kernel.ndim - len(kernel.sharding.spec))
    return {"mesh": dict(kernel.sharding.mesh.shape),
            "q_proj": [a if a is None or isinstance(a, str) else list(a) for a in spec]}


def main(out_dir: str, spec: str) -> int:
    import jax
    import numpy as np

    from jaxpost import config, distributed, recipes
    from jaxpost.generate import rollout, scorers

    distributed.initialize()
    tokens: list = []
    layouts: dict = {}
    phases: list = []
    call, score = rollout.Roller.__call__, scorers.RewardModelScorer.__call__

    def recording(self, policy, reference, value, *args, **kwargs):
        r = call(self, policy, reference, value, *args, **kwargs)
        if self.cfg.temperature == 0:  # a held-out evaluation's greedy roller (the runs sample at temperature 1)
            return r
        tokens.append(r.host["tokens"])
        phases.append(list(self.sampler.phases))
        models = {"policy": policy, "reference": reference, "value": value}
        layouts.update({k: layout(v) for k, v in models.items() if v is not None})
        return r

    def scoring(self, r):
        layouts["reward_model"] = layout(self.params)
        return score(self, r)

    rollout.Roller.__call__ = recording
    scorers.RewardModelScorer.__call__ = scoring
    for job in json.loads(spec):
        if "wait_for" in job:
            wait_for(job["wait_for"])
        tokens.clear()
        layouts.clear()
        phases.clear()
        files, bindings, rest = config.split_gin_args(job["args"])
        if rest:
            raise SystemExit(f"unexpected arguments {rest}")
        config.parse(files, bindings)
        summary = recipes.run()
        name = f"{out_dir}/{job['name']}_{jax.process_index()}"
        np.savez(name + ".npz", *tokens)
        with open(name + ".json", "w") as f:
            json.dump({"summary": summary, "process_count": jax.process_count(),
                       "device_count": jax.device_count(), "layouts": layouts, "sampler_phases": phases},
                      f, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
