"""Every gin preset in configs/models parses and builds a consistent ModelConfig."""

import pathlib

import gin
import pytest

from jaxpost.models import ModelConfig, RopeScaling, abstract

ROOT = pathlib.Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (ROOT / "configs" / "models").glob("*.gin"))

# Published parameter counts (billions) of the real checkpoints.
EXPECTED_PARAMS_B = {
    "llama3_8b": 8.03, "llama3_1_8b": 8.03, "llama3_2_1b": 1.24, "llama3_2_3b": 3.21,
    "qwen2_5_0_5b": 0.494, "qwen2_5_7b": 7.62, "qwen3_0_6b": 0.596, "qwen3_8b": 8.19, "mistral_7b": 7.25,
}


def _build(name: str) -> ModelConfig:
    gin.clear_config()
    gin.add_config_file_search_path(str(ROOT))
    try:
        gin.parse_config_file(str(ROOT / "configs" / "models" / f"{name}.gin"))
        return ModelConfig()
    finally:
        gin.clear_config()


def test_all_presets_present():
    expected = set(EXPECTED_PARAMS_B) | {"tiny", "bench"}
    assert expected <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_builds(name):
    cfg = _build(name)
    if name in EXPECTED_PARAMS_B:
        assert cfg.num_params() / 1e9 == pytest.approx(EXPECTED_PARAMS_B[name], rel=0.01)
    _, shapes = abstract(cfg)  # shapes only: nothing allocated
    assert shapes["embed"]["embedding"].shape == (cfg.vocab_size, cfg.hidden_size)


def test_preset_details():
    l31 = _build("llama3_1_8b")
    assert l31.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192) and l31.num_kv_heads == 8
    assert _build("llama3_8b").rope_scaling is None
    assert _build("llama3_2_1b").rope_scaling.factor == 32.0
    q3 = _build("qwen3_0_6b")
    assert q3.qk_norm and q3.tie_embeddings and q3.dim_per_head == 128
    q25 = _build("qwen2_5_0_5b")
    assert q25.qkv_bias and q25.vocab_size == 151936
    bench = _build("bench")
    assert (bench.vocab_size, bench.hidden_size, bench.intermediate_size, bench.num_layers,
            bench.num_heads, bench.num_kv_heads, bench.tie_embeddings) == (8192, 256, 688, 4, 4, 2, False)
