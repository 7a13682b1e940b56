"""LoRA through the real run code path (`load_model` -> `fit` -> `export`): SFT and DPO with `ModelConfig.lora`."""

from __future__ import annotations

import numpy as np
import pytest
import transformers

from jaxpost.models.lora import load_adapters
from pipeline_utils import losses, make_task, run_task

LORA = ["ModelConfig.lora = @LoraConfig()", "LoraConfig.rank = 4", "LoraConfig.alpha = 8.0"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_task(tmp_path_factory.mktemp("task"), n_sft=64, n_pref=64, n_prompts=8, n_eval=8)


@pytest.mark.slow
def test_lora_sft_run_trains_and_exports_merged_model_and_adapters(task, tmp_path):
    run_dir = tmp_path / "sft"
    run_task("sft", [f"sft.run_dir = '{run_dir}'", f"sft.train_data = '{task['sft']}'",
                     f"sft.tokenizer = '{task['tokenizer']}'", "sft.seq_len = 48", "sft.batch_size = 8",
                     "LoopConfig.num_steps = 12", "LoopConfig.log_every = 1",
                     "make_optimizer.learning_rate = 1e-2", "make_optimizer.schedule = 'constant'", *LORA])
    curve = losses(run_dir)
    assert np.mean([curve[s] for s in (10, 11, 12)]) < np.mean([curve[s] for s in (1, 2, 3)]) - 0.1, curve
    hf = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "final")  # merged, plain HF layout
    assert hf.config.num_hidden_layers == 2
    lcfg, adapters = load_adapters(run_dir / "final_adapters")
    assert lcfg.rank == 4 and np.any(adapters["layers"][0]["attn"]["q_proj"]["lora_b"])


@pytest.mark.slow
def test_lora_dpo_run_uses_base_as_reference(task, tmp_path):
    run_dir = tmp_path / "dpo"
    run_task("dpo", [f"dpo.run_dir = '{run_dir}'", f"dpo.train_data = '{task['preference']}'",
                     f"dpo.tokenizer = '{task['tokenizer']}'", "dpo.seq_len = 48", "dpo.batch_size = 8",
                     "LoopConfig.num_steps = 6", "LoopConfig.log_every = 1",
                     "make_optimizer.learning_rate = 1e-2", "make_optimizer.schedule = 'constant'", *LORA])
    curve = losses(run_dir)
    assert curve[1] == pytest.approx(np.log(2), abs=1e-5)  # adapters start at B = 0: policy == base reference
    assert sorted(curve) == list(range(1, 7)) and all(np.isfinite(list(curve.values())))
    assert np.mean([curve[s] for s in (5, 6)]) < np.log(2)
    assert (run_dir / "final_adapters" / "adapter_model.safetensors").exists()
