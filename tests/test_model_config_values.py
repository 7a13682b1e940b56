"""A model config with a value of the wrong kind or range fails where it is built, in one line naming its key;
so does a fresh model that no Hugging Face class can hold (before training, not at the export after it)."""

from __future__ import annotations

from pathlib import Path

import gin
import pytest

from jaxpost import config as jp_config
from jaxpost.errors import UserError
from jaxpost.models.config import LoraConfig, ModelConfig, RopeScaling
from jaxpost.models.hf import check_exportable, model_config_to_hf_config

MODEL_PRESETS = sorted((Path(__file__).resolve().parents[1] / "configs" / "models").glob("*.gin"))


@pytest.mark.parametrize("cls,kwargs,message", [
    (ModelConfig, {"num_layers": 0}, "ModelConfig.num_layers must be an int >= 1, got 0"),
    (ModelConfig, {"hidden_size": -4}, "ModelConfig.hidden_size must be an int >= 1, got -4"),
    (ModelConfig, {"vocab_size": 256.0}, "ModelConfig.vocab_size must be an int >= 1, got 256.0"),
    (ModelConfig, {"num_kv_heads": True}, "ModelConfig.num_kv_heads must be an int >= 1, got True"),
    (ModelConfig, {"head_dim": 0}, "ModelConfig.head_dim must be None or an int >= 1, got 0"),
    (ModelConfig, {"sliding_window": -1}, "ModelConfig.sliding_window must be None or an int >= 1, got -1"),
    (ModelConfig, {"stored_logits_mib": -1}, "ModelConfig.stored_logits_mib must be an int >= 0, got -1"),
    (ModelConfig, {"rms_norm_eps": 0.0}, "ModelConfig.rms_norm_eps must be a number > 0, got 0.0"),
    (ModelConfig, {"rope_theta": -1.0}, "ModelConfig.rope_theta must be a number > 0, got -1.0"),
    (ModelConfig, {"remat": "ful"}, "ModelConfig.remat must be one of 'none', 'full', 'save_dots', got 'ful'"),
    (ModelConfig, {"dtype": "bf16"}, "ModelConfig.dtype must be one of 'float32', 'bfloat16', 'float16', got 'bf16'"),
    (ModelConfig, {"param_dtype": "float64"}, "ModelConfig.param_dtype must be one of 'float32', 'bfloat16', "
                                              "'float16', got 'float64'"),
    (ModelConfig, {"head": "value"}, "ModelConfig.head must be one of 'lm', 'score', got 'value'"),
    (ModelConfig, {"architecture": "gpt2"}, "ModelConfig.architecture must be one of 'llama', 'mistral', 'qwen2', "
                                            "'qwen3', got 'gpt2'"),
    (ModelConfig, {"num_heads": 3}, "ModelConfig.num_heads=3 must be a multiple of ModelConfig.num_kv_heads=2"),
    (ModelConfig, {"hidden_size": 66}, "ModelConfig.hidden_size=66 is not divisible by ModelConfig.num_heads=4; "
                                       "set ModelConfig.head_dim explicitly"),
    (ModelConfig, {"head_dim": 15}, "the head dimension 15 (ModelConfig.head_dim, or hidden_size / num_heads) "
                                    "must be even"),
    (ModelConfig, {"rope_scaling": 8.0}, "ModelConfig.rope_scaling must be a RopeScaling or None"),
    (LoraConfig, {"rank": 0}, "LoraConfig.rank must be an int >= 1, got 0"),
    (LoraConfig, {"rank": 4.0}, "LoraConfig.rank must be an int >= 1, got 4.0"),
    (LoraConfig, {"alpha": 0}, "LoraConfig.alpha must be a number > 0, got 0"),
    (LoraConfig, {"targets": "qproj"}, "LoraConfig.targets has unknown projection(s) ['qproj']"),
    (RopeScaling, {"factor": 0.0}, "RopeScaling.factor must be a number > 0, got 0.0"),
    (RopeScaling, {"original_max_position_embeddings": 0},
     "RopeScaling.original_max_position_embeddings must be an int >= 1, got 0"),
    (RopeScaling, {"low_freq_factor": 4.0},
     "RopeScaling.high_freq_factor=4.0 must be > RopeScaling.low_freq_factor=4.0"),
])
def test_a_bad_value_is_a_user_error_naming_its_key(cls, kwargs, message):
    with pytest.raises(UserError) as e:
        cls(**kwargs)
    assert str(e.value).startswith(message), str(e.value)


def test_the_defaults_and_every_model_preset_are_valid_and_exportable():
    check_exportable(ModelConfig())
    for preset in MODEL_PRESETS:
        gin.clear_config()
        jp_config.register_configurables()
        gin.parse_config_file(str(preset))
        config = gin.get_configurable(ModelConfig)()
        check_exportable(config)
        assert model_config_to_hf_config(config)["model_type"] == config.architecture, preset.name
    gin.clear_config()


@pytest.mark.parametrize("kwargs,message", [
    ({"qk_norm": True}, "ModelConfig.qk_norm=True does not fit ModelConfig.architecture='llama': the Hugging Face "
                        "Llama model a run exports has no qk norm; set ModelConfig.architecture = 'qwen3'"),
    ({"qkv_bias": True}, "ModelConfig.qkv_bias=True does not fit ModelConfig.architecture='llama': the Hugging Face "
                         "Llama model a run exports has no qkv bias; set ModelConfig.architecture = 'qwen2'"),
    ({"architecture": "qwen2"}, "ModelConfig.qkv_bias=False does not fit ModelConfig.architecture='qwen2': the "
                                "Hugging Face Qwen2 model a run exports always has qkv bias; "
                                "set ModelConfig.qkv_bias = True"),
    ({"architecture": "qwen3", "qk_norm": True, "qkv_bias": True}, "ModelConfig.qkv_bias=True does not fit "
                                                                   "ModelConfig.architecture='qwen3'"),
    ({"sliding_window": 64}, "ModelConfig.sliding_window=64 does not fit ModelConfig.architecture='llama': only the "
                             "Hugging Face Mistral config has a sliding window"),
])
def test_a_config_no_hugging_face_class_holds_is_refused_naming_the_keys(kwargs, message):
    config = ModelConfig(**kwargs)  # a valid model for research code: only its export is impossible
    for check in (check_exportable, model_config_to_hf_config):
        with pytest.raises(UserError) as e:
            check(config)
        assert str(e.value) == message or str(e.value).startswith(message), str(e.value)


@pytest.mark.parametrize("kwargs", [{"architecture": "qwen2", "qkv_bias": True},
                                    {"architecture": "qwen3", "qk_norm": True},
                                    {"architecture": "mistral", "sliding_window": 32}, {"architecture": "mistral"}])
def test_configs_their_class_holds_pass(kwargs):
    check_exportable(ModelConfig(**kwargs))
