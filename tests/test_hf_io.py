"""Hugging Face export/import: transformers loads our exports, round trips are bit-exact, errors are clear."""

import json

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from hf_models import make_model
from jaxpost.models import (ModelConfig, RopeScaling, create, forward, hf_config_to_model_config, load_hf,
                            logits, model_config_to_hf_config, save_hf, scores)
from jaxpost.models.safetensors_io import save_file

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_layers=2, num_heads=4, num_kv_heads=2)
EXPORT_CASES = {
    "llama31": ModelConfig(**TINY, architecture="llama", rope_theta=500000.0,
                           rope_scaling=RopeScaling(8.0, 1.0, 4.0, 16)),
    "mistral": ModelConfig(**TINY, architecture="mistral", sliding_window=6),
    "qwen2_tied": ModelConfig(**TINY, architecture="qwen2", qkv_bias=True, tie_embeddings=True),
    "qwen3": ModelConfig(**TINY, architecture="qwen3", qk_norm=True, head_dim=24),
}


def _tokens(b=2, l=10, vocab=96):
    ids = np.random.RandomState(1).randint(0, vocab, size=(b, l)).astype(np.int32)
    return ids, np.broadcast_to(np.arange(l, dtype=np.int32), (b, l)), np.ones((b, l), np.int32)


def _safetensors_contents(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k).clone()  # detach from the mmap: files get rewritten
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_export_loads_in_transformers_with_same_logits(case, tmp_path):
    config = EXPORT_CASES[case]
    graphdef, params = create(config, seed=3)
    save_hf(tmp_path, config, params)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(model).__name__.lower().startswith(config.architecture)
    ids, pos, seg = _tokens()
    with torch.no_grad():
        ref = model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    hidden, _ = jax.jit(forward, static_argnums=0)(graphdef, params, ids, pos, seg)
    np.testing.assert_allclose(np.asarray(logits(params, config, hidden)), ref, atol=1e-4, rtol=0)
    # and the exported config maps back to the same ModelConfig
    assert load_hf(tmp_path)[0] == config


def test_export_score_head_loads_as_sequence_classifier(tmp_path):
    config = ModelConfig(**TINY, head="score")
    graphdef, params = create(config, seed=4)
    save_hf(tmp_path, config, params, extra_config={"pad_token_id": 0})
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    ids, pos, seg = _tokens()
    ids[ids == 0] = 1  # no pad tokens: HF pools the last position
    with torch.no_grad():
        ref = model(torch.tensor(ids, dtype=torch.long)).logits.numpy()[:, 0]
    hidden, _ = forward(graphdef, params, ids, pos, seg)
    np.testing.assert_allclose(np.asarray(scores(params, hidden))[:, -1], ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case,dtype", [("llama31_rope_tied", torch.float32), ("qwen2_bias_tied", torch.float32),
                                        ("qwen3_qknorm_headdim", torch.bfloat16)])
def test_import_export_round_trip_is_bit_identical(case, dtype, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_model(case).to(dtype).save_pretrained(src)
    config, _, params = load_hf(src)
    assert config.param_dtype == str(dtype).removeprefix("torch.")
    save_hf(dst, config, params)
    a, b = _safetensors_contents(src), _safetensors_contents(dst)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(torch.uint8) if a[k].dtype == torch.bfloat16 else a[k],
                           b[k].view(torch.uint8) if b[k].dtype == torch.bfloat16 else b[k]), k


def test_sharded_export_has_index_and_reloads(tmp_path):
    config = EXPORT_CASES["qwen3"]
    _, params = create(config, seed=5)
    save_hf(tmp_path, config, params, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) > 2 and set(index["weight_map"].values()) == set(files)
    assert not (tmp_path / "model.safetensors").exists()
    _, _, back = load_hf(tmp_path)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), params, back)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    emb = model.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(emb, np.asarray(params["embed"]["embedding"]))


def test_load_casts_to_requested_dtype(tmp_path):
    make_model("llama_gqa_untied").save_pretrained(tmp_path)
    config, _, params = load_hf(tmp_path, dtype="bfloat16")
    assert config.param_dtype == "bfloat16" and config.dtype == "bfloat16"
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(params))


# ---------------------------------------------------------------- errors

def _write_checkpoint(tmp_path):
    make_model("llama_gqa_untied").save_pretrained(tmp_path)
    return _safetensors_contents(tmp_path)


def test_unknown_architecture_is_named(tmp_path):
    _write_checkpoint(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*supported:.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        load_hf(tmp_path)


def test_missing_tensor_is_named(tmp_path):
    tensors = _write_checkpoint(tmp_path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file({k: v.numpy() for k, v in tensors.items()}, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        load_hf(tmp_path)


def test_misshaped_tensor_is_named_with_shapes(tmp_path):
    tensors = _write_checkpoint(tmp_path)
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_file({k: v.numpy() for k, v in tensors.items()}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"k_proj\.weight.*shape \(16, 64\).*expected \(32, 64\)"):
        load_hf(tmp_path)


def test_unsupported_config_fields_are_named():
    base = model_config_to_hf_config(ModelConfig(**TINY))
    with pytest.raises(ValueError, match="hidden_act"):
        hf_config_to_model_config({**base, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        hf_config_to_model_config({**base, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0, "factor": 2}})
    with pytest.raises(ValueError, match="attention_bias"):
        hf_config_to_model_config({**base, "attention_bias": True})


def test_legacy_rope_layout_is_read():
    hf = model_config_to_hf_config(EXPORT_CASES["llama31"])
    legacy = {k: v for k, v in hf.items() if k != "rope_parameters"}
    assert hf_config_to_model_config(legacy) == EXPORT_CASES["llama31"]
