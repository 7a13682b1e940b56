"""Overlap in online runs: the next rollout with the current update; scoring with the measuring forwards.

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

Second part (``--judge-ms``, 0 skips it): what ``Roller`` does within a
rollout. The measuring forwards (``old_logp``, ``ref_logp``) do not need
the scores, so ``Roller`` dispatches them before it decodes and scores the
completions on the host. A rollout of ``--prompts`` prompts x
``--group-size`` completions (a byte tokenizer: vocab 264, the model's
other sizes as above) is scored by a reward function that waits
``--judge-ms`` (a remote judge or a sandbox: time on the host, not on the
cores) and by a CPU-bound one that takes about as long. Each is timed as
``Roller`` runs it and with the measuring made to finish before scoring
starts (no overlap: the cost of the old order, which scored first),
alternately, and the paired ratio printed.
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


def paired(times, baseline_times) -> float:
    """The median over rounds of ``times[i] / baseline_times[i]`` (a round's calls are seconds apart)."""
    return statistics.median(t / b for t, b in zip(times, baseline_times, strict=True))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=128, help="max new tokens per completion")
    ap.add_argument("--updates", type=int, default=4, help="optimizer steps per rollout")
    add_model_args(ap)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--judge-ms", type=float, default=200.0, help="the slow reward's wait (0: skip the second part)")
    ap.add_argument("--group-size", type=int, default=4, help="completions per prompt in the second part")
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
              "paired_over_sequential": {name: paired(times[name], times["sequential"]) for name in schedules}}
    print(f"rollout (sample + measure) {med['sample'] * 1e3:.1f} ms, {a.updates} updates {med['update'] * 1e3:.1f} ms"
          f" ({med['sample'] / (med['sample'] + med['update']):.0%} of a cycle sampling)")
    for name in schedules:
        print(f"  {name:15} {med[name] * 1e3:8.1f} ms   paired over sequential "
              f"{report['paired_over_sequential'][name]:.3f}x")
    if a.judge_ms > 0:
        report["scoring"] = scoring_overlap(a)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


def scoring_overlap(a) -> dict:
    """``Roller``'s rollout with slow rewards, measuring dispatched before scoring, against measuring first."""
    import jax

    from jaxpost.data import build_tokenizer, make_prompt_pipeline
    from jaxpost.generate.rollout import Roller, RolloutConfig
    from jaxpost.generate.scorers import FunctionScorer
    from jaxpost.models import create
    from jaxpost.sharding import Partitioner

    tok = build_tokenizer(None)
    config = model_config(argparse.Namespace(**{**vars(a), "vocab": len(tok)}))
    graphdef, params = create(config, seed=0)
    wait = a.judge_ms / 1e3

    def judge(prompts, completions, **_):
        """A remote judge: the host waits, the cores are free."""
        time.sleep(wait)
        return [float(len(c) % 7) for c in completions]

    def busy(prompts, completions, **_):
        """A CPU-bound reward of about the same length (pure Python on the host)."""
        end = time.perf_counter() + wait
        while time.perf_counter() < end:
            sum(range(1000))
        return [float(len(c) % 7) for c in completions]

    rows = [{"prompt": f"question {i}: " + "x" * (i % 5)} for i in range(a.prompts)]
    batch = next(make_prompt_pipeline(rows, tok, a.prompt_len, a.prompts, 0, num_epochs=None))
    part = Partitioner()
    rollout = RolloutConfig(max_new_tokens=a.new, group_size=a.group_size, stop_token_ids=())
    out = {}
    for name, fn in (("judge", judge), ("busy", busy)):
        roller = Roller(graphdef, config, tok, part, FunctionScorer(fn), rollout)
        measure_first = Roller(graphdef, config, tok, part, FunctionScorer(fn), rollout)
        measure = measure_first._measure
        measure_first._measure = lambda *args, m=measure: jax.block_until_ready(m(*args))  # no overlap
        runs = {"roller": roller, "measure_first": measure_first}
        with part.activate():
            for r in runs.values():
                r(params, params, None, batch, jax.random.key(0))  # compiles
            times = {k: [] for k in runs}
            score_times = []
            for i in range(a.repeats):
                for k, r in runs.items():
                    t = time.perf_counter()
                    got = r(params, params, None, batch, jax.random.key(i))
                    jax.block_until_ready(got.batch)
                    times[k].append(time.perf_counter() - t)
                score_times.append(got.metrics["time/score_s"])
            # Measuring alone: the most the overlap can hide.
            probe, alone = {k: got.batch[k] for k in got.host}, []
            for _ in range(a.repeats):
                t = time.perf_counter()
                jax.block_until_ready(measure(params, params, None, probe))
                alone.append(time.perf_counter() - t)
            measure_s = statistics.median(alone)
        ratio = paired(times["roller"], times["measure_first"])
        out[name] = {"times_s": times, "measure_s": measure_s, "score_s": statistics.median(score_times),
                     "paired_roller_over_measure_first": ratio}
        print(f"scoring overlap, {name} reward ({a.judge_ms:.0f} ms): rollout {statistics.median(times['roller']) * 1e3:.1f}"
              f" ms against {statistics.median(times['measure_first']) * 1e3:.1f} ms measuring first (paired "
              f"{ratio:.3f}x); measuring alone {measure_s * 1e3:.1f} ms")
    return out


if __name__ == "__main__":
    main()
