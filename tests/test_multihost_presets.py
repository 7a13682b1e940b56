"""The mesh presets in configs/mesh/: each one builds the mesh it claims.

The multi-slice TPU and multi-node GPU presets are checked on fake devices
that carry what ``jax.experimental.mesh_utils`` reads (``id``, ``platform``,
``device_kind``, ``process_index``, ``slice_index``, TPU ``coords`` and
``core_on_chip``), given in a scrambled order: the device *ordering* of the
hybrid mesh must put whole slices (nodes) on the rows of the data axis and
keep fsdp inside one slice (node).
"""

from __future__ import annotations

from pathlib import Path

import gin
import jax
import numpy as np
import pytest

from jaxpost.sharding import FSDP, FSDP_TP, DATA_PARALLEL, Partitioner, make_mesh

MESH_DIR = Path(__file__).resolve().parents[1] / "configs" / "mesh"


def _parse(name, bindings=()):
    # Plain gin: a mesh preset binds only jaxpost.sharding's configurables.
    gin.parse_config_files_and_bindings([str(MESH_DIR / name)], list(bindings))


@pytest.fixture(autouse=True)
def _clear_gin():
    yield
    gin.clear_config()


def test_one_preset_per_real_difference():
    assert sorted(p.name for p in MESH_DIR.glob("*.gin")) == [
        "data_parallel.gin", "fsdp.gin", "fsdp_tp.gin", "gpu_h100_multinode.gin", "tpu_v5p_multislice.gin"]


@pytest.mark.parametrize("name,shape,rules", [
    ("data_parallel.gin", {"data": 8, "fsdp": 1, "tensor": 1}, DATA_PARALLEL),
    ("fsdp.gin", {"data": 1, "fsdp": 8, "tensor": 1}, FSDP),
    ("fsdp_tp.gin", {"data": 1, "fsdp": 4, "tensor": 2}, FSDP_TP),
])
def test_single_group_presets_build_their_mesh_on_eight_devices(name, shape, rules):
    assert jax.device_count() == 8
    _parse(name)
    part = Partitioner()
    assert dict(part.mesh.shape) == shape
    assert part.rules == dict(rules)
    # What each preset is for: replicated weights, or weights split over fsdp (and tensor).
    kernel = part.spec(("embed", "mlp"))
    assert kernel == {"data_parallel.gin": jax.P(None, None), "fsdp.gin": jax.P("fsdp", None),
                      "fsdp_tp.gin": jax.P("fsdp", "tensor")}[name]


class FakeDevice:
    """The attributes ``mesh_utils`` reads from a device; ``slice_index`` only where given."""

    def __init__(self, id, process_index, platform, device_kind, coords=None, slice_index=None):
        self.id, self.process_index, self.platform, self.device_kind = id, process_index, platform, device_kind
        if coords is not None:
            self.coords, self.core_on_chip = coords, 0
        if slice_index is not None:
            self.slice_index = slice_index

    def __repr__(self):
        return f"FakeDevice({self.id})"


def _scrambled(devices):
    return [devices[i] for i in np.random.RandomState(0).permutation(len(devices))]


def tpu_v5p_slices(n_slices):
    """``n_slices`` v5p-16 slices: 8 chips each on a 2x2x2 torus, 4 chips per host."""
    out = []
    for s in range(n_slices):
        for i, (x, y, z) in enumerate(np.ndindex(2, 2, 2)):
            out.append(FakeDevice(id=s * 8 + i, process_index=s * 2 + z, platform="tpu", device_kind="TPU v5",
                                  coords=(x, y, z), slice_index=s))
    return _scrambled(out)


def gpu_nodes(n_nodes):
    """``n_nodes`` nodes of 8 GPUs, one process per node (launch/slurm_gpu.sbatch)."""
    return _scrambled([FakeDevice(id=n * 8 + i, process_index=n, platform="gpu",
                                  device_kind="NVIDIA H100 80GB HBM3") for n in range(n_nodes) for i in range(8)])


@pytest.mark.parametrize("name,groups,bindings,devices,group_of", [
    ("tpu_v5p_multislice.gin", 2, [], tpu_v5p_slices(2), lambda d: d.slice_index),
    ("tpu_v5p_multislice.gin", 3, ["SLICES = 3"], tpu_v5p_slices(3), lambda d: d.slice_index),
    ("gpu_h100_multinode.gin", 2, [], gpu_nodes(2), lambda d: d.process_index),
    ("gpu_h100_multinode.gin", 4, ["NODES = 4"], gpu_nodes(4), lambda d: d.process_index),
])
def test_hybrid_presets_put_data_across_groups_and_fsdp_inside_one(name, groups, bindings, devices, group_of):
    _parse(name, bindings)
    mesh = make_mesh(devices=devices)
    assert dict(mesh.shape) == {"data": groups, "fsdp": 8, "tensor": 1}
    assert gin.query_parameter("Partitioner.rules") == "fsdp"
    grid = mesh.devices
    for g in range(groups):
        # Row g of the data axis is exactly group g (sorted by slice / process index) ...
        assert {group_of(d) for d in grid[g].flat} == {g}, (name, g)
        assert len({d.id for d in grid[g].flat}) == 8
    if name.startswith("gpu"):
        # ... and inside a node the GPUs are in id order (mesh_utils' topology-aware GPU numbering).
        assert [[d.id for d in grid[g].flat] for g in range(groups)] == [
            list(range(g * 8, g * 8 + 8)) for g in range(groups)]
    else:
        # ... and inside a slice the fsdp ring follows the torus: every chip of the 2x2x2 slice once.
        assert sorted(d.coords for d in grid[0].flat) == sorted(np.ndindex(2, 2, 2))


def test_hybrid_mesh_refuses_devices_that_do_not_form_the_groups():
    _parse("tpu_v5p_multislice.gin", ["SLICES = 4"])
    with pytest.raises(ValueError, match=r"dcn_data=4.*form 2 groups by slice_index"):
        make_mesh(devices=tpu_v5p_slices(2))
    gin.clear_config()
    with pytest.raises(ValueError, match=r"span 2 TPU slices; set dcn_data"):
        make_mesh(data=2, fsdp=8, devices=tpu_v5p_slices(2))
    with pytest.raises(ValueError, match=r"dcn_data=2 does not divide data=3"):
        make_mesh(data=3, fsdp=-1, dcn_data=2, devices=gpu_nodes(3)[:24])
