"""JAX's persistent compilation cache for the ``jaxpost`` commands.

A run started again with the same shapes (a preempted TPU VM resuming, a
crashed job relaunched, the next stage of the demo, a second experiment on
the same model) reads its compiled programs from disk instead of compiling
them again; on an accelerator the XLA GPU autotuning results are kept too.
JAX keys entries by program, compile options, devices and JAX version, and
on multi-process runs coordinates the writes itself.

Bindings (``--gin.compilation_cache.cache_dir=...``) or the environment:

* ``cache_dir = "auto"`` (default): ``JAX_COMPILATION_CACHE_DIR`` when set,
  else ``~/.cache/jaxpost/xla``;
* a path: that directory (local, or ``gs://`` with ``etils`` installed);
* ``None``: no cache.

The cache is trusted code: a directory others can write to lets them run
code in your jobs. Machines sharing one home directory but differing in CPU
features should each get their own directory (XLA rejects another CPU's
entries and compiles again, with a warning).
"""

from __future__ import annotations

import os

import gin
import jax

from jaxpost.errors import require

DEFAULT_DIR = "~/.cache/jaxpost/xla"


@gin.configurable
def compilation_cache(cache_dir: str | None = "auto", min_compile_time_secs: float | None = None,
                      max_size_gib: float = 20.0) -> str | None:
    """Points JAX's persistent compilation cache at ``cache_dir``; returns the directory used (None: off).

    Programs that took at least ``min_compile_time_secs`` to compile are
    stored (None: JAX's setting, 1 s unless
    ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` says otherwise); the
    directory is kept under ``max_size_gib`` by evicting the least recently
    used entries. Call it before the first compilation of the
    process: JAX reads the setting once.
    """
    if cache_dir == "auto":
        cache_dir = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.expanduser(DEFAULT_DIR)
    if cache_dir is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    require("compilation_cache.min_compile_time_secs", min_compile_time_secs,
            min_compile_time_secs is None or min_compile_time_secs >= 0, "None or >= 0")
    require("compilation_cache.max_size_gib", max_size_gib, max_size_gib > 0, "> 0")
    if "://" not in cache_dir:
        cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
        os.makedirs(cache_dir, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    if min_compile_time_secs is not None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
    jax.config.update("jax_compilation_cache_max_size", int(max_size_gib * 2**30))
    return cache_dir
