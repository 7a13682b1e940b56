"""Rollout throughput: jaxpost's sampler against transformers' ``generate``, same weights, prompts and lengths.

    python benchmarks/sampler_throughput.py                      # the issue-20 setting, 2 torch threads
    taskset -c 0,1 python benchmarks/sampler_throughput.py --repeats 5

A random Llama (``configs/models/bench.gin``'s shape: vocab 8192, hidden
256, 4 layers, fp32), seed-0 weights from ``jaxpost.models.create``
exported with ``save_hf`` and loaded by ``LlamaForCausalLM``; 16 prompts of
64 random ids; greedy decoding. Two workloads:

* ``equal``: every row generates ``--new`` (128) tokens.
* ``mixed``: row ``r`` generates ``L[r]`` tokens, ``L`` drawn uniformly
  from ``[--min-len, --max-len]`` (16..256, seed 0: 2193 tokens). jaxpost
  gets the lengths as per-prompt budgets (``Sampler(..)(..., max_new_tokens=L)``);
  transformers gets a logits processor that forces EOS at step ``L[r] - 1``,
  so its rows stop after the same number of tokens (the last one EOS).

Each workload runs once to warm up (jaxpost compiles; the compiled
programs are cached across calls), then ``--repeats`` rounds, each of
which calls every (workload, system) pair once. Printed, from the median
and from the best wall time (the best is the one least disturbed by other
processes on shared cores): tokens/s of each system, jaxpost /
transformers, and for ``mixed`` the wall time relative to the ideal (the
real tokens at the system's own ``equal`` rate); and "paired": the median
over rounds of the same ratios taken within each round, whose calls are
seconds apart, so that a shared machine's drift in speed cancels. Also
the fraction of greedy tokens on which the two systems agree (random
weights give near-uniform distributions, so a float-rounding tie flip
sends a row down another path; agreement is reported, not required).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

EOS, PAD = 2, 0


def model_config(a):
    from jaxpost.models import ModelConfig

    return ModelConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                       num_layers=a.layers, num_heads=a.heads, num_kv_heads=a.kv_heads, rope_theta=10000.0,
                       rms_norm_eps=1e-5, max_position_embeddings=2048, tie_embeddings=False,
                       scan_layers=a.scan_layers)


def add_model_args(ap) -> None:
    """The model's shape as options (defaults: ``configs/models/bench.gin``'s), read by :func:`model_config`."""
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--scan-layers", action="store_true", help="ModelConfig.scan_layers=True: layers under a scan")


def workloads(a):
    """``(prompt ids [B, P], {name: per-row lengths [B]})``; prompt ids avoid PAD and EOS."""
    import numpy as np

    rng = np.random.default_rng(a.seed)
    prompts = rng.integers(3, a.vocab, size=(a.prompts, a.prompt_len)).astype(np.int32)
    mixed = np.random.default_rng(a.seed).integers(a.min_len, a.max_len + 1, size=a.prompts).astype(np.int32)
    return prompts, {"equal": np.full((a.prompts,), a.new, np.int32), "mixed": mixed}


def jaxpost_runner(a, config, params, graphdef, prompts):
    import jax
    import numpy as np

    from jaxpost.generate.sampler import Sampler, SamplingConfig

    mask = np.ones_like(prompts)
    samplers = {}

    def run(lengths):
        N = int(lengths.max())
        if N not in samplers:
            s = SamplingConfig(max_new_tokens=N, temperature=0.0, pad_token_id=PAD, cache_block=a.cache_block,
                               fuse_projections=not a.no_fuse)
            samplers[N] = Sampler(graphdef, config, s, compact=not a.no_compact)
        out = samplers[N](params, prompts, mask, jax.random.key(0), max_new_tokens=lengths)
        tokens, lens = jax.device_get((out.tokens, out.lengths))
        assert (lens == lengths).all(), (lens, lengths)
        return tokens

    return run, samplers


def torch_runner(a, model_dir, prompts):
    import numpy as np
    import torch
    import transformers

    torch.set_num_threads(a.threads)
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    class ForceEos(transformers.LogitsProcessor):
        """Row ``r`` emits EOS as its token ``lengths[r] - 1``, any token before that."""

        def __init__(self, lengths, prompt_len):
            self.lengths, self.prompt_len = torch.as_tensor(lengths, dtype=torch.long), prompt_len

        def __call__(self, input_ids, scores):
            step = input_ids.shape[1] - self.prompt_len
            stop = self.lengths - 1 == step
            scores[stop] = torch.where(torch.arange(scores.shape[1]) == EOS, 0.0, -float("inf"))
            return scores

    ids = torch.as_tensor(prompts, dtype=torch.long)
    att = torch.ones_like(ids)

    def run(lengths):
        N = int(lengths.max())
        equal = bool((lengths == N).all())
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=att, do_sample=False, max_new_tokens=N,
                                 min_new_tokens=0, pad_token_id=PAD, eos_token_id=None if equal else EOS,
                                 logits_processor=None if equal else
                                 transformers.LogitsProcessorList([ForceEos(lengths, ids.shape[1])]))
        gen = out[:, ids.shape[1]:].numpy()
        gen = np.pad(gen, ((0, 0), (0, N - gen.shape[1])), constant_values=PAD)
        lens = (np.cumsum(gen == EOS, axis=1) == 0).sum(1) + 1 if not equal else lengths
        if not (np.minimum(lens, N) == lengths).all():  # an EOS argmax before the forced one
            print(f"[warn] transformers row lengths {lens.tolist()} differ from {lengths.tolist()}")
        return gen

    return run


def agreement(a_tokens, b_tokens, lengths) -> float:
    """Fraction of compared positions with equal tokens (the forced-EOS last token excluded)."""
    import numpy as np

    n = same = 0
    for r, L in enumerate(lengths):
        k = int(L) - (0 if (lengths == lengths.max()).all() else 1)
        n += k
        same += int((np.asarray(a_tokens[r, :k]) == np.asarray(b_tokens[r, :k])).sum())
    return same / max(n, 1)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=128, help="tokens per row of the equal-length workload")
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=256)
    add_model_args(ap)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-block", type=int, default=64, help="SamplingConfig.cache_block (0: one cache)")
    ap.add_argument("--no-compact", action="store_true", help="Sampler(compact=False): one program, no compaction")
    ap.add_argument("--no-fuse", action="store_true", help="SamplingConfig.fuse_projections=False")
    ap.add_argument("--pause", type=float, default=0.5, help="seconds of rest before each timed call")
    ap.add_argument("--systems", default="jaxpost,transformers")
    ap.add_argument("--workloads", default="equal,mixed")
    ap.add_argument("--json", default="", help="also write the report here")
    a = ap.parse_args(argv)

    import jax

    from jaxpost.generate import sampler as sampler_module
    from jaxpost.models import create, save_hf

    config = model_config(a)
    graphdef, params = create(config, seed=0)
    prompts, lengths = workloads(a)
    systems = a.systems.split(",")
    runners, samplers = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        if "transformers" in systems:
            save_hf(tmp, config, params, extra_config={"pad_token_id": PAD, "eos_token_id": EOS})
            runners["transformers"] = torch_runner(a, tmp, prompts)
        if "jaxpost" in systems:
            runners["jaxpost"], samplers = jaxpost_runner(a, config, params, graphdef, prompts)

        report = {"settings": vars(a), "device": jax.devices()[0].device_kind, "workloads": {}}
        print(f"{a.prompts} prompts x {a.prompt_len} tokens, vocab {a.vocab}, hidden {a.hidden}, {a.layers} layers, "
              f"fp32, torch threads {a.threads}, jax on {report['device']}, median of {a.repeats}; "
              f"layers {'scanned' if config.scanned else 'unrolled'}, fuse_projections={not a.no_fuse}, "
              f"compact={not a.no_compact}")
        names = a.workloads.split(",")
        times = {n: {s: [] for s in runners} for n in names}
        tokens = {n: {} for n in names}
        for name in names:
            for s, run in runners.items():  # warm-up (and compile)
                t = time.perf_counter()
                tokens[name][s] = run(lengths[name])
                report.setdefault("first_call_s", {}).setdefault(name, {})[s] = time.perf_counter() - t
        # Round-robin over every (workload, system) pair: the calls of one repeat are seconds apart, so the
        # per-repeat ratios below compare calls made under the same load (this machine's speed drifts by
        # 10-20% over a minute).
        for _ in range(a.repeats):
            for name in names:
                for s, run in runners.items():
                    # Each system's worker threads spin for a while after its call (OpenMP's wait policy,
                    # XLA's pool); a pause keeps them from taking the cores of the next system's timed call.
                    time.sleep(a.pause)
                    t = time.perf_counter()
                    run(lengths[name])
                    times[name][s].append(time.perf_counter() - t)
        for name in names:
            L, tokens_n, times_n = lengths[name], tokens[name], times[name]
            res = {"real_tokens": int(L.sum()), "systems": {}}
            for s in runners:
                med = statistics.median(times_n[s])
                res["systems"][s] = {"median_s": med, "best_s": min(times_n[s]), "times_s": times_n[s],
                                     "tokens_per_s": L.sum() / med, "best_tokens_per_s": L.sum() / min(times_n[s])}
            if len(tokens_n) == 2:
                res["greedy_agreement"] = agreement(tokens_n["jaxpost"], tokens_n["transformers"], L)
            report["workloads"][name] = res
        eq = report["workloads"].get("equal")
        for name, res in report["workloads"].items():
            for s, r in res["systems"].items():
                line = (f"{name:6s} {s:12s} median {r['median_s']:7.3f} s {r['tokens_per_s']:7.0f} tok/s | "
                        f"best {r['best_s']:7.3f} s {r['best_tokens_per_s']:7.0f} tok/s")
                if name != "equal" and eq is not None and s in eq["systems"]:
                    e = eq["systems"][s]
                    r["vs_ideal"] = r["median_s"] / (res["real_tokens"] / e["tokens_per_s"])
                    r["best_vs_ideal"] = r["best_s"] / (res["real_tokens"] / e["best_tokens_per_s"])
                    # Each repeat's call against the same repeat's equal-length call.
                    r["paired_vs_ideal"] = statistics.median(
                        t / (res["real_tokens"] * te / eq["real_tokens"]) for t, te in zip(r["times_s"], e["times_s"]))
                    line += (f" | {r['vs_ideal']:.2f}x the ideal (best: {r['best_vs_ideal']:.2f}x, "
                             f"paired: {r['paired_vs_ideal']:.2f}x)")
                print(line)
            if {"jaxpost", "transformers"} <= set(res["systems"]):
                j, t = res["systems"]["jaxpost"], res["systems"]["transformers"]
                res["ratio"] = j["tokens_per_s"] / t["tokens_per_s"]
                res["best_ratio"] = j["best_tokens_per_s"] / t["best_tokens_per_s"]
                res["paired_ratio"] = statistics.median(tt / tj for tt, tj in zip(t["times_s"], j["times_s"]))
                agree = res.get("greedy_agreement")
                print(f"{name:6s} jaxpost / transformers: {res['ratio']:.2f}x (medians), {res['best_ratio']:.2f}x (bests), "
                      f"{res['paired_ratio']:.2f}x (paired)"
                      + ("" if agree is None else f"   greedy tokens equal: {agree:.1%}"))
        if samplers:
            phases = {N: smp.phases for N, smp in samplers.items()}
            report["jaxpost_phases"] = {str(k): v for k, v in phases.items()}
            report["jaxpost_compiled_programs"] = sampler_module.compiled_programs()
            print(f"jaxpost decode phases (batch, cache slots) of the last call: {phases}; "
                  f"compiled programs: {report['jaxpost_compiled_programs']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1, default=float)
    return report


if __name__ == "__main__":
    main()
