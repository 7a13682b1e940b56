"""Multi-host start-up through JAX's own multi-controller runtime.

Every host runs the same command. ``initialize()`` connects them:

* TPU VMs, SLURM, Open MPI: ``jax.distributed.initialize()`` finds the
  coordinator by itself (set ``JAXPOST_DISTRIBUTED=auto``, which the launch
  scripts do).
* Anything else, including N local processes on one machine: set
  ``JAXPOST_COORDINATOR=host:port``, ``JAXPOST_NUM_PROCESSES`` and
  ``JAXPOST_PROCESS_ID`` (``launch/local.sh`` does this).

Nothing happens for a single process without these variables.
"""

from __future__ import annotations

import os

import jax


def initialize() -> bool:
    """Initialises ``jax.distributed`` from the environment; True if multi-process."""
    coordinator = os.environ.get("JAXPOST_COORDINATOR")
    mode = os.environ.get("JAXPOST_DISTRIBUTED", "")
    if not coordinator and mode != "auto":
        return False
    # CPU collectives across processes need gloo (tests, laptops); the flag only
    # affects the CPU client, and must be set before any backend starts.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(os.environ["JAXPOST_NUM_PROCESSES"]),
            process_id=int(os.environ["JAXPOST_PROCESS_ID"]),
        )
    else:
        jax.distributed.initialize()
    return True


def is_main_process() -> bool:
    """True on process 0, the one that logs and writes run files."""
    return jax.process_index() == 0
