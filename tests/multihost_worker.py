"""``jaxpost train`` as one process of a test run, optionally reading what N hosts would read.

    python tests/multihost_worker.py SUMMARY_JSON --gin_file=F --gin.KEY=VALUE ...

Runs exactly ``jaxpost train``'s steps (``jaxpost.distributed.initialize``
from the ``JAXPOST_*`` variables, gin parse, ``run()``) and writes the run
summary of this process to ``SUMMARY_JSON`` (``{process}`` is replaced by
the process index).

With ``JAXPOST_TEST_READ_AS_HOSTS=N`` (single process only) the SFT and DPO
pipelines are replaced by :class:`ReadAsHosts`: this one process builds the
pipelines of hosts ``0..N-1`` (``shard_index=h, shard_count=N``, ``B/N``
rows each) and concatenates their batches in host order. That is the global
batch an N-process run assembles with ``make_array_from_process_local_data``,
so an N-process run and this single process must train on identical data.
"""

from __future__ import annotations

import json
import os
import sys


class ReadAsHosts:
    """One process iterating over the per-host pipelines of ``num_hosts`` hosts, batches concatenated.

    ``get_state`` -> ``{"processes": [state of host 0, ...]}``. ``set_state``
    takes that, or one host's state as restored from a checkpoint written by
    ``num_hosts`` processes, in which case every host's state is read from
    that checkpoint's ``process_states`` (``checkpoint_dir``).
    """

    def __init__(self, make, num_hosts, rows, tokenizer, seq_len, batch_size, *args, stats=None,
                 checkpoint_dir=None, **kwargs):
        if batch_size % num_hosts:
            raise ValueError(f"batch_size {batch_size} is not divisible by {num_hosts} hosts")
        self.parts = [make(rows, tokenizer, seq_len, batch_size // num_hosts, *args, shard_index=h,
                           shard_count=num_hosts, stats=stats if h == 0 else None, **kwargs)
                      for h in range(num_hosts)]
        self.stats = self.parts[0].stats  # host 0's counts, as the N-process run reports them
        self.checkpoint_dir = checkpoint_dir

    def __iter__(self):
        return self

    def __next__(self):
        import numpy as np
        batches = [next(p) for p in self.parts]
        return {k: np.concatenate([b[k] for b in batches]) for k, v in batches[0].items()
                if isinstance(v, np.ndarray)}

    def get_state(self):
        return {"processes": [p.get_state() for p in self.parts]}

    def set_state(self, state):
        if isinstance(state, dict) and "processes" in state:
            states = state["processes"]
        else:
            from jaxpost.train import Checkpointer
            ckpt = Checkpointer(self.checkpoint_dir)
            states = ckpt.data_states(ckpt.latest_step())
            ckpt.close()
            if states[0] != state:
                raise AssertionError("the restored state is not process 0's saved state")
        if len(states) != len(self.parts):
            raise ValueError(f"{len(states)} saved host states for {len(self.parts)} hosts")
        for p, s in zip(self.parts, states):
            p.set_state(s)


def _read_as_hosts(num_hosts: int) -> None:
    import importlib

    import gin
    # jaxpost.recipes re-exports the functions sft/dpo under the modules' names.
    sft = importlib.import_module("jaxpost.recipes.sft")
    dpo = importlib.import_module("jaxpost.recipes.dpo")

    def patched(make, task):
        def build(*args, **kwargs):
            run_dir = gin.query_parameter(f"{task}.run_dir")
            return ReadAsHosts(make, num_hosts, *args, checkpoint_dir=os.path.join(run_dir, "checkpoints"),
                               **kwargs)
        return build

    sft.make_lm_pipeline = patched(sft.make_lm_pipeline, "sft")
    dpo.make_preference_pipeline = patched(dpo.make_preference_pipeline, "dpo")


def main(argv: list[str]) -> int:
    summary_path, args = argv[0], argv[1:]
    import jax

    from jaxpost import config, distributed, recipes

    files, bindings, rest = config.split_gin_args(args)
    if rest:
        raise SystemExit(f"unexpected arguments {rest}")
    distributed.initialize()
    hosts = int(os.environ.get("JAXPOST_TEST_READ_AS_HOSTS", "0"))
    if hosts:
        if jax.process_count() != 1:
            raise SystemExit("JAXPOST_TEST_READ_AS_HOSTS is for a single process")
        _read_as_hosts(hosts)
    config.parse(files, bindings)
    summary = recipes.run()
    with open(summary_path.replace("{process}", str(jax.process_index())), "w") as f:
        json.dump({"summary": summary, "process_index": jax.process_index(),
                   "process_count": jax.process_count(), "device_count": jax.device_count(),
                   "local_device_count": jax.local_device_count()}, f, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
