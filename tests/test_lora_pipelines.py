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


def test_online_reference_under_lora_is_the_base_without_a_copy():
    import jax

    from jaxpost.models import LoraConfig, ModelConfig, create
    from jaxpost.models.lora import has_adapters
    from jaxpost.train.online import reference_policy

    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, lora=LoraConfig(rank=2))
    _, params = create(config, seed=0)
    params["layers"][0]["attn"]["q_proj"]["lora_b"] += 1.0  # as if trained
    ref = reference_policy(params)(params)
    assert has_adapters(params)
    q, ref_q = params["layers"][0]["attn"]["q_proj"], ref["layers"][0]["attn"]["q_proj"]
    assert not np.any(np.asarray(ref_q["lora_b"]))  # adapters off: x W + s (x A) 0 = x W
    assert ref_q["kernel"] is q["kernel"]  # the base is the same buffer, not a copy
    plain = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64)
    _, p = create(plain, seed=0)
    frozen = reference_policy(p)
    p_leaf, f_leaf = jax.tree.leaves(p)[0], jax.tree.leaves(frozen(None))[0]
    assert f_leaf is not p_leaf and np.array_equal(np.asarray(f_leaf), np.asarray(p_leaf))  # a copy


@pytest.mark.slow
@pytest.mark.parametrize("method", ["grpo", "online_dpo"])
def test_lora_online_runs_measure_kl_to_the_base(method, hf_base, tmp_path):
    """From an HF checkpoint: adapters start at B = 0, so KL to the base is 0 at the first rollout and grows as
    they train; the export is that checkpoint plus the LoRA delta."""
    import gin

    from jaxpost.models import LoraConfig
    from jaxpost.recipes.grpo import grpo
    from jaxpost.train.online import OnlineConfig
    from jaxpost.recipes.online_dpo import online_dpo
    from jaxpost.generate.rollout import RolloutConfig
    from jaxpost.data import build_tokenizer
    from online_helpers import CONFIG, lowercase_fraction, scores_and_kl

    build_tokenizer(None).save_pretrained(tmp_path / "tok")
    with open(tmp_path / "prompts.jsonl", "w") as f:
        for i in range(16):
            f.write(f'{{"prompt": "Q{i}: say"}}\n')
    gin.clear_config()
    try:
        gin.bind_parameter("make_scorer.reward_functions", [lowercase_fraction])
        gin.bind_parameter("make_optimizer.learning_rate", 3e-2)
        gin.bind_parameter("make_optimizer.schedule", "constant")
        if method == "online_dpo":
            gin.bind_parameter("make_dpo_loss.beta", 0.1)
        {"grpo": grpo, "online_dpo": online_dpo}[method](
            run_dir=str(tmp_path / method), train_data=str(tmp_path / "prompts.jsonl"),
            tokenizer=str(tmp_path / "tok"), model=CONFIG.replace(lora=LoraConfig(rank=4, alpha=8.0)),
            init_from=str(hf_base),
            online=OnlineConfig(num_rollouts=3, prompts_per_rollout=8, max_prompt_len=16),
            rollout=RolloutConfig(max_new_tokens=8, group_size=4))
    finally:
        gin.clear_config()
    _, kl, _ = scores_and_kl(tmp_path / method)
    assert abs(kl[0]) < 1e-5, kl
    assert max(kl[1:]) > 1e-4, kl
    assert_merged_is_base_plus_delta(hf_base, tmp_path / method)


# ------------------------------------------------ LoRA on a Hugging Face checkpoint (init_from), every method

HF_BASE = dict(vocab_size=264, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
OFFLINE = {"sft": "sft", "reward_model": "preference", "dpo": "preference", "distill": "sft"}


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    """A tiny random Llama saved as a Hugging Face directory (config.json + safetensors + tokenizer)."""
    from jaxpost.data import build_tokenizer
    from jaxpost.models import ModelConfig, create, save_hf

    path = tmp_path_factory.mktemp("hf_base")
    _, params = create(ModelConfig(**HF_BASE), seed=7)
    save_hf(path, ModelConfig(**HF_BASE), params)
    build_tokenizer(None, vocab_size=261).save_pretrained(path)
    return path


def _run_from_hf(method: str, task: dict, hf: str, run_dir) -> None:
    """``method`` as ``jaxpost train`` runs it: lora.gin + ``init_from`` an HF directory; 2 steps (PPO: 1 update)."""
    import gin

    from jaxpost import config
    from jaxpost.recipes import run
    from online_helpers import lowercase_fraction

    bindings = [f"run.task = @{method}", f"{method}.model = @ModelConfig()", f"{method}.run_dir = '{run_dir}'",
                f"{method}.tokenizer = '{task['tokenizer']}'", f"{method}.init_from = '{hf}'",
                "make_optimizer.learning_rate = 1e-2", "make_optimizer.schedule = 'constant'", *LORA]
    if method in OFFLINE:
        bindings += [f"{method}.train_data = '{task[OFFLINE[method]]}'", f"{method}.seq_len = 48",
                     f"{method}.batch_size = 8", f"{method}.loop = @LoopConfig()", "LoopConfig.num_steps = 2",
                     "LoopConfig.progress = False"]
        if method == "distill":
            bindings.append(f"distill.teacher_from = '{hf}'")
    else:  # ppo: policy and value model (score head) both from the checkpoint, both with adapters
        assert method == "ppo", method
        bindings += [f"ppo.train_data = '{task['prompts']}'", "ppo.online = @OnlineConfig()",
                     "ppo.rollout = @RolloutConfig()", "ppo.ppo_epochs = 1", "OnlineConfig.num_rollouts = 1",
                     "OnlineConfig.prompts_per_rollout = 8",  # 8 rows: a multiple of the 8 test devices
                     "OnlineConfig.max_prompt_len = 32",
                     "RolloutConfig.max_new_tokens = 6", "RolloutConfig.group_size = 1"]
    config.parse(["configs/algorithms/lora.gin"], bindings, finalize=False)
    try:
        if method == "ppo":  # a reward with spread at random init, so every update has a gradient
            gin.bind_parameter("make_scorer.reward_functions", [lowercase_fraction])
        run()
    finally:
        gin.clear_config()


def _flat(tree) -> dict:
    import jax

    return {tuple(getattr(k, "key", getattr(k, "idx", k)) for k in p): np.asarray(x, np.float64)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_merged_is_base_plus_delta(hf_dir, run_dir, head: str = "lm") -> None:
    """``run_dir/final`` = the HF base + ``scale * A @ B`` from ``final_adapters`` on adapted kernels, the base
    bit for bit elsewhere (a head the run added aside), and the delta is not zero (the adapters trained)."""
    from jaxpost.models import load_hf

    _, _, base = load_hf(hf_dir)
    merged_config, _, merged = load_hf(run_dir / "final")
    lcfg, adapters = load_adapters(run_dir / "final_adapters")
    assert lcfg.rank == 4 and lcfg.scale == 2.0
    base, merged, adapters = _flat(base), _flat(merged), _flat(adapters)
    assert merged_config.head == head
    largest = 0.0
    for path, w in merged.items():
        if path[0] in ("score", "lm_head") and path[0] not in base:
            continue  # a head the method added (reward model's score): trained, not part of the base
        site = path[:-1]
        if (*site, "lora_a") in adapters:
            delta = lcfg.scale * adapters[(*site, "lora_a")] @ adapters[(*site, "lora_b")]
            np.testing.assert_allclose(w, base[path] + delta, rtol=0, atol=1e-6, err_msg=str(path))
            largest = max(largest, float(np.abs(delta).max()))
        else:  # not adapted: the base tensor, bit for bit
            assert np.array_equal(w, base[path]), path
    assert largest > 1e-4, f"the adapters did not train (largest |delta| = {largest})"


@pytest.mark.slow
@pytest.mark.parametrize("method", [*OFFLINE, "ppo"])  # grpo and online_dpo: test_lora_online_runs_...
def test_lora_from_hf_checkpoint_trains_only_adapters(method, task, hf_base, tmp_path):
    """lora.gin + init_from=<HF dir> runs for every method; the exported model is the base plus the LoRA delta."""
    run_dir = tmp_path / method
    _run_from_hf(method, task, str(hf_base), run_dir)
    assert_merged_is_base_plus_delta(hf_base, run_dir, "score" if method == "reward_model" else "lm")
