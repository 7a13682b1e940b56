"""The commands' persistent compilation cache: where it goes, and a second process compiles nothing."""

import os
import subprocess
import sys

import gin
import pytest

from jaxpost import config
from jaxpost.compile_cache import compilation_cache
from jaxpost.errors import UserError
from cli_env import subprocess_env

# One process of a command: set the cache up, compile one program, report the directory and cache hits.
_SCRIPT = """
import sys
import jax, numpy as np
from jaxpost.compile_cache import compilation_cache
hits = []
jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event)
                                       if event == "/jax/compilation_cache/cache_hits" else None)
where = compilation_cache(eval(sys.argv[1]), min_compile_time_secs=0)
jax.jit(lambda x: jax.numpy.sin(x) @ x.T)(np.ones((64, 64), np.float32)).block_until_ready()
print(where, len(hits))
"""


def _command(env, cache_dir="'auto'"):
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, cache_dir], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    where, hits = proc.stdout.split()
    return where, int(hits)


def test_cache_directory_and_a_second_process_compiles_nothing(tmp_path):
    env = subprocess_env({k: v for k, v in os.environ.items() if not k.startswith("JAX_")})
    env["HOME"] = str(tmp_path / "home")
    default = str(tmp_path / "home" / ".cache" / "jaxpost" / "xla")
    assert _command(env) == (default, 0)
    entries = sorted(os.listdir(default))
    assert entries
    assert _command(env) == (default, 1)           # read back, not compiled again
    assert sorted(os.listdir(default)) == entries  # and nothing new written

    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "from_env")   # the environment's directory wins
    assert _command(env) == (str(tmp_path / "from_env"), 0) and os.listdir(tmp_path / "from_env")
    assert _command(env, repr(str(tmp_path / "bound"))) == (str(tmp_path / "bound"), 0)  # ... unless one is bound
    del env["JAX_COMPILATION_CACHE_DIR"]
    env["HOME"] = str(tmp_path / "home2")
    assert _command(env, "None") == ("None", 0) and not (tmp_path / "home2").exists()  # off


def test_cache_is_a_gin_configurable_and_rejects_bad_limits():
    config.parse([], ["compilation_cache.cache_dir = None", "compilation_cache.max_size_gib = 5.0"])
    try:
        assert gin.query_parameter("compilation_cache.cache_dir") is None
    finally:
        gin.clear_config()
    with pytest.raises(UserError, match=r"^compilation_cache.min_compile_time_secs must be None or >= 0, got -1\n"):
        compilation_cache("unused", min_compile_time_secs=-1)
    with pytest.raises(UserError, match=r"^compilation_cache.max_size_gib must be > 0, got 0\n"):
        compilation_cache("unused", max_size_gib=0)
