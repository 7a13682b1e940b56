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


def _int_env(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise ValueError(f"JAXPOST_COORDINATOR is set but {name} is not; set both JAXPOST_NUM_PROCESSES "
                         "and JAXPOST_PROCESS_ID (launch/local.sh does)")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def initialize() -> bool:
    """Initialises ``jax.distributed`` from the environment; True if multi-process.

    Must run before anything touches a JAX backend. ``JAXPOST_COORDINATOR``
    (``host:port`` of process 0) with ``JAXPOST_NUM_PROCESSES`` and
    ``JAXPOST_PROCESS_ID``, or ``JAXPOST_DISTRIBUTED=auto``; neither: False,
    single process. A malformed variable raises ``ValueError`` naming it.
    """
    coordinator = os.environ.get("JAXPOST_COORDINATOR")
    mode = os.environ.get("JAXPOST_DISTRIBUTED", "")
    if not coordinator and mode != "auto":
        return False
    if coordinator:  # checked before any global JAX setting changes
        num_processes, process_id = _int_env("JAXPOST_NUM_PROCESSES"), _int_env("JAXPOST_PROCESS_ID")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"JAXPOST_PROCESS_ID={process_id} must be in [0, JAXPOST_NUM_PROCESSES="
                             f"{num_processes})")
    # CPU collectives across processes need gloo (tests, laptops); the flag only
    # affects the CPU client, and must be set before any backend starts.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    else:
        jax.distributed.initialize()
    return True


def is_main_process() -> bool:
    """True on process 0, the one that logs and writes run files."""
    return jax.process_index() == 0
