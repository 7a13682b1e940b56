"""Tunix side of the benchmark: Tunix's SFT / DPO trainers on its Llama 3 model, timed per step.

Runs in its own process, under the Python of a separate virtualenv that has
``google-tunix`` (it cannot be installed beside jaxpost: its pins downgrade
transformers), started by ``cpu_workload.py --tunix-python PATH``. Only
numpy and ``workload.py`` are needed from this repository.

* Model: ``tunix.models.llama3`` with a ``ModelConfig`` read from the
  ``config.json`` of jaxpost's ``save_hf`` export, weights loaded by Tunix's
  own safetensors loader (``llama3.params.create_model_from_safe_tensors``).
* SFT: ``tunix.sft.peft_trainer.PeftTrainer`` (no LoRA, so every ``Param``
  trains) with its default loss (mean NLL of every next token).
* DPO: ``tunix.sft.dpo.dpo_trainer.DPOTrainer`` (sigmoid, beta 0.1), a
  second copy of the weights as the frozen reference model, which the
  trainer runs every step in ``_prepare_inputs``.

The trainer's ``train()`` loop dispatches steps asynchronously (up to two
in flight) and reports metrics one step late, so it gives no per-step wall
time. Each step here is instead what that loop runs per batch:
``_prepare_inputs`` (for DPO: the jitted reference forward, the causal mask
and positions), ``shard_input`` and the trainer's jitted train step from
``jit_train_and_eval_step`` (``nnx.jit``, optimizer donated), ended by
``block_until_ready`` on the loss and the updated parameters.

Tunix 0.1.7's Llama 3 attention calls ``apply_rope`` without the config's
``rope_theta`` (so it always uses 1e6); the runner binds the model's theta
(10000 here) so that every system computes the same function. The change
touches values only, not the amount of work.
"""

from __future__ import annotations

import functools
import json
import os
import time

import numpy as np

import workload as W


def model_config(model_dir: str):
    """Tunix ``llama3.ModelConfig`` of the HF ``config.json`` in ``model_dir``."""
    from tunix.models.llama3 import model as llama3

    with open(os.path.join(model_dir, "config.json")) as f:
        hf = json.load(f)
    heads = hf["num_attention_heads"]
    return llama3.ModelConfig(
        num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"], num_heads=heads, head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        num_kv_heads=hf["num_key_value_heads"], rope_theta=hf["rope_theta"], norm_eps=hf["rms_norm_eps"],
        weight_tying=hf.get("tie_word_embeddings", False))


def _bind_rope_theta(theta: float) -> None:
    """Make the model's RoPE use ``theta`` where Tunix's attention leaves it at its default."""
    from tunix.models.llama3 import model as llama3

    shipped = getattr(llama3.apply_rope, "__wrapped__", llama3.apply_rope)
    llama3.apply_rope = functools.wraps(shipped)(functools.partial(shipped, rope_theta=theta))


def _load(model_dir: str, config):
    import jax.numpy as jnp
    from tunix.models.llama3 import params

    return params.create_model_from_safe_tensors(model_dir, config, dtype=jnp.float32)


def run(task: str, model_dir: str, shape: W.Shape, steps: int, warmup: int, dtype: str = "float32") -> dict:
    """Train ``warmup + steps`` steps with Tunix's trainer; returns timings (seconds) and losses.

    ``first_step_s`` = the first step including trace + compile (for DPO
    also the reference forward's); ``setup_s`` = loading both models and
    building the trainer. AdamW (0.9, 0.999, 1e-8, no weight decay) after a
    global-norm clip at 1.0, constant lr (SFT 1e-4, DPO 1e-6).
    """
    if dtype != "float32":
        raise ValueError("Tunix's Llama 3 has no mixed-precision mode (bf16 would also store bf16 weights); "
                         "only --dtype float32 is compared")
    import jax
    import optax
    from flax import nnx
    from tunix.sft import peft_trainer, sharding_utils, utils

    t_setup = time.perf_counter()
    config = model_config(model_dir)
    _bind_rope_theta(config.rope_theta)
    model = _load(model_dir, config)
    lr = 1e-4 if task == "sft" else 1e-6
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0))
    common = dict(eval_every_n_steps=10**9, max_steps=warmup + steps)
    if task == "sft":
        trainer = peft_trainer.PeftTrainer(model, opt, peft_trainer.TrainingConfig(**common))

        def model_inputs(x):  # what Tunix's SFT examples feed the default loss
            valid = x.input_tokens != W.PAD_ID
            return {"input_tokens": x.input_tokens, "input_mask": x.input_mask,
                    "positions": utils.build_positions_from_mask(valid),
                    "attention_mask": utils.make_causal_attn_mask(valid)}

        trainer.with_gen_model_input_fn(model_inputs)
        ids = W.sft_ids(shape, config.vocab_size)
        batch = peft_trainer.TrainingInput(input_tokens=ids, input_mask=np.ones_like(ids))
    else:
        from tunix.sft.dpo import dpo_trainer

        reference = _load(model_dir, config)
        trainer = dpo_trainer.DPOTrainer(
            model, reference, opt,
            dpo_trainer.DPOTrainingConfig(algorithm="dpo", beta=0.1, label_smoothing=0.0, **common))
        pairs = W.dpo_ids(shape, config.vocab_size)
        ones = lambda a: np.ones_like(a)
        batch = dpo_trainer.TrainingInput(
            prompt_ids=pairs["prompt"], prompt_mask=ones(pairs["prompt"]), chosen_ids=pairs["chosen"],
            chosen_mask=ones(pairs["chosen"]), rejected_ids=pairs["rejected"], rejected_mask=ones(pairs["rejected"]))
    train_step, _ = trainer.jit_train_and_eval_step(cache_nnx_graph=True)  # as train() calls it
    setup_s = time.perf_counter() - t_setup

    times, losses = [], []
    for _ in range(warmup + steps):
        t0 = time.perf_counter()
        example = sharding_utils.shard_input(trainer._prepare_inputs(batch), trainer.config.data_sharding_axis)
        loss, _aux, grad_norm = train_step(example)
        jax.block_until_ready((loss, grad_norm, jax.tree.leaves(nnx.state(model, nnx.Param))))
        losses.append(float(loss))
        times.append(time.perf_counter() - t0)
    measured = times[warmup:]
    dev = jax.devices()[0]
    return {"setup_s": setup_s, "first_step_s": times[0], "step_s": measured,
            "median_step_s": float(np.median(measured)), "losses": losses, "device_kind": dev.device_kind,
            "platform": dev.platform, "n_devices": jax.device_count(), "jax": jax.__version__,
            "tunix": _version("google-tunix"), "dtype": dtype, "rope_theta": config.rope_theta}


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
