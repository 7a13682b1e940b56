"""Where a jaxpost SFT step's time goes on the benchmark workload: pieces compiled and timed alone.

    python benchmarks/profile_steps.py [--model configs/models/bench.gin] [--chunk 512] [--steps 5]

Pieces (each its own jit, median of ``--steps`` runs after one compile run):
``body_fwd`` (transformer to final hidden), ``head_fwd`` (chunked
``token_logprobs`` on fixed hidden states), ``loss_fwd`` (both),
``loss_fwd_bwd`` (``value_and_grad`` of the SFT loss), ``adamw`` (the
optimizer update alone) and ``step`` (the compiled train step). ``step``
minus ``loss_fwd_bwd`` minus ``adamw`` is what the step adds around them
(norms, metrics). Run it pinned (``taskset -c 0,1``) for numbers comparable
to ``cpu_workload.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import numpy as np  # noqa: E402

import workload as W  # noqa: E402


def timeit(fn, *args, steps: int) -> float:
    """Median wall seconds of ``fn(*args)`` (blocked) over ``steps`` runs after one warm-up run."""
    import jax

    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(os.path.dirname(HERE), "configs/models/bench.gin"))
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()

    import jax
    import optax

    from jaxpost.algorithms import make_sft_loss
    from jaxpost.models import create, forward, token_logprobs
    from jaxpost.train import init_state, make_optimizer, make_train_step
    from run_jaxpost import model_config

    config = model_config(a.model, "float32")
    graphdef, params = create(config, seed=0)
    batch = jax.device_put(W.lm_batch(W.sft_ids(W.SFT_SHAPE, config.vocab_size)))
    loss_fn = make_sft_loss(graphdef, config, chunk_size=a.chunk)
    opt = make_optimizer("adamw", learning_rate=1e-4, schedule="constant", clip_norm=1.0)
    body = jax.jit(lambda p, b: forward(graphdef, p, b["tokens"], b["positions"], b["segment_ids"])[0])
    hidden = body(params, batch)
    head = jax.jit(lambda p, h, t: token_logprobs(p, config, h, t, chunk_size=a.chunk))
    grads = jax.jit(jax.grad(lambda p, b: loss_fn(p, b)[0]))(params, batch)
    state = init_state(params, opt)
    update = jax.jit(lambda g, s, p: optax.apply_updates(p, opt.update(g, s, p)[0]))
    step = jax.jit(make_train_step(loss_fn, opt))
    pieces = {
        "body_fwd": (body, params, batch),
        "head_fwd": (head, params, hidden, batch["targets"]),
        "loss_fwd": (jax.jit(lambda p, b: loss_fn(p, b)[0]), params, batch),
        "loss_fwd_bwd": (jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b)[0])), params, batch),
        "adamw": (update, grads, state.opt_state, params),
        "step": (lambda s, b: step(s, b, None), state, batch),
    }
    print(f"chunk {a.chunk}, batch {W.SFT_SHAPE.batch} x {W.SFT_SHAPE.seq}, devices {jax.devices()}")
    for name, (fn, *args) in pieces.items():
        print(f"{name:14s} {timeit(fn, *args, steps=a.steps):8.4f} s", flush=True)


if __name__ == "__main__":
    main()
