"""jaxpost side of the benchmark: the SFT or DPO train step through the public API, timed per step.

Runs in its own process (started by ``cpu_workload.py``): builds the model
with ``jaxpost.models.create`` (seed 0, the weights the torch systems load
from the ``save_hf`` export), the loss with ``make_sft_loss`` /
``make_dpo_loss`` (frozen reference params passed as ``frozen`` and run in
the same jit every step), AdamW from ``make_optimizer``, the generic step
from ``make_train_step`` compiled by ``compile_train_step`` (explicit
shardings, donated state).
"""

from __future__ import annotations

import time

import numpy as np

import workload as W


def model_config(gin_file: str, dtype: str, remat: str = "none", attention: str = "auto", **overrides):
    """``ModelConfig`` from a gin preset, with compute ``dtype``, ``remat``, ``attention`` (and any
    other ``ModelConfig`` field in ``overrides``) replaced."""
    import gin

    from jaxpost.models import ModelConfig

    gin.clear_config()
    gin.parse_config_file(gin_file)
    return ModelConfig().replace(dtype=dtype, remat=remat, attention=attention, **overrides)


def step_flops(config, task: str, shape: W.Shape, dpo_layout: str = "unpacked") -> float:
    """Model FLOPs of one step.

    SFT: ``flops_per_token(L) * B * L`` (forward + backward = 3 forwards).
    DPO: the policy trains on ``2B`` sequences (3 forwards' worth) and the
    reference runs one forward over the same ``2B`` sequences, so
    ``flops_per_token(L) * (1 + 1/3) * 2B * L``. With the shared-prompt
    layout the rows hold ``P + 2C`` tokens, not ``2 (P + C)``; counted as
    that many tokens at ``flops_per_token(L)``.
    """
    f = config.flops_per_token(shape.seq) * shape.batch
    if task == "sft":
        return f * shape.seq
    tokens = shape.prompt + 2 * shape.completion if dpo_layout == "shared" else 2 * shape.seq
    return f * tokens * (4.0 / 3.0)


def run(task: str, gin_file: str, shape: W.Shape, steps: int, warmup: int, dtype: str = "float32",
        chunk: int = 512, remat: str = "none", lr: float | None = None, attention: str = "auto",
        model_overrides: dict | None = None, profile_dir: str | None = None, dpo_layout: str = "shared",
        steps_per_call: int = 1) -> dict:
    """Train ``warmup + steps`` steps; returns timings (seconds), losses and throughput.

    ``first_step_s`` = trace + compile + first execution of the step;
    ``step_s`` = per-step wall times of the ``steps`` steps after warm-up,
    each ended by ``block_until_ready`` on the new state and metrics.
    With ``profile_dir`` the last 3 measured steps are traced there with
    ``jax.profiler`` (see ``gpu_profile.py``). ``dpo_layout``: ``"shared"``
    (the prompt run once for both completions, ``SHARED_PROMPT_KEYS``) or
    ``"unpacked"`` (``PREFERENCE_KEYS``, one row per sequence).
    ``steps_per_call = n``: the step is compiled as ``n`` optimizer steps in
    one call (``jaxpost.train.scan_steps``, the batch stacked ``n`` times);
    each call's time / ``n`` counts once per step it ran, ``warmup`` and
    ``steps`` are rounded up to whole calls, and ``first_step_s`` is the first
    call (compile + ``n`` steps).
    """
    import jax

    from jaxpost.algorithms import make_dpo_loss, make_sft_loss
    from jaxpost.models import create, logical_axes
    from jaxpost.sharding import Partitioner
    from jaxpost.train import (abstract_state, batch_shardings, compile_train_step, init_sharded_state,
                               make_optimizer, make_train_step, stack_batches, state_shardings)

    t_setup = time.perf_counter()
    config = model_config(gin_file, dtype, remat, attention, **(model_overrides or {}))
    partitioner = Partitioner(rules="fsdp")
    graphdef, params = create(config, seed=0, partitioner=partitioner)
    param_sh = partitioner.shardings(logical_axes(config), params)
    if task == "sft":
        batch = W.lm_batch(W.sft_ids(shape, config.vocab_size))
        loss_fn = make_sft_loss(graphdef, config, chunk_size=chunk)
        lr = 1e-4 if lr is None else lr
        frozen, frozen_sh = None, None
    else:
        pairs = W.dpo_ids(shape, config.vocab_size)
        batch = W.shared_dpo_batch(pairs) if dpo_layout == "shared" else W.dpo_batch(pairs)
        loss_fn = make_dpo_loss(graphdef, config, kind="sigmoid", beta=0.1, chunk_size=chunk)
        lr = 1e-6 if lr is None else lr
        # A separate copy: the policy's buffers are donated to the step and must not alias the reference.
        frozen = {"reference": jax.tree.map(lambda x: x.copy(), params)}
        frozen_sh = {"reference": param_sh}
    opt = make_optimizer("adamw", learning_rate=lr, schedule="constant", weight_decay=0.0, clip_norm=1.0)
    shardings = state_shardings(abstract_state(params, opt), param_sh, partitioner, opt)
    state = init_sharded_state(params, opt, shardings)
    del params
    b_sh = batch_shardings(batch, partitioner)
    batch = jax.device_put(batch, b_sh)
    n = steps_per_call
    call_batch = batch if n == 1 else stack_batches([batch] * n)
    step = compile_train_step(make_train_step(loss_fn, opt), shardings, b_sh, frozen_sh,
                              steps_per_call=n)
    jax.block_until_ready((state, call_batch, frozen))
    setup_s = time.perf_counter() - t_setup

    times, losses = [], []
    warmup_calls, calls = -(-warmup // n), -(-steps // n)
    for i in range(warmup_calls + calls):
        if profile_dir and i == warmup_calls + calls - max(1, 3 // n):
            jax.profiler.start_trace(profile_dir)
        t0 = time.perf_counter()
        state, metrics = step(state, call_batch, frozen)
        jax.block_until_ready((state, metrics))
        times += [(time.perf_counter() - t0) / n] * n
        losses += np.atleast_1d(np.asarray(metrics["loss"], np.float64)).tolist()
    if profile_dir:
        jax.profiler.stop_trace()
    warmup = warmup_calls * n
    t0 = time.perf_counter()
    temp = step.lower(state, call_batch, frozen).compile().memory_analysis()
    temp_mib = None if temp is None else temp.temp_size_in_bytes / 2**20
    print(f"xla temp {temp_mib} MiB (analysis {time.perf_counter() - t0:.1f} s)", flush=True)
    measured = times[warmup:]
    med = float(np.median(measured))
    dev = jax.devices()[0]
    return {
        "setup_s": setup_s, "first_step_s": times[0] * n, "step_s": measured, "median_step_s": med,
        "steps_per_call": n,
        "losses": losses, "flops_per_step": step_flops(config, task, shape, dpo_layout),
        "device_kind": dev.device_kind, "n_devices": jax.device_count(), "platform": dev.platform,
        "trained_tokens": W.trained_tokens(batch), "chunk": chunk, "remat": remat, "dtype": dtype,
        "attention": attention, "dpo_layout": dpo_layout if task == "dpo" else None, "xla_temp_mib": temp_mib,
    }
