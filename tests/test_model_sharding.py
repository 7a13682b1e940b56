"""Sharded init and forward: same numbers on 1 and 8 devices; params placed by their rules (both layer layouts)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxpost.models import ModelConfig, create, forward, token_logprobs
from jaxpost.models.layout import to_layout
from jaxpost.sharding import Partitioner, make_mesh

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                  qkv_bias=True, tie_embeddings=False)
MESHES = {
    "fsdp8": (dict(fsdp=8), "fsdp"),
    "fsdp4_tp2": (dict(fsdp=4, tensor=2), "fsdp_tp"),
    "data2_fsdp4": (dict(data=2, fsdp=4), "fsdp"),
}
EXPECTED_SPECS = {  # (q_proj kernel, k_proj bias, down_proj kernel, lm_head kernel, embedding)
    "fsdp8": (P("fsdp", None), P(None), P(None, "fsdp"), P("fsdp", None), P(None, "fsdp")),
    "fsdp4_tp2": (P("fsdp", "tensor"), P("tensor"), P("tensor", "fsdp"), P("fsdp", "tensor"), P("tensor", "fsdp")),
    "data2_fsdp4": (P("fsdp", None), P(None), P(None, "fsdp"), P("fsdp", None), P(None, "fsdp")),
}


def _inputs():
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, 64, (8, 16)).astype(np.int32)
    seg = np.ones((8, 16), np.int32)
    seg[3, 10:] = 0
    return tokens, np.broadcast_to(np.arange(16, dtype=np.int32), (8, 16)), seg


def _run(graphdef, params, tokens, pos, seg):
    hidden, _ = forward(graphdef, params, tokens, pos, seg)
    return hidden, token_logprobs(params, CFG, hidden, tokens, chunk_size=8)


@pytest.fixture(scope="module")
def reference():
    graphdef, params = create(CFG, seed=0)
    return params, jax.jit(_run, static_argnums=0)(graphdef, params, *_inputs())


def _layer(params, i, scanned):
    """Layer ``i``'s params dict (unrolled), or the stacked dict that holds every layer (scanned)."""
    return params["layers"] if scanned else params["layers"][i]


@pytest.mark.parametrize("name,scan", [(name, False) for name in sorted(MESHES)] + [("fsdp4_tp2", True)],
                         ids=lambda v: v if isinstance(v, str) else ("scanned" if v else "unrolled"))
def test_sharded_forward_matches_single_device(name, scan, reference):
    ref_params, (ref_h, ref_lp) = reference
    mesh_kw, rules = MESHES[name]
    part = Partitioner(make_mesh(**mesh_kw), rules)
    graphdef, params = create(CFG.replace(scan_layers=scan), seed=0, partitioner=part)
    # init is sharding- and layout-invariant
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), ref_params,
                 to_layout(params, scanned=False))
    layers = (None,) if scan else ()  # the stacked leaves' leading axis is replicated
    expected = tuple(P(*layers, *spec) if i < 3 else spec for i, spec in enumerate(EXPECTED_SPECS[name]))
    specs = (_layer(params, 0, scan)["attn"]["q_proj"]["kernel"].sharding.spec,
             _layer(params, 0, scan)["attn"]["k_proj"]["bias"].sharding.spec,
             _layer(params, 1, scan)["mlp"]["down_proj"]["kernel"].sharding.spec,
             params["lm_head"]["kernel"].sharding.spec,
             params["embed"]["embedding"].sharding.spec)
    assert specs == expected
    assert len(_layer(params, 0, scan)["attn"]["q_proj"]["kernel"].addressable_shards) == 8
    tokens, pos, seg = (jax.device_put(x, part.batch_sharding()) for x in _inputs())
    with part.activate():
        h, lp = jax.jit(_run, static_argnums=0)(graphdef, params, tokens, pos, seg)
    np.testing.assert_allclose(np.asarray(h), np.asarray(ref_h), atol=1e-5)
    np.testing.assert_allclose(np.asarray(lp), np.asarray(ref_lp), atol=1e-5)
    assert h.sharding.spec[0] is not None  # activations stayed batch-sharded


def test_partitioners_with_different_rules_do_not_share_a_compiled_function():
    """The active partitioner is part of jit's cache key: a function traced under one
    partitioner's rules is re-traced, not reused, under another's; equal ones share it."""
    from jaxpost.sharding import active_partitioner, constrain

    traces = []

    @jax.jit
    def f(x):
        traces.append(active_partitioner())
        return constrain(x * 2, (None, "embed"))

    x = jnp.ones((8, 16))
    mesh = make_mesh(fsdp=8)
    fsdp, dp = Partitioner(mesh, "fsdp"), Partitioner(mesh, "data_parallel")
    with fsdp.activate():
        assert jax.sharding.get_mesh() is mesh  # JAX's context mesh is the partitioner's
        a = f(x)
    with dp.activate():
        b = f(x)
    with Partitioner(mesh, "fsdp").activate():  # equal mesh and rules: the cached trace serves
        c = f(x)
    assert traces == [fsdp, dp]
    assert a.sharding.spec == P(None, "fsdp")  # fsdp rules: embed split 8 ways
    assert b.sharding.is_fully_replicated     # data-parallel rules: embed replicated
    assert c.sharding == a.sharding
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    f(x)  # outside activate(): no constraint, a third trace
    assert traces[-1] is None and len(traces) == 3


@pytest.mark.parametrize("kwargs,match", [
    (dict(data=3, fsdp=-1), r"data=3 fsdp=-1 tensor=1 over 8 devices: 8 is not divisible"),
    (dict(data=2, fsdp=2, tensor=1), r"data=2 fsdp=2 tensor=1 over 8 devices: data x fsdp x tensor = 4, not 8"),
    (dict(data=-1, fsdp=-1), r"at most one axis may be -1"),
])
def test_make_mesh_names_axes_and_sizes_when_devices_do_not_divide(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_mesh(**kwargs)
