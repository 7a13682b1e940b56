"""``ModelConfig.scan_layers``: the layers under ``jax.lax.scan``, with the same numbers as the unrolled loop.

The parity tests against transformers (logits, scores, gradients, greedy
generation, log-probs) and the sharded-forward tests run in both layouts in
their own files; here: the layout itself, remat, packed and shared-prompt
attention, the sampler on a sharded mesh, LoRA, HF import/export and
checkpoints across layouts.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxpost import models
from jaxpost.generate.sampler import Sampler, SamplingConfig
from jaxpost.models import ModelConfig
from jaxpost.models.attention import Branches
from jaxpost.models.hf import load_hf, save_hf
from jaxpost.models.layout import is_scanned, layer_index, stack_layers, to_layout, unstack_layers
from jaxpost.models.lora import LoraConfig, apply_lora, load_adapters, merge_lora, save_adapters, set_adapters
from jaxpost.sharding import Partitioner, make_mesh
from jaxpost.train.checkpoint import Checkpointer, abstract_with_shardings
from jaxpost.train.state import init_state

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2,
                  qkv_bias=True, architecture="qwen2")
SCANNED = CFG.replace(scan_layers=True)


def assert_trees_equal(a, b, atol=0.0):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path))


def test_layout_stacks_layer_i_at_index_i_and_converts_back():
    _, unrolled = models.create(CFG, seed=3)
    _, scanned = models.create(SCANNED, seed=3)   # the same draws, stacked
    assert not is_scanned(unrolled) and is_scanned(scanned)
    assert scanned["layers"]["mlp"]["down_proj"]["kernel"].shape == (3, 48, 32)
    assert models.logical_axes(SCANNED)["layers"]["attn"]["q_proj"]["kernel"] == ("layers", "embed", "heads")
    assert_trees_equal(to_layout(unrolled, scanned=True), scanned)
    assert_trees_equal(to_layout(scanned, scanned=False), unrolled)
    np.testing.assert_array_equal(scanned["layers"]["attn"]["k_proj"]["bias"][2],
                                  unrolled["layers"][2]["attn"]["k_proj"]["bias"])
    # Any tree holding params-like dicts converts: Adam's state included; the asked layout is left alone.
    opt = optax.adam(1e-3).init(unrolled)
    converted = to_layout(opt, scanned=True)
    assert converted[0].mu["layers"]["input_norm"]["scale"].shape == (3, 32)
    assert_trees_equal(to_layout(scanned, scanned=True), scanned)
    assert layer_index(("layers", 2, "attn", "q_proj", "kernel"), True) == (("layers", "attn", "q_proj", "kernel"), 2)
    assert layer_index(("lm_head", "kernel"), True) == (("lm_head", "kernel"), None)
    with pytest.raises(ValueError, match="layer keys must be 0..1"):
        stack_layers({0: {"w": jnp.ones(2)}, 2: {"w": jnp.ones(2)}})
    with pytest.raises(ValueError, match="disagree on the number of layers"):
        unstack_layers({"a": jnp.ones((2, 4)), "b": jnp.ones((3, 4))})


def _packed_inputs():
    rng = np.random.RandomState(0)
    tokens = rng.randint(1, 64, (2, 12)).astype(np.int32)
    segments = np.array([[1] * 5 + [2] * 5 + [0] * 2, [1] * 12], np.int32)   # two packed sequences, padding
    positions = np.array([list(range(5)) * 2 + [0, 0], list(range(12))], np.int32)
    return tokens, positions, segments


@pytest.mark.parametrize("remat", ["none", "save_dots"])  # "full" is save_dots' code path with no saved dots
def test_forward_and_gradients_equal_in_both_layouts(remat):
    """Packed rows and a shared-prompt (Branches) row give the same hidden states and gradients, per remat policy."""
    g0, p0 = models.create(CFG.replace(remat=remat), seed=1)
    g1, p1 = models.create(SCANNED.replace(remat=remat), seed=1)
    tokens, positions, segments = _packed_inputs()
    branch_pos = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 3, 4, 5, 6]] * 2, np.int32)   # prefix 4, two branches of 4

    def loss(graphdef, params):
        h, _ = models.forward(graphdef, params, tokens, positions, segments)
        hb, _ = models.forward(graphdef, params, tokens, branch_pos, np.ones_like(tokens), branches=Branches(4))
        return jnp.sum(h ** 2) + jnp.sum(jnp.sin(hb))

    l0, d0 = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)(g0, p0)
    l1, d1 = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)(g1, p1)
    assert float(l0) == float(l1)
    assert_trees_equal(to_layout(d0, scanned=True), d1, atol=1e-6)
    assert float(jnp.abs(d1["layers"]["attn"]["q_proj"]["kernel"]).max()) > 1e-3   # not vacuous


def test_sampler_gives_the_same_tokens_in_both_layouts_on_a_sharded_mesh():
    """Sampled, groups of 2, with compaction: the KV cache is stacked, sharded by the same rules.

    (Greedy decoding equals transformers' in both layouts: tests/test_sampler_hf.py.)
    """
    part = Partitioner(make_mesh(fsdp=4, tensor=2), "fsdp_tp")
    g0, p0 = models.create(CFG, seed=2, partitioner=part)
    g1, p1 = models.create(SCANNED, seed=2, partitioner=part)
    prompts = np.array([[0, 0, 5, 6, 7, 8], [0, 9, 10, 11, 12, 13], [3, 4, 5, 6, 7, 8], [0, 0, 0, 0, 1, 2]], np.int32)
    mask = np.array([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1], [1] * 6, [0, 0, 0, 0, 1, 1]], np.int32)
    s = SamplingConfig(max_new_tokens=24, temperature=1.0, group_size=2, stop_token_ids=(7,), cache_block=8)
    outs = [Sampler(g, c, s, part, compact=True)(p, prompts, mask, jax.random.PRNGKey(4))
            for g, c, p in ((g0, CFG, p0), (g1, SCANNED, p1))]
    np.testing.assert_array_equal(np.asarray(outs[0].tokens), np.asarray(outs[1].tokens))
    np.testing.assert_allclose(np.asarray(outs[0].logprobs), np.asarray(outs[1].logprobs), atol=1e-6)
    assert len({tuple(r) for r in np.asarray(outs[1].tokens).tolist()}) > 1
    assert np.asarray(outs[1].lengths).min() < 24   # some rows stopped early: compaction moved rows


def test_hf_export_and_sharded_import_of_the_scanned_layout(tmp_path):
    _, unrolled = models.create(CFG, seed=5)
    _, scanned = models.create(SCANNED, seed=5)
    save_hf(tmp_path / "a", CFG, unrolled)
    save_hf(tmp_path / "b", SCANNED, scanned)
    # The same Hugging Face files whatever the layout.
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert "scan_layers" not in json.loads((tmp_path / "b" / "config.json").read_text())
    part = Partitioner(make_mesh(fsdp=4, tensor=2), "fsdp_tp")
    config, _, params = load_hf(tmp_path / "b", partitioner=part, scan_layers=True)
    assert config.scan_layers and is_scanned(params)
    q = params["layers"]["attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == P(None, "fsdp", "tensor") and len(q.addressable_shards) == 8
    assert q.addressable_shards[0].data.shape == (3, 8, 16)   # each device holds its slice of every layer
    assert_trees_equal(params, scanned)


def test_lora_in_the_scanned_layout_matches_the_unrolled_one(tmp_path):
    _, base0 = models.create(CFG, seed=0)
    _, base1 = models.create(SCANNED, seed=0)
    lcfg = LoraConfig(rank=2, alpha=4.0, targets=["q_proj", "down_proj"])
    c0, _, p0, m0 = apply_lora(CFG, base0, lcfg, seed=9)
    c1, _, p1, m1 = apply_lora(SCANNED, base1, lcfg, seed=9)
    assert p1["layers"]["attn"]["q_proj"]["lora_a"].shape == (3, 32, 2)
    assert_trees_equal(to_layout(p0, scanned=True), p1)    # the same adapters drawn, layer by layer
    assert sum(jax.tree.leaves(m1)) == 4                   # lora_a, lora_b of two stacked projections
    # Trained adapters: merge, save and load agree with the unrolled layout.
    rng = np.random.default_rng(0)
    trained = jax.tree_util.tree_map_with_path(
        lambda path, x: x + rng.normal(size=x.shape).astype(np.float32) if "lora" in jax.tree_util.keystr(path) else x,
        p0)
    trained1 = to_layout(trained, scanned=True)
    assert_trees_equal(to_layout(merge_lora(c0, trained)[1], scanned=True), merge_lora(c1, trained1)[1], atol=1e-6)
    save_adapters(tmp_path / "a", trained, lcfg)
    save_adapters(tmp_path / "b", trained1, lcfg)
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "b" / "adapter_model.safetensors").read_bytes()
    _, adapters = load_adapters(tmp_path / "b")
    assert_trees_equal(set_adapters(p1, adapters), trained1)


def test_checkpoint_of_the_scanned_layout_restores_into_the_unrolled_one(tmp_path):
    """The other direction of tests/test_pipelines_sft.py's resume across layouts, on a sharded mesh."""
    part = Partitioner(make_mesh(fsdp=8), "fsdp")
    opt = optax.adam(1e-2)
    _, scanned = models.create(SCANNED, seed=6, partitioner=part)
    state = init_state(scanned, opt)
    state = state.replace(opt_state=jax.tree.map(lambda x: x + 1, state.opt_state))   # non-trivial moments
    ckpt = Checkpointer(tmp_path / "ckpt", save_every=1)
    ckpt.save(1, state, data_state={"epoch": 0}, config="", force=True)
    ckpt.wait_until_finished()
    _, unrolled = models.create(CFG, seed=0, partitioner=part)
    target = abstract_with_shardings(init_state(unrolled, opt))
    restored = Checkpointer(tmp_path / "ckpt").restore(1, target)
    assert_trees_equal(restored.state.params, to_layout(state.params, scanned=False))
    assert_trees_equal(restored.state.opt_state, to_layout(state.opt_state, scanned=False))
    kernel = restored.state.params["layers"][1]["mlp"]["up_proj"]["kernel"]
    assert kernel.sharding == target.params["layers"][1]["mlp"]["up_proj"]["kernel"].sharding


@pytest.mark.parametrize("config", [CFG, SCANNED], ids=["unrolled", "scanned"])
def test_fused_projections_sample_what_the_separate_projections_sample(config):
    """``SamplingConfig.fuse_projections``: stacked q/k/v and gate/up matmuls, LoRA on all five, fsdp_tp."""
    part = Partitioner(make_mesh(fsdp=4, tensor=2), "fsdp_tp")
    _, base = models.create(config, seed=3)
    lcfg = LoraConfig(rank=2, alpha=4.0, targets=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"])
    config, graphdef, params, _ = apply_lora(config, base, lcfg, seed=1)
    rng = np.random.default_rng(1)   # trained (non-zero) adapters, so that they matter
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.5 * rng.normal(size=x.shape).astype(np.float32)
        if "lora_b" in jax.tree_util.keystr(path) else x, params)
    params = jax.device_put(params, part.shardings(models.logical_axes(config), params))
    prompts = np.array([[0, 0, 5, 6, 7, 8], [0, 9, 10, 11, 12, 13], [3, 4, 5, 6, 7, 8], [0, 0, 0, 0, 1, 2]], np.int32)
    mask = (prompts > 0).astype(np.int32)
    outs = []
    for fuse in (False, True):
        s = SamplingConfig(max_new_tokens=16, temperature=1.0, group_size=2, cache_block=8, fuse_projections=fuse)
        outs.append(Sampler(graphdef, config, s, part)(params, prompts, mask, jax.random.PRNGKey(5)))
    np.testing.assert_array_equal(np.asarray(outs[0].tokens), np.asarray(outs[1].tokens))
    np.testing.assert_allclose(np.asarray(outs[0].logprobs), np.asarray(outs[1].logprobs), atol=1e-6)
    assert len({tuple(r) for r in np.asarray(outs[1].tokens).tolist()}) > 1
