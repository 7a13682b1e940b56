"""Would sampling the next rollout during the current update save time? (issue 20, optional item)

    python benchmarks/rollout_overlap.py --repeats 7

PipelineRL/AReaL-style systems overlap rollout ``r + 1`` (sampled from the
policy before update ``r``, one step off-policy) with update ``r``. This
script times one online cycle, a GRPO rollout and its updates, on the
sampler benchmark's model (``configs/models/bench.gin``'s shape: vocab
8192, hidden 256, 4 layers, fp32, seed-0 weights), three ways, in one
process, the three called in turn each round:

* ``sequential``: sample (16 prompts x 64 ids, ``--new`` tokens, temperature
  1), measure the rollout (``old_logp``, ``ref_logp``), then ``--updates``
  GRPO steps (AdamW) on its rows. What ``RolloutBatches`` does.
* ``dispatch_ahead``: the next rollout's sampling and measuring dispatched
  (jax's asynchronous dispatch) before the updates, from the same thread.
  This is the form that stays correct on several hosts, where every
  process must launch the same programs in the same order.
* ``thread``: the next rollout made in a second Python thread while the
  main thread runs the updates. One host only: two threads launching
  programs that hold collectives could launch them in different orders on
  different hosts and deadlock.

The sampled policy is a copy of the parameters (the updates donate theirs).
Before timing, each schedule makes one rollout from the same policy copy
and key, and the script checks that the overlapped ones equal the
sequential one (tokens and ``old_logp``).
Printed: the median time of each part and of each schedule, and each
schedule over ``sequential``, the median of the per-round ratios
("paired": a round's calls are seconds apart, so drift in the machine's
speed cancels).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

from sampler_throughput import PAD, add_model_args, model_config


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=128, help="max new tokens per completion")
    ap.add_argument("--updates", type=int, default=4, help="optimizer steps per rollout")
    add_model_args(ap)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default="", help="also write the report here")
    a = ap.parse_args(argv)

    import jax
    import numpy as np
    import optax

    from jaxpost.algorithms.online import make_grpo_loss, make_rollout_logprobs
    from jaxpost.generate.rollout import rollout_sequences
    from jaxpost.generate.sampler import Sampler, SamplingConfig
    from jaxpost.models import create
    from jaxpost.train.state import init_state
    from jaxpost.train.step import make_train_step

    config = model_config(a)
    graphdef, params = create(config, seed=0)
    reference = jax.tree.map(lambda x: x.copy(), params)
    prompts = np.random.default_rng(0).integers(3, a.vocab, size=(a.prompts, a.prompt_len)).astype(np.int32)
    mask = np.ones_like(prompts)
    sampler = Sampler(graphdef, config, SamplingConfig(max_new_tokens=a.new, temperature=1.0, pad_token_id=PAD))
    measure = jax.jit(make_rollout_logprobs(graphdef, config))
    optimizer = optax.adamw(1e-5)
    step = jax.jit(make_train_step(make_grpo_loss(graphdef, config), optimizer), donate_argnums=0)
    advantages = np.random.default_rng(1).normal(size=(a.prompts,)).astype(np.float32)
    holder = {"state": init_state(params, optimizer)}

    def dispatch_rollout(policy, rng):
        """Sampling dispatched now; the host-side rest (rows, measuring) when ``finish()`` is called."""
        out = sampler(policy, prompts, mask, rng)

        def finish():
            tokens, cmask = jax.device_get((out.tokens, out.completion_mask))
            rows = {k: jax.numpy.asarray(v) for k, v in rollout_sequences(prompts, mask, tokens, cmask, PAD).items()}
            rows.update(measure(policy, reference, None, rows))
            rows["advantages"] = jax.numpy.asarray(advantages)
            return rows
        return finish

    def rollout(policy, rng):
        return dispatch_rollout(policy, rng)()

    def update(rows):
        for _ in range(a.updates):
            holder["state"], _ = step(holder["state"], rows, None)
        jax.block_until_ready(holder["state"].params)

    def policy_copy():
        return jax.tree.map(lambda x: x.copy(), holder["state"].params)

    rows = rollout(policy_copy(), jax.random.key(0))
    update(rows)  # compiles

    # Each schedule: one rollout's updates and the next rollout (from ``policy``), which it returns.
    def sequential(policy, key):
        update(rows)
        return jax.block_until_ready(rollout(policy, key))

    def dispatch_ahead(policy, key):
        finish = dispatch_rollout(policy, key)
        update(rows)
        return jax.block_until_ready(finish())

    def thread(policy, key):
        box = {}
        t = threading.Thread(target=lambda: box.update(rows=jax.block_until_ready(rollout(policy, key))))
        t.start()
        update(rows)
        t.join()
        return box["rows"]

    def timed(fn, *args):
        t = time.perf_counter()
        fn(*args)
        return time.perf_counter() - t

    schedules = {"sequential": sequential, "dispatch_ahead": dispatch_ahead, "thread": thread}
    # Overlapped or not, a rollout from the same policy and key is the same rollout (this also warms every path).
    policy, key = policy_copy(), jax.random.key(a.repeats + 1)
    made = {name: jax.device_get(fn(policy, key)) for name, fn in schedules.items()}
    for name in ("dispatch_ahead", "thread"):
        for k in ("tokens", "old_logp"):
            if not np.array_equal(made["sequential"][k], made[name][k]):
                raise AssertionError(f"{name}: the overlapped rollout's {k} differ from the rollout made alone")
    times = {name: [] for name in ("sample", "update", *schedules)}
    for i in range(1, a.repeats + 1):
        times["sample"].append(timed(lambda k: jax.block_until_ready(rollout(policy_copy(), k)), jax.random.key(i)))
        times["update"].append(timed(update, rows))
        for name, fn in schedules.items():
            times[name].append(timed(fn, policy_copy(), jax.random.key(i)))
    med = {k: statistics.median(v) for k, v in times.items()}
    report = {"args": vars(a), "device": jax.devices()[0].device_kind, "times_s": times,
              "median_s": med,
              "paired_over_sequential": {name: statistics.median(
                  t / s for t, s in zip(times[name], times["sequential"])) for name in schedules}}
    print(f"rollout (sample + measure) {med['sample'] * 1e3:.1f} ms, {a.updates} updates {med['update'] * 1e3:.1f} ms"
          f" ({med['sample'] / (med['sample'] + med['update']):.0%} of a cycle sampling)")
    for name in schedules:
        print(f"  {name:15} {med[name] * 1e3:8.1f} ms   paired over sequential "
              f"{report['paired_over_sequential'][name]:.3f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
