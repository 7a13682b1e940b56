"""Checkpointer: restore onto another mesh, keep-last-K, config/data items, killed saves ignored."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from jaxpost.sharding import Partitioner, make_mesh
from jaxpost.train import (Checkpointer, abstract_state, abstract_with_shardings, init_sharded_state, init_state,
                           make_optimizer, state_shardings)
from cli_env import subprocess_env
from test_train_fixtures import LOGICAL_AXES, init_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sharded_state(partitioner, opt, params):
    shardings = state_shardings(abstract_state(params, opt), partitioner.shardings(LOGICAL_AXES, params),
                                partitioner, opt)
    return init_sharded_state(params, opt, shardings), shardings


def test_restore_onto_different_mesh(tmp_path):
    opt = make_optimizer("adamw", learning_rate=1e-3)
    params = init_params(1)
    src, _ = _sharded_state(Partitioner(make_mesh(fsdp=8), "fsdp"), opt, params)
    # Non-trivial optimizer moments so their layout matters too.
    src = src.replace(opt_state=jax.tree.map(lambda x: x + 0.5 if x.ndim else x, src.opt_state),
                      step=src.step + 7)
    ck = Checkpointer(tmp_path, save_every=1, keep=2)
    ck.save(7, src, data_state={"index": 7}, config="make_optimizer.learning_rate = 0.001")
    ck.wait_until_finished()

    target_part = Partitioner(make_mesh(data=2, fsdp=4), "fsdp")
    _, target_sh = _sharded_state(target_part, opt, params)
    abstract = abstract_with_shardings(abstract_state(params, opt), target_sh)
    restored = Checkpointer(tmp_path).restore_latest(abstract)

    assert restored.step == 7 and int(restored.state.step) == 7
    assert restored.data_state == {"index": 7}
    assert restored.config == "make_optimizer.learning_rate = 0.001"
    for (path, a), b, sh in zip(jax.tree_util.tree_flatten_with_path(src)[0], jax.tree.leaves(restored.state),
                                jax.tree.leaves(target_sh)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
        assert b.sharding == sh, jax.tree_util.keystr(path)
    kernel = restored.state.params["mlp"]["kernel"]
    assert kernel.sharding.mesh.shape == {"data": 2, "fsdp": 4, "tensor": 1}
    assert kernel.sharding.spec == PartitionSpec("fsdp", None)


def test_keep_last_k_interval_and_missing_sharding(tmp_path):
    opt = make_optimizer("lion", learning_rate=1e-3)
    state = init_state(init_params(), opt)
    ck = Checkpointer(tmp_path, save_every=2, keep=2, async_save=False)
    saved = [s for s in range(1, 8) if ck.save(s, state.replace(step=jnp.int32(s)), {"index": s})]
    assert saved == [2, 4, 6]
    assert ck.save(7, state.replace(step=jnp.int32(7)), {"index": 7}, force=True)
    assert ck.all_steps() == [6, 7]
    assert ck.latest_step() == 7
    with pytest.raises(ValueError, match=r"abstract_state.*has no sharding"):
        ck.restore(7, abstract_state(init_params(), opt))
    with pytest.raises(FileNotFoundError, match="step 2"):
        ck.restore(2, abstract_with_shardings(state))


_KILLED_SAVE = textwrap.dedent("""
    import os, sys
    import jax
    import orbax.checkpoint._src.path.atomicity as atomicity
    from jaxpost.train import Checkpointer, init_state, make_optimizer
    from test_train_fixtures import init_params

    ck = Checkpointer(sys.argv[1], save_every=1, keep=5, async_save=True)
    state = init_state(init_params(), make_optimizer("adamw", learning_rate=1e-3))
    ck.save(1, state, {"index": 1}, config="first")
    ck.wait_until_finished()

    async def die(self, *args, **kwargs):  # the process dies after writing the data, before the rename
        os._exit(17)

    atomicity.AtomicRenameTemporaryPath.finalize = die
    bumped = state.replace(step=state.step + 1, params=jax.tree.map(lambda x: x + 1.0, state.params))
    ck.save(2, bumped, {"index": 2}, config="second")
    ck.wait_until_finished()
    sys.exit(0)
""")


def test_killed_save_is_ignored_on_restore(tmp_path):
    env = subprocess_env(PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
                         XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 17, proc.stderr[-3000:]
    names = sorted(os.listdir(tmp_path))
    assert "1" in names and "2" not in names, names
    assert any(n.startswith("2.orbax-checkpoint-tmp") for n in names), names

    opt = make_optimizer("adamw", learning_rate=1e-3)
    ck = Checkpointer(tmp_path)
    assert ck.latest_step() == 1
    restored = ck.restore_latest(abstract_with_shardings(init_state(init_params(), opt)))
    assert restored.step == 1 and restored.data_state == {"index": 1} and restored.config == "first"
    np.testing.assert_array_equal(restored.state.params["mlp"]["kernel"], init_params()["mlp"]["kernel"])
