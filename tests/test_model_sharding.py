"""Sharded init and forward: same numbers on 1 and 8 devices; params placed by their rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxpost.models import ModelConfig, create, forward, token_logprobs
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


@pytest.mark.parametrize("name", sorted(MESHES))
def test_sharded_forward_matches_single_device(name, reference):
    ref_params, (ref_h, ref_lp) = reference
    mesh_kw, rules = MESHES[name]
    part = Partitioner(make_mesh(**mesh_kw), rules)
    graphdef, params = create(CFG, seed=0, partitioner=part)
    # init is sharding-invariant
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), ref_params, params)
    specs = (params["layers"][0]["attn"]["q_proj"]["kernel"].sharding.spec,
             params["layers"][0]["attn"]["k_proj"]["bias"].sharding.spec,
             params["layers"][1]["mlp"]["down_proj"]["kernel"].sharding.spec,
             params["lm_head"]["kernel"].sharding.spec,
             params["embed"]["embedding"].sharding.spec)
    assert specs == EXPECTED_SPECS[name]
    assert len(params["layers"][0]["attn"]["q_proj"]["kernel"].addressable_shards) == 8
    tokens, pos, seg = (jax.device_put(x, part.batch_sharding()) for x in _inputs())
    with part.activate():
        h, lp = jax.jit(_run, static_argnums=0)(graphdef, params, tokens, pos, seg)
    np.testing.assert_allclose(np.asarray(h), np.asarray(ref_h), atol=1e-5)
    np.testing.assert_allclose(np.asarray(lp), np.asarray(ref_lp), atol=1e-5)
    assert h.sharding.spec[0] is not None  # activations stayed batch-sharded
