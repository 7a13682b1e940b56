"""LoRA: the adapted layer's formula, frozen-base training (SFT, DPO, reward), merge/export and adapter files."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxpost import models
from jaxpost.algorithms import make_dpo_loss, make_reward_loss, make_sft_loss, with_base_reference
from jaxpost.errors import UserError
from jaxpost.models.config import LoraConfig, ModelConfig
from jaxpost.models.layers import Linear
from jaxpost.models.lora import (apply_lora, load_adapters, merge_lora, save_adapters, set_adapters, without_adapters)
from jaxpost.models.safetensors_io import SafetensorsFile
from jaxpost.sharding import Partitioner, make_mesh
from jaxpost.train import init_state, make_optimizer, make_train_step, stop_frozen_gradients

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _leaves(tree):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _is_adapter_key(k):
    return k.endswith("['lora_a']") or k.endswith("['lora_b']")


def _lm_batch(rng, B=4, L=12, vocab=64, prefix=""):
    tokens = rng.integers(1, vocab, (B, L)).astype(np.int32)
    return {f"{prefix}tokens": tokens, f"{prefix}positions": np.tile(np.arange(L, dtype=np.int32), (B, 1)),
            f"{prefix}segment_ids": np.ones((B, L), np.int32),
            f"{prefix}targets": np.concatenate([tokens[:, 1:], np.zeros((B, 1), np.int32)], 1),
            f"{prefix}loss_mask": np.concatenate([np.zeros((B, 4)), np.ones((B, L - 5)), np.zeros((B, 1))],
                                                 1).astype(np.float32)}


def _pref_batch(seed=0):
    rng = np.random.default_rng(seed)
    return {**_lm_batch(rng, prefix="chosen_"), **_lm_batch(rng, prefix="rejected_")}


def _randomize_adapters(params, seed=1, std=0.3):
    """Non-zero B (and fresh A) so that the adapters change the model's function."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(rng.normal(0, std, x.shape), x.dtype) if _is_adapter_key(jax.tree_util.keystr(p))
        else x, params)


# ------------------------------------------------------------------ config and layer


def test_lora_config_presets_validation_and_dropout_refusal():
    assert LoraConfig(targets="attention").targets == ALL[:4]
    assert LoraConfig(targets="mlp").targets == ALL[4:]
    assert LoraConfig(targets="all").targets == ALL
    assert LoraConfig(targets=["v_proj", "q_proj", "q_proj"]).targets == ("q_proj", "v_proj")
    assert LoraConfig(rank=4, alpha=8.0).scale == 2.0
    with pytest.raises(ValueError, match="qkv_proj"):
        LoraConfig(targets=["qkv_proj"])
    with pytest.raises(ValueError, match="rank"):
        LoraConfig(rank=0)
    with pytest.raises(ValueError, match="dropout"):
        LoraConfig(dropout=0.1)
    with pytest.raises(UserError, match=r"ModelConfig.lora must be a LoraConfig or None .*got \{'rank': 4\}"):
        ModelConfig(lora={"rank": 4})


def test_linear_with_lora_matches_formula_and_never_forms_AB():
    rngs = nnx.Rngs(0)
    layer = Linear(16, 24, ("embed", "mlp"), bias=True, lora_rank=2, lora_alpha=6.0, rngs=rngs)
    r = np.random.default_rng(0)
    W, b = r.normal(size=(16, 24)), r.normal(size=(24,))
    A, B = r.normal(size=(16, 2)), r.normal(size=(2, 24))
    layer.kernel[...], layer.bias[...] = jnp.asarray(W, jnp.float32), jnp.asarray(b, jnp.float32)
    layer.lora_a[...], layer.lora_b[...] = jnp.asarray(A, jnp.float32), jnp.asarray(B, jnp.float32)
    x = r.normal(size=(3, 5, 16))
    want = x @ W + b + (6.0 / 2) * (x @ A) @ B
    np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x, jnp.float32))), want, rtol=1e-5, atol=1e-5)
    # Logical axes: the projection's axis on the big dimension, None on the rank.
    assert layer.lora_a.get_metadata()["logical_axes"] == ("embed", None)
    assert layer.lora_b.get_metadata()["logical_axes"] == (None, "mlp")
    # No [in, out] intermediate: the adapter is two thin matmuls.
    graphdef, state = nnx.split(layer)
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, jnp.ones((3, 5, 16)))
    shapes = [tuple(v.aval.shape) for eq in jaxpr.jaxpr.eqns for v in eq.outvars]
    assert (16, 24) not in shapes and (24, 16) not in shapes


@pytest.mark.slow  # several compilations of the tiny model: 20-60 s on 2 shared cores
def test_apply_lora_starts_equal_to_base_and_shards_adapters():
    graphdef, params = models.create(CFG, seed=0)
    lcfg = LoraConfig(rank=4, alpha=8.0, targets=["q_proj", "down_proj"])
    config, g2, p2, mask = apply_lora(CFG, params, lcfg, seed=0)
    assert config.lora == lcfg
    q, d = p2["layers"][1]["attn"]["q_proj"], p2["layers"][1]["mlp"]["down_proj"]
    assert q["lora_a"].shape == (32, 4) and q["lora_b"].shape == (4, 32)
    assert d["lora_a"].shape == (48, 4) and d["lora_b"].shape == (4, 32)
    assert "lora_a" not in p2["layers"][0]["attn"]["k_proj"]
    assert not np.any(np.asarray(q["lora_b"])) and np.all(np.abs(np.asarray(q["lora_a"])) <= 32 ** -0.5)
    assert p2["layers"][0]["attn"]["q_proj"]["kernel"] is params["layers"][0]["attn"]["q_proj"]["kernel"]
    flat_mask = _leaves(mask)
    assert sum(flat_mask.values()) == 2 * 2 * 2 and all(flat_mask[k] == _is_adapter_key(k) for k in flat_mask)
    # Same seed -> same adapters; different site -> different draws.
    assert np.array_equal(apply_lora(CFG, params, lcfg, seed=0)[2]["layers"][1]["attn"]["q_proj"]["lora_a"],
                          q["lora_a"])
    assert not np.allclose(p2["layers"][0]["attn"]["q_proj"]["lora_a"], q["lora_a"])

    rng = np.random.default_rng(0)
    t = jnp.asarray(rng.integers(0, 64, (2, 8)), jnp.int32)
    pos, seg = jnp.tile(jnp.arange(8), (2, 1)), jnp.ones((2, 8), jnp.int32)
    base, _ = jax.jit(models.forward, static_argnums=0)(graphdef, params, t, pos, seg)
    adapted, _ = jax.jit(models.forward, static_argnums=0)(g2, p2, t, pos, seg)
    assert np.array_equal(np.asarray(base), np.asarray(adapted))  # B = 0: exactly the base

    part = Partitioner(make_mesh(fsdp=4, tensor=2), "fsdp_tp")
    _, _, ps, _ = apply_lora(CFG, params, lcfg, seed=0, partitioner=part)
    qs, ds = ps["layers"][0]["attn"]["q_proj"], ps["layers"][0]["mlp"]["down_proj"]
    assert qs["lora_a"].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    assert qs["lora_b"].sharding.spec == jax.sharding.PartitionSpec(None, "tensor")
    assert ds["lora_a"].sharding.spec == jax.sharding.PartitionSpec("tensor", None)
    assert ds["lora_b"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert np.array_equal(np.asarray(qs["lora_a"]), np.asarray(p2["layers"][0]["attn"]["q_proj"]["lora_a"]))
    with pytest.raises(ValueError, match="already has adapters"):
        apply_lora(config, p2, lcfg)
    with pytest.raises(ValueError, match=r"\['embed'\]\['embedding'\].*shape"):
        apply_lora(CFG.replace(vocab_size=80), params, lcfg)


# ------------------------------------------------------------------ training


def _train(loss_fn, params, mask, batch, steps, lr=1e-2):
    opt = make_optimizer("adamw", learning_rate=lr, schedule="constant", clip_norm=None, trainable_mask=mask)
    state = init_state(params, opt)
    step = jax.jit(make_train_step(stop_frozen_gradients(loss_fn, mask), opt))
    losses = []
    for _ in range(steps):
        state, m = step(state, batch, None)
        losses.append(float(m["loss"]))
    return state, losses


@pytest.mark.slow  # several compilations of the tiny model: 20-60 s on 2 shared cores
def test_lora_sft_trains_only_adapters_with_state_only_for_adapters():
    _, params = models.create(CFG, seed=0)
    config, graphdef, params, mask = apply_lora(CFG, params, LoraConfig(rank=4, alpha=8.0), seed=0)
    before = _leaves(params)
    batch = _lm_batch(np.random.default_rng(0))
    state, losses = _train(make_sft_loss(graphdef, config), params, mask, batch, 15)
    assert losses[-1] < losses[0] - 0.3, losses
    after = _leaves(state.params)
    n_adapters = 0
    for k, x in before.items():
        if _is_adapter_key(k):
            n_adapters += 1
            assert not np.array_equal(after[k], x), f"{k} did not train"
        else:
            assert np.array_equal(after[k], x), f"base weight {k} changed"
    assert n_adapters == 2 * 7 * 2
    # Adam's mu and nu exist for the adapters only: 2 x adapter leaves and bytes; the rest are counters.
    opt_arrays = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
    adapter_bytes = sum(x.nbytes for k, x in before.items() if _is_adapter_key(k))
    assert len(opt_arrays) == 2 * n_adapters
    assert sum(x.nbytes for x in opt_arrays) == 2 * adapter_bytes
    assert adapter_bytes < 0.2 * sum(x.nbytes for x in before.values())


@pytest.mark.slow  # several compilations of the tiny model: 20-60 s on 2 shared cores
def test_stop_frozen_gradients_keeps_adapter_gradients_and_zeroes_base():
    _, params = models.create(CFG, seed=0)
    config, graphdef, params, mask = apply_lora(CFG, params, LoraConfig(rank=2, targets="attention"), seed=0)
    params = _randomize_adapters(params)
    loss = make_sft_loss(graphdef, config)
    batch = _lm_batch(np.random.default_rng(1))
    g_full = _leaves(jax.jit(jax.grad(lambda p: loss(p, batch)[0]))(params))
    g_stop = _leaves(jax.jit(jax.grad(lambda p: stop_frozen_gradients(loss, mask)(p, batch)[0]))(params))
    for k in g_full:
        if _is_adapter_key(k):
            np.testing.assert_allclose(g_stop[k], g_full[k], rtol=1e-5, atol=1e-7, err_msg=k)
            assert np.any(g_full[k])
        else:
            assert not np.any(g_stop[k]), k


@pytest.mark.slow  # several compilations of the tiny model: 20-60 s on 2 shared cores
def test_lora_dpo_reference_is_base_without_adapters():
    _, base = models.create(CFG, seed=0)
    base_copy = jax.tree.map(np.asarray, base)
    config, graphdef, params, mask = apply_lora(CFG, base, LoraConfig(rank=4, alpha=8.0), seed=0)
    dpo = make_dpo_loss(graphdef, config, beta=0.1)
    loss_fn = with_base_reference(dpo)
    assert loss_fn.kind == "sigmoid" and loss_fn.needs_reference
    batch = _pref_batch()
    loss0, _ = jax.jit(loss_fn)(params, batch)
    assert float(loss0) == pytest.approx(np.log(2), abs=1e-6)  # policy == reference since B = 0

    state, losses = _train(loss_fn, params, mask, batch, 8, lr=5e-3)
    assert losses[0] == pytest.approx(np.log(2), abs=1e-6) and losses[-1] < losses[0] - 0.05, losses
    # After training the reference is still the untouched base: same loss as an explicit base reference.
    explicit_ref = without_adapters(set_adapters(state.params, {}))
    for k, x in _leaves(base_copy).items():
        assert np.array_equal(_leaves(state.params)[k], x), k
    a, _ = jax.jit(loss_fn)(state.params, batch)
    b, _ = jax.jit(dpo)(state.params, batch, {"reference": explicit_ref})
    assert float(a) == pytest.approx(float(b), abs=1e-6) and float(a) < np.log(2) - 0.05


def test_lora_reward_model_trains_score_head_too():
    cfg = CFG.replace(head="score")
    _, params = models.create(cfg, seed=0)
    config, graphdef, params, mask = apply_lora(cfg, params, LoraConfig(rank=2, targets="mlp"), seed=0)
    assert mask["score"]["kernel"] and not mask["embed"]["embedding"]
    before = _leaves(params)
    state, losses = _train(make_reward_loss(graphdef, config), params, mask, _pref_batch(3), 6)
    assert losses[-1] < losses[0]
    after = _leaves(state.params)
    for k, x in before.items():
        trained = _is_adapter_key(k) or k.startswith("['score']")
        assert np.array_equal(after[k], x) != trained, k


# ------------------------------------------------------------------ merge, export, adapter files


def test_merged_export_matches_transformers_logits(tmp_path):
    cfg = CFG.replace(vocab_size=96, hidden_size=64, intermediate_size=80, num_heads=4, num_kv_heads=2)
    _, base = models.create(cfg, seed=0)
    config, graphdef, params, _ = apply_lora(cfg, base, LoraConfig(rank=4, alpha=8.0), seed=0)
    params = _randomize_adapters(params, std=0.2)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 96, (2, 10)).astype(np.int32)
    pos, seg = np.tile(np.arange(10, dtype=np.int32), (2, 1)), np.ones((2, 10), np.int32)
    run = jax.jit(lambda g, c, p: models.logits(p, c, models.forward(g, p, tokens, pos, seg)[0]), static_argnums=(0, 1))
    want = np.asarray(run(graphdef, config, params))
    assert np.abs(want - np.asarray(run(models.abstract(cfg)[0], cfg, base))).max() > 1e-2  # adapters matter

    with pytest.raises(ValueError, match="merge_lora"):
        models.save_hf(tmp_path / "unmerged", config, params)
    merged_cfg, merged = merge_lora(config, params)
    assert merged_cfg.lora is None and "lora_a" not in merged["layers"][0]["attn"]["q_proj"]
    assert "lora_a" in params["layers"][0]["attn"]["q_proj"]  # input untouched
    models.save_hf(tmp_path / "merged", merged_cfg, merged)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    with torch.no_grad():
        got = hf(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # The merge by hand for one kernel: W + (alpha / r) A B.
    q = params["layers"][1]["attn"]["q_proj"]
    np.testing.assert_allclose(merged["layers"][1]["attn"]["q_proj"]["kernel"],
                               np.asarray(q["kernel"]) + 2.0 * np.asarray(q["lora_a"]) @ np.asarray(q["lora_b"]),
                               rtol=1e-6, atol=1e-6)


def test_adapters_save_load_round_trip(tmp_path):
    cfg = CFG.replace(head="score")
    _, base = models.create(cfg, seed=0)
    lcfg = LoraConfig(rank=3, alpha=5.0, targets=["v_proj", "up_proj"])
    config, _, params, _ = apply_lora(cfg, base, lcfg, seed=0)
    params = _randomize_adapters(params)
    save_adapters(tmp_path / "ad", params, config.lora)

    meta = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert (meta["r"], meta["lora_alpha"], meta["target_modules"]) == (3, 5.0, ["v_proj", "up_proj"])
    f = SafetensorsFile(tmp_path / "ad" / "adapter_model.safetensors")
    assert f.shape("base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight") == (3, 32)  # [r, in]
    assert f.shape("base_model.model.model.layers.1.mlp.up_proj.lora_B.weight") == (48, 3)       # [out, r]
    assert f.shape("base_model.model.score.weight") == (1, 32)
    assert len(f.keys()) == 2 * 2 * 2 + 1

    loaded_cfg, adapters = load_adapters(tmp_path / "ad")
    assert loaded_cfg == lcfg
    _, _, fresh, _ = apply_lora(cfg, base, loaded_cfg, seed=7)
    restored = set_adapters(fresh, adapters)
    want, got = _leaves(params), _leaves(restored)
    assert want.keys() == got.keys()
    for k in want:
        assert np.array_equal(want[k], got[k]), k

    _, _, wrong_rank, _ = apply_lora(cfg, base, LoraConfig(rank=2, targets=["v_proj", "up_proj"]))
    with pytest.raises(ValueError, match=r"\['v_proj'\]\['lora_a'\] has shape \(32, 3\)"):
        set_adapters(wrong_rank, adapters)
    _, _, other_targets, _ = apply_lora(cfg, base, LoraConfig(rank=3, targets=["q_proj"]))
    with pytest.raises(KeyError, match="v_proj"):
        set_adapters(other_targets, adapters)


def test_loss_wrappers_live_beside_their_users_not_in_the_model_package():
    import jaxpost.models.lora as lora_module
    from jaxpost.algorithms import preference
    from jaxpost.train import trainable

    assert not hasattr(lora_module, "stop_frozen_gradients") and not hasattr(lora_module, "with_base_reference")
    assert stop_frozen_gradients is trainable.stop_frozen_gradients
    assert with_base_reference is preference.with_base_reference
