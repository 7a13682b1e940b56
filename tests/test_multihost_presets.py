"""The mesh presets in configs/mesh/: each parses, names a known rule preset, and builds its mesh."""

from __future__ import annotations

import math
from pathlib import Path

import gin
import jax
import pytest

from jaxpost import config
from jaxpost.sharding import PRESETS, Partitioner, make_mesh

MESH_DIR = Path(__file__).resolve().parents[1] / "configs" / "mesh"
PRESET_FILES = sorted(p.name for p in MESH_DIR.glob("*.gin"))


def test_the_common_topologies_have_presets():
    for name in ("data_parallel.gin", "fsdp.gin", "fsdp_tp.gin", "tpu_v4_slice.gin", "tpu_v5e_slice.gin",
                 "tpu_v5p_slice.gin", "tpu_v5p_multislice.gin", "gpu_8xh100.gin", "gpu_h100_multinode.gin"):
        assert name in PRESET_FILES, name


@pytest.mark.parametrize("name", PRESET_FILES)
def test_preset_builds_a_mesh_on_eight_devices(name):
    """Presets that fix more than 8 devices (several slices or nodes) are checked with ``data`` set to 1."""
    config.parse([f"mesh/{name}"])
    try:
        sizes = {k: gin.query_parameter(f"make_mesh.{k}") for k in ("data", "fsdp", "tensor")}
        rules = gin.query_parameter("Partitioner.rules")
        assert rules in PRESETS, (name, rules)
        fixed = math.prod(s for s in sizes.values() if s != -1)
        if fixed > jax.device_count() or jax.device_count() % fixed:
            config.parse([f"mesh/{name}"], ["make_mesh.data = 1"])
            sizes["data"] = 1
        part = Partitioner()
        mesh = dict(part.mesh.shape)
        assert math.prod(mesh.values()) == jax.device_count()
        for axis, size in sizes.items():
            if size != -1:
                assert mesh[axis] == size, (name, axis, mesh)
        # Multi-slice / multi-node presets put slices (nodes) on the data axis: the batch is split over it.
        assert part.batch_sharding(2).spec[0] is not None
    finally:
        gin.clear_config()


def test_multislice_and_multinode_presets_put_the_data_axis_across_groups():
    """16 devices as 2 groups of 8 (2 slices / 2 nodes): rows of the mesh's data axis are whole groups."""
    devices = [type("D", (), {"id": i, "process_index": i // 8})() for i in range(16)]
    for name in ("tpu_v5p_multislice.gin", "gpu_h100_multinode.gin"):
        config.parse([f"mesh/{name}"], ["make_mesh.fsdp = 8"])
        try:
            mesh = make_mesh(devices=devices)
        finally:
            gin.clear_config()
        assert dict(mesh.shape) == {"data": 2, "fsdp": 8, "tensor": 1}
        for g in range(2):
            assert {d.process_index for d in mesh.devices[g].reshape(-1)} == {g}, name
