"""The sampler's scheduling: cache grown in phases, finished rows compacted away, per-prompt budgets.

None of it may change a result: the same completions (tokens, log-probs,
masks) come out with and without compaction, with one cache or a growing
one, on 1 device and on 8 (data-parallel, fsdp, tensor-parallel meshes).
"""

import os
import sys

import jax
import numpy as np
import pytest

from jaxpost.generate import sampler as sampler_module
from jaxpost.generate.sampler import (
    Sampler,
    SamplingConfig,
    cache_capacities,
    left_pad,
    sample,
)
from jaxpost.models import ModelConfig, create
from jaxpost.sharding import Partitioner, make_mesh

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2)
PROMPTS = [[5, 9, 11], [7, 3, 8, 21, 30, 2, 14], [40, 41, 42, 43, 44], [9, 8, 7, 6], [1], [12, 13]]
# Per-prompt budgets: mixed completion lengths, deterministic whatever is drawn.
BUDGETS = np.array([3, 24, 11, 1, 17, 6], np.int32)
N = 24
STOP = 17  # a stop token too: some rows stop before their budget (sampling at temperature 1)


@pytest.fixture(scope="module")
def model():
    graphdef, params = create(CONFIG, seed=1)
    params = jax.tree.map(lambda x: x * 20.0 if x.ndim == 2 else x, params)  # peaked distributions
    return graphdef, params


def sampling(**kw):
    base = dict(max_new_tokens=N, temperature=1.0, top_k=20, stop_token_ids=(STOP,), pad_token_id=63, group_size=2,
                cache_block=8)
    return SamplingConfig(**{**base, **kw})


def host(out):
    return jax.tree.map(np.asarray, jax.device_get(out))


def assert_same(a, b, atol=3e-5):
    """Same draws; log-probs to float32 rounding, which the x20 weights amplify between programs that attend
    over different cache sizes (up to 1.2e-5 seen)."""
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.completion_mask, b.completion_mask)
    np.testing.assert_array_equal(a.lengths, b.lengths)
    np.testing.assert_array_equal(a.finished, b.finished)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=atol, rtol=0)
    np.testing.assert_allclose(a.processed_logprobs, b.processed_logprobs, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def reference(model):
    """One cache of P + N slots, no compaction: the plain while loop."""
    graphdef, params = model
    tokens, mask = left_pad(PROMPTS)
    return host(sample(graphdef, params, CONFIG, tokens, mask, jax.random.key(4), sampling(cache_block=0),
                       max_new_tokens=BUDGETS))


@pytest.fixture(scope="module")
def penalised(model):
    """The plain while loop with a repetition penalty: each row's context ``[b, V]`` in the loop's state."""
    graphdef, params = model
    tokens, mask = left_pad(PROMPTS)
    return host(sample(graphdef, params, CONFIG, tokens, mask, jax.random.key(4),
                       sampling(cache_block=0, repetition_penalty=3.0), max_new_tokens=BUDGETS))


def test_cache_capacities():
    assert cache_capacities(7, 24, 8) == [8, 16, 24, 31]
    assert cache_capacities(64, 256, 64) == [128, 192, 256, 320]
    assert cache_capacities(64, 128, 64) == [128, 192]
    assert cache_capacities(5, 3, 8) == [8]
    assert cache_capacities(64, 256, 0) == [320]


def test_budgets_and_stops_give_mixed_lengths(reference):
    out = reference
    G = 2
    lengths = out.lengths.reshape(-1, G)
    assert (lengths <= BUDGETS[:, None]).all()
    stopped = out.finished.reshape(-1, G)
    # A row that did not hit the stop token ran to its budget; one that did ends on it.
    np.testing.assert_array_equal(lengths[~stopped], np.broadcast_to(BUDGETS[:, None], lengths.shape)[~stopped])
    for r in np.flatnonzero(out.finished):
        assert out.tokens[r, out.lengths[r] - 1] == STOP
    assert stopped.any() and (~stopped).any() and len(set(out.lengths.tolist())) >= 5
    for r in range(len(out.lengths)):
        np.testing.assert_array_equal(out.completion_mask[r], (np.arange(N) < out.lengths[r]).astype(np.float32))
        np.testing.assert_array_equal(out.tokens[r, out.lengths[r]:], 63)
        np.testing.assert_array_equal(out.logprobs[r, out.lengths[r]:], 0.0)


def test_growing_cache_and_compaction_change_nothing(model, reference):
    graphdef, params = model
    tokens, mask = left_pad(PROMPTS)
    rng = jax.random.key(4)
    grown = host(sample(graphdef, params, CONFIG, tokens, mask, rng, sampling(), max_new_tokens=BUDGETS))
    assert_same(grown, reference)
    for block in (0, 8):
        for compact in (False, True):
            smp = Sampler(graphdef, CONFIG, sampling(cache_block=block), compact=compact)
            out = host(smp(params, tokens, mask, rng, max_new_tokens=BUDGETS))
            assert_same(out, reference)
            if compact:
                batches = [b for b, _ in smp.phases]
                assert batches[0] == 16 and batches[-1] < 4 and batches == sorted(batches, reverse=True)
                caps = [c for _, c in smp.phases]
                assert caps == sorted(caps) and (len(set(caps)) > 1) == (block > 0)


def test_compaction_carries_each_rows_repetition_context(model, reference, penalised):
    """Compacted and regrouped rows keep the ids they have seen: the same completions as the plain loop."""
    graphdef, params = model
    tokens, mask = left_pad(PROMPTS)
    smp = Sampler(graphdef, CONFIG, sampling(repetition_penalty=3.0), compact=True)
    assert_same(host(smp(params, tokens, mask, jax.random.key(4), max_new_tokens=BUDGETS)), penalised)
    assert len(smp.phases) > 2
    assert (penalised.tokens != reference.tokens).any()  # the penalty is on


def test_greedy_rows_alone_equal_rows_in_a_batch(model):
    """A row's completion does not depend on which rows share its batch or when they are compacted away."""
    graphdef, params = model
    smp = Sampler(graphdef, CONFIG, sampling(temperature=0.0, group_size=1), compact=True)
    together = host(smp.sample_ids(params, PROMPTS, jax.random.key(0), max_new_tokens=BUDGETS))
    for i in (1, 4):
        alone = host(smp.sample_ids(params, [PROMPTS[i]], jax.random.key(0), max_new_tokens=BUDGETS[i]))
        assert_same(alone, together[i:i + 1])


def test_compiled_programs_are_bounded_and_cached(model):
    graphdef, params = model
    smp = Sampler(graphdef, CONFIG, sampling(), min_length_bucket=8, compact=True)
    rng = np.random.default_rng(0)
    calls = []
    for _ in range(4):
        prompts = [list(rng.integers(3, 60, size=rng.integers(1, 8))) for _ in range(6)]
        calls.append((prompts, rng.integers(1, N + 1, size=6)))
    before = sampler_module.compiled_programs()
    for k, (prompts, budgets) in enumerate(calls):
        out = smp.sample_ids(params, prompts, jax.random.key(k), max_new_tokens=budgets)
        assert out.tokens.shape == (12, N)
    first = sampler_module.compiled_programs() - before
    # Prompt bucket 8, batch bucket 8 x group 2 = 16 rows: one prefill; one decode program per
    # (batch, cache) pair met -- batches 16, 12, 8, 6, 4, 3, 2, 1 by caches 16, 24, 32: at most 24;
    # one regrouping program per transition met and one finishing program per final pair. The
    # number depends on which pairs the lengths visit, never on the number of calls.
    assert smp.compiled_shapes == {(8, 8)}
    assert first <= 1 + 24 + 24 + 24, first
    for k, (prompts, budgets) in enumerate(calls):  # the same calls again: nothing new is compiled
        smp.sample_ids(params, prompts, jax.random.key(k), max_new_tokens=budgets)
    assert sampler_module.compiled_programs() - before == first


def test_a_new_sampler_over_an_equal_model_reuses_the_compiled_programs(model):
    """Programs are keyed by the model's structure, not by the GraphDef object (hashed once per Sampler)."""
    _, params = model
    tokens, mask = left_pad(PROMPTS)
    run = lambda graphdef, compact: Sampler(graphdef, CONFIG, sampling(), compact=compact)(
        params, tokens, mask, jax.random.key(2), max_new_tokens=BUDGETS)
    first = {compact: host(run(model[0], compact)) for compact in (False, True)}
    before = sampler_module.compiled_programs()
    graphdef, _ = create(CONFIG, seed=5)  # another object, the same structure
    assert graphdef is not model[0] and graphdef == model[0]
    for compact in (False, True):
        assert_same(host(run(graphdef, compact)), first[compact])
    assert sampler_module.compiled_programs() == before


def test_budget_errors(model):
    graphdef, params = model
    tokens, mask = left_pad(PROMPTS)
    with pytest.raises(ValueError, match=r"max_new_tokens per prompt must be in \[1, 24\]"):
        sample(graphdef, params, CONFIG, tokens, mask, jax.random.key(0), sampling(), max_new_tokens=BUDGETS + 1)
    with pytest.raises(ValueError, match=r"max_new_tokens per prompt must be in \[1, 24\]"):
        Sampler(graphdef, CONFIG, sampling())(params, tokens, mask, jax.random.key(0), max_new_tokens=0)
    with pytest.raises(ValueError, match="cache_block must be >= 0"):
        SamplingConfig(cache_block=-1)


MESHES = {
    "data_parallel": (dict(data=8, fsdp=1), "data_parallel"),
    "fsdp": (dict(fsdp=8), "fsdp"),
    "fsdp_tp": (dict(data=2, fsdp=2, tensor=2), "fsdp_tp"),
}


@pytest.mark.parametrize("mesh", sorted(MESHES))
def test_sharded_scheduling_equals_one_device(model, reference, penalised, mesh):
    graphdef, _ = model
    shape, rules = MESHES[mesh]
    part = Partitioner(make_mesh(**shape), rules)
    _, params = create(CONFIG, seed=1, partitioner=part)
    params = jax.tree.map(lambda x: x * 20.0 if x.ndim == 2 else x, params)
    tokens, mask = left_pad(PROMPTS)
    smp = Sampler(graphdef, CONFIG, sampling(), partitioner=part, compact=True)
    out = smp(params, tokens, mask, jax.random.key(4), max_new_tokens=BUDGETS)
    assert isinstance(out.tokens, jax.Array) and out.tokens.shape == (12, N)
    shards = 8 if mesh != "fsdp_tp" else 4
    assert all(b % shards == 0 for b, _ in smp.phases) and smp.phases[-1][0] < smp.phases[0][0]
    assert_same(host(out), reference)
    if mesh == "fsdp_tp":  # each row's repetition context beside logits sharded over the vocabulary
        smp = Sampler(graphdef, CONFIG, sampling(repetition_penalty=3.0), partitioner=part, compact=True)
        assert_same(host(smp(params, tokens, mask, jax.random.key(4), max_new_tokens=BUDGETS)), penalised)


def test_benchmark_script_runs_tiny():
    """benchmarks/sampler_throughput.py end to end on a tiny model (its harness, not its speed)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import sampler_throughput

    report = sampler_throughput.main(["--vocab", "96", "--hidden", "32", "--intermediate", "64", "--layers", "2",
                                      "--prompts", "4", "--prompt-len", "6", "--new", "6", "--min-len", "2",
                                      "--max-len", "9", "--repeats", "2", "--pause", "0"])
    mixed = report["workloads"]["mixed"]
    assert mixed["real_tokens"] == int(sampler_throughput.workloads(
        sampler_throughput.argparse.Namespace(seed=0, vocab=96, prompts=4, prompt_len=6, new=6, min_len=2,
                                              max_len=9))[1]["mixed"].sum())
    for name in ("equal", "mixed"):
        assert report["workloads"][name]["ratio"] > 0
        assert report["workloads"][name]["greedy_agreement"] > 0.5
    # Paired: round r's mixed call against round r's equal call (2 rounds: the mean of the two ratios).
    eq, mx = report["workloads"]["equal"], mixed["systems"]["jaxpost"]
    te, tm = eq["systems"]["jaxpost"]["times_s"], mx["times_s"]
    per_round = [m / (mixed["real_tokens"] * e / eq["real_tokens"]) for m, e in zip(tm, te)]
    assert len(per_round) == 2 and mx["paired_vs_ideal"] == pytest.approx(sum(per_round) / 2)


def test_decode_bound_benchmark_runs_tiny():
    """benchmarks/decode_bound.py end to end on a tiny model: its byte count is the model's own kernels, its ratios paired."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import decode_bound

    from jaxpost.models import create

    argv = ["--vocab", "96", "--hidden", "32", "--intermediate", "64", "--layers", "2", "--prompts", "4",
            "--prompt-len", "6", "--short", "3", "--long", "7", "--slots", "13", "--steps", "4", "--read-mb", "4",
            "--stream-mb", "1", "--peak-n", "64", "--repeats", "3"]
    report = decode_bound.main(argv)
    # Every kernel a decode step multiplies by (all but the embedding table and the norms' scales), counted from
    # the model's own parameters; and the keys and values: 2 layers x 2 (k, v) x 4 rows x 2 heads x 8 dims x 13 slots.
    _, params = create(decode_bound.model_config(decode_bound.argparse.Namespace(**report["args"])), seed=0)
    kernels = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(params)
                  if jax.tree_util.keystr(path).endswith("['kernel']"))
    assert report["bytes_per_step"] == {"weights": 4 * kernels, "cache": 4 * 2 * 2 * 4 * 2 * 8 * 13}
    # 2 flops per row per kernel weight; per layer, scores and weighted values: 2 x 2 x 4 rows x 4 heads x 8 dims x 13.
    assert report["flops_per_step"] == 2 * 4 * kernels + 2 * (2 * 2 * 4 * 4 * 8 * 13)
    rounds = report["rounds"]
    assert all(len(v) == 3 for v in rounds.values())
    # A difference of two short calls' times (it may come out negative on a tiny model); the rest are rates.
    assert all(np.isfinite(rounds["step_s"])) and all(min(v) > 0 for k, v in rounds.items() if k != "step_s")
    per_round = sorted(s / p for s, p in zip(rounds["step_s"], rounds["products_s"]))
    assert report["paired_step_over_products"] == pytest.approx(per_round[1])
    assert set(report["streamed_gbs"]) == {"qkv", "out", "gate_up", "down", "lm_head"}
    assert all(r["xla"] > 0 and r["openblas"] > 0 for r in report["streamed_gbs"].values())
