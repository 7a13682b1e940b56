"""Test setup: 8 fake CPU devices so sharded paths run on any machine."""

import os

from xla_test_flags import TEST_XLA_FLAGS

os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {TEST_XLA_FLAGS}")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Tests build the same tiny models and steps many times over (new closures, same
# programs): a persistent XLA cache for this session turns recompiles into
# cache reads. Env vars so that subprocesses (multi-host tests) share it too.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxpost_test_xla_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import gin  # noqa: E402
import jax  # noqa: E402  (imported after XLA_FLAGS on purpose)
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    """Slow tests first, so that a worker never starts a minutes-long file at the end.

    With ``-n 2 --dist loadfile`` each file goes to one worker, in the order
    its first test is collected (``--no-loadscope-reorder`` in pyproject:
    xdist would otherwise order files by their number of tests, which put
    the 4-minute demo test last and left one worker idle for minutes).
    """
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def fresh_gin():
    """Every test starts with no gin bindings.

    Gin's registry is process-global and a worker runs many files: a test that
    runs ``jaxpost train`` in-process leaves e.g. ``sft.init_from =
    %gin.REQUIRED`` bound, and a later file's direct ``sft(...)`` call would
    read it (CI failed exactly so, depending on which files shared a worker).
    """
    gin.clear_config()
    yield
    gin.clear_config()
