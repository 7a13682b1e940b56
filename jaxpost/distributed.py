"""Multi-host start-up through JAX's own multi-controller runtime.

Every host runs the same command. ``initialize()`` connects them:

* TPU VMs, SLURM, Open MPI: ``jax.distributed.initialize()`` finds the
  coordinator by itself (set ``JAXPOST_DISTRIBUTED=auto``, which the launch
  scripts do).
* Anything else, including N local processes on one machine: set
  ``JAXPOST_COORDINATOR=host:port``, ``JAXPOST_NUM_PROCESSES`` and
  ``JAXPOST_PROCESS_ID`` (``launch/local.sh`` does this).

Nothing happens for a single process without these variables.

Also here: moving global values to every host (:func:`to_host`) and
splitting host-side per-row work between processes (:func:`host_rows`,
:func:`all_rows`).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np


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


def to_host(tree: Any) -> Any:
    """Global arrays -> numpy arrays holding the whole global value, on every process.

    Arrays this process holds entirely are fetched; arrays split over
    several processes are all-gathered (a collective: every process must
    call this in the same order with the same tree).
    """
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(jax.device_get(x))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.tree.map(one, tree)


def host_rows(num_rows: int) -> slice:
    """This process's contiguous share of ``num_rows`` rows: ``[p * n / P, (p + 1) * n / P)``.

    Host-side work per row (Python reward functions) is split this way and
    the results all-gathered with :func:`all_rows`.
    """
    p, count = jax.process_index(), jax.process_count()
    return slice(p * num_rows // count, (p + 1) * num_rows // count)


def all_rows(values: np.ndarray, num_rows: int) -> np.ndarray:
    """The ``[num_rows, ...]`` concatenation of every process's :func:`host_rows` share ``values``."""
    values = np.asarray(values)
    count = jax.process_count()
    if count == 1:
        return values
    from jax.experimental import multihost_utils
    width = -(-num_rows // count)  # process_allgather needs equal shapes: pad every share to the widest
    padded = np.zeros((width,) + values.shape[1:], values.dtype)
    padded[: len(values)] = values
    gathered = np.asarray(multihost_utils.process_allgather(padded))  # [count, width, ...]
    sizes = [(q + 1) * num_rows // count - q * num_rows // count for q in range(count)]
    return np.concatenate([gathered[q][: sizes[q]] for q in range(count)])
