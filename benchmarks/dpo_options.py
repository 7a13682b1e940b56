"""What a DPO option costs: one loss-and-gradient call with the option against plain DPO, same batch.

    python benchmarks/dpo_options.py --repeats 9

On the sampler benchmark's model (``configs/models/bench.gin``'s shape:
vocab 8192, hidden 256, 4 layers, fp32, seed-0 policy, seed-1 frozen
reference), ``--pairs`` random pairs of ``--seq-len`` tokens whose first
quarter is the prompt; chosen replies fill the rest, rejected ones two
thirds of it. Each variant's ``make_dpo_loss`` (sigmoid, beta 0.1)
is compiled once; each round calls every variant once, in turn:

* ``plain``: DPO;
* ``wpo``: ``use_weighting=True`` (WPO's weights: ``log sum_v p_v^2`` per
  token, one more pass over the vocabulary in the LM head's chunks);
* ``ld``: ``ld_alpha=0.5`` (LD-DPO's weighted sums).

Printed: each variant's median time, and its time over ``plain`` as the
median of the per-round ratios ("paired": a round's calls are under a
second apart, so drift in the machine's speed cancels).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

from sampler_throughput import add_model_args, model_config

VARIANTS = {"plain": {}, "wpo": {"use_weighting": True}, "ld": {"ld_alpha": 0.5}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    add_model_args(ap)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--json", default="", help="also write the report here")
    a = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxpost.algorithms import make_dpo_loss
    from jaxpost.models import create

    config = model_config(a)
    graphdef, params = create(config, seed=0)
    _, reference = create(config, seed=1)
    rng = np.random.default_rng(0)
    B, L = a.pairs, a.seq_len
    batch = {"pair_mask": jnp.ones((B,), jnp.float32)}
    for side in ("chosen", "rejected"):
        batch[f"{side}_tokens"] = jnp.asarray(rng.integers(0, a.vocab, (B, L)), jnp.int32)
        batch[f"{side}_targets"] = jnp.asarray(rng.integers(0, a.vocab, (B, L)), jnp.int32)
        batch[f"{side}_positions"] = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        batch[f"{side}_segment_ids"] = jnp.ones((B, L), jnp.int32)
        end = L if side == "chosen" else 3 * L // 4  # replies of different lengths: LD-DPO has tokens to weigh
        response = (jnp.arange(L) >= L // 4) & (jnp.arange(L) < end)
        batch[f"{side}_loss_mask"] = jnp.broadcast_to(response, (B, L)).astype(jnp.float32)
    frozen = {"reference": reference}
    calls = {name: jax.jit(jax.value_and_grad(make_dpo_loss(graphdef, config, **options), has_aux=True))
             for name, options in VARIANTS.items()}
    losses = {name: float(jax.block_until_ready(f(params, batch, frozen))[0][0]) for name, f in calls.items()}
    times = {name: [] for name in calls}
    for _ in range(a.repeats):
        for name, f in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(f(params, batch, frozen))
            times[name].append(time.perf_counter() - start)
    report = {"args": vars(a), "loss": losses, "times_s": times,
              "median_s": {k: statistics.median(v) for k, v in times.items()},
              "paired_over_plain": {k: statistics.median(t / p for t, p in zip(v, times["plain"], strict=True))
                                    for k, v in times.items()}}
    print(f"{B} pairs x {L} tokens, vocab {a.vocab}, hidden {a.hidden}, {a.layers} layers, fp32, "
          f"loss and gradient, median of {a.repeats}")
    for name in calls:
        print(f"{name:6s} {report['median_s'][name] * 1e3:8.1f} ms   {report['paired_over_plain'][name]:.3f}x plain "
              f"(paired)   loss {losses[name]:.5f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
