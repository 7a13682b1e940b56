"""``init_from``: what comes from the checkpoint, what from the run's ModelConfig, and how the run is told."""

from __future__ import annotations

import warnings

import gin
import jax
import numpy as np
import pytest

from jaxpost.errors import UserError
from jaxpost.models import LoraConfig, ModelConfig, RopeScaling, create, model_config_gin, save_hf
from jaxpost.models.hf import hf_config_to_model_config, model_config_to_hf_config

CKPT = ModelConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.fixture
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    _, params = create(CKPT, seed=3)
    save_hf(path, CKPT, params)
    return path


def test_model_config_gin_rebuilds_the_config(clean_gin):
    config = ModelConfig(hidden_size=48, head_dim=16, rope_scaling=RopeScaling(factor=4.0), sliding_window=32,
                         remat="full", attention="xla", architecture="mistral",
                         lora=LoraConfig(rank=2, alpha=4.0, targets=["v_proj", "q_proj"]))
    text = model_config_gin(config)
    lines = text.splitlines()
    assert "ModelConfig.hidden_size = 48" in lines and "ModelConfig.sliding_window = 32" in lines
    assert "ModelConfig.lora = @LoraConfig()" in lines and "LoraConfig.targets = ('q_proj', 'v_proj')" in lines
    assert "ModelConfig.num_layers = 2" in lines  # defaults are written too: the record is complete
    gin.parse_config(text)
    assert ModelConfig() == config
    gin.clear_config()
    gin.parse_config(model_config_gin(CKPT))
    assert ModelConfig() == CKPT and ModelConfig().lora is None


def test_checkpoint_config_does_not_read_gin_bindings(clean_gin):
    """lora.gin's ``ModelConfig.lora`` once leaked into every loaded checkpoint's config ("already has adapters")."""
    gin.parse_config(["ModelConfig.lora = @LoraConfig()", "ModelConfig.remat = 'full'", "ModelConfig.attention = 'xla'"])
    assert ModelConfig().lora is not None  # the binding is live
    loaded = hf_config_to_model_config(model_config_to_hf_config(CKPT))
    assert loaded == CKPT


def test_load_model_warns_about_overridden_bindings_and_keeps_run_numerics(hf_dir, clean_gin):
    from jaxpost.models.load import load_model
    from jaxpost.sharding import Partitioner

    gin.parse_config([
        "ModelConfig.hidden_size = 64",          # the checkpoint has 32: overridden, named
        "ModelConfig.intermediate_size = 172",   # the default value, but bound: overridden, named
        "ModelConfig.num_layers = 2",            # bound and equal to the checkpoint: not named
        "ModelConfig.remat = 'full'", "ModelConfig.dtype = 'bfloat16'", "ModelConfig.attention = 'xla'",
        "ModelConfig.param_dtype = 'bfloat16'", "ModelConfig.lora = @LoraConfig()", "LoraConfig.rank = 2",
    ])                                           # vocab_size: unbound default 256, checkpoint 264: not named
    model = ModelConfig()
    with pytest.warns(UserWarning, match="overrides the run's model bindings") as caught:
        config, _, params = load_model(model, str(hf_dir), Partitioner())
    msgs = [str(w.message) for w in caught if "overrides" in str(w.message)]
    assert len(msgs) == 1, msgs
    assert "ModelConfig.hidden_size = 64 (checkpoint: 32)" in msgs[0]
    assert "ModelConfig.intermediate_size = 172 (checkpoint: 64)" in msgs[0]
    assert "num_layers" not in msgs[0] and "vocab_size" not in msgs[0] and "remat" not in msgs[0]
    # Shapes from the checkpoint; numerics, param dtype and adapters from the run.
    assert (config.hidden_size, config.intermediate_size, config.vocab_size) == (32, 64, 264)
    assert (config.remat, config.dtype, config.attention, config.param_dtype) == ("full", "bfloat16", "xla", "bfloat16")
    assert config.lora == LoraConfig(rank=2)
    q = params["layers"][0]["attn"]["q_proj"]
    assert q["kernel"].shape == (32, 32) and q["kernel"].dtype == np.dtype("bfloat16") and q["lora_a"].shape == (32, 2)
    assert not np.any(np.asarray(q["lora_b"]))

    with warnings.catch_warnings():  # a run whose bindings agree with the checkpoint hears nothing
        warnings.simplefilter("error")
        gin.clear_config()
        load_model(CKPT.replace(remat="full"), str(hf_dir), Partitioner())


def test_load_model_new_head_reuses_the_body_and_refuses_adapter_dirs(hf_dir, tmp_path, clean_gin):
    from jaxpost.models import load_hf
    from jaxpost.models.lora import apply_lora, save_adapters
    from jaxpost.models.load import load_model

    _, _, base = load_hf(hf_dir)
    config, _, params = load_model(None, str(hf_dir), None, seed=5, head="score")
    assert config.head == "score" and "lm_head" not in params
    _, fresh = create(CKPT.replace(head="score"), seed=5)
    assert np.array_equal(np.asarray(params["score"]["kernel"]), np.asarray(fresh["score"]["kernel"]))
    for a, b in zip(jax.tree.leaves({k: v for k, v in params.items() if k != "score"}),
                    jax.tree.leaves({k: v for k, v in base.items() if k != "lm_head"})):
        assert np.array_equal(np.asarray(a), np.asarray(b))

    lora = LoraConfig(rank=2)
    _, _, adapted, _ = apply_lora(CKPT, base, lora)
    save_adapters(tmp_path / "final_adapters", adapted, lora)
    with pytest.raises(UserError, match="holds LoRA adapters, not a model"):
        load_model(CKPT.replace(lora=lora), str(tmp_path / "final_adapters"), None)
