"""The KV-cache sampler against a full (non-cached) forward of the same model."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.generate import processing
from jaxpost.generate import sampler as sampler_module
from jaxpost.generate.sampler import Sampler, SamplingConfig, left_pad, sample
from jaxpost.models import ModelConfig, create, forward, logits, token_logprobs
from jaxpost.sharding import Partitioner, make_mesh

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2)
PROMPTS = [[5, 9, 11], [7, 3, 8, 21, 30, 2, 14], [40, 41, 42, 43, 44]]
N = 10


@pytest.fixture(scope="module")
def model():
    graphdef, params = create(CONFIG, seed=1)
    # The default init (std 0.02) gives near-uniform next-token distributions; larger
    # weights make them peaked and context-dependent, so argmax checks mean something.
    params = jax.tree.map(lambda x: x * 20.0 if x.ndim == 2 else x, params)
    return graphdef, params


@pytest.fixture(scope="module")
def greedy_run(model):
    graphdef, params = model
    tokens, mask = left_pad(PROMPTS)
    out = sample(graphdef, params, CONFIG, tokens, mask, jax.random.key(0),
                 SamplingConfig(max_new_tokens=N, temperature=0.0))
    return tokens, mask, jax.device_get(out)


def full_forward(graphdef, params, prompt_tokens, prompt_mask, completion):
    """Hidden states of prompt + completion in one uncached forward, with the sampler's conventions."""
    seq = np.concatenate([prompt_tokens, completion], axis=1)
    segs = np.concatenate([prompt_mask, np.ones_like(completion)], axis=1).astype(np.int32)
    pos = np.maximum(np.cumsum(segs, axis=1) - 1, 0).astype(np.int32)
    hidden, _ = jax.jit(forward, static_argnums=0)(graphdef, params, jnp.asarray(seq), jnp.asarray(pos),
                                                 jnp.asarray(segs))
    return seq, hidden


def test_greedy_is_argmax_of_full_forward(model, greedy_run):
    graphdef, params = model
    tokens, mask, out = greedy_run
    P = tokens.shape[1]
    _, hidden = full_forward(graphdef, params, tokens, mask, out.tokens)
    z = np.asarray(logits(params, CONFIG, hidden))  # [B, P + N, V]
    for b in range(len(PROMPTS)):
        for t in range(N):
            np.testing.assert_equal(out.tokens[b, t], np.argmax(z[b, P - 1 + t]), err_msg=f"row {b} step {t}")
    # The rows generate different things (the prompts matter, the test is not vacuous).
    assert len({tuple(r) for r in out.tokens.tolist()}) == len(PROMPTS)
    np.testing.assert_array_equal(out.completion_mask, 1.0)
    np.testing.assert_array_equal(out.lengths, N)
    assert not out.finished.any()
    np.testing.assert_array_equal(out.processed_logprobs, 0.0)  # greedy: a point mass


def test_sampled_logprobs_equal_training_forward(model):
    graphdef, params = model
    tokens, mask = left_pad(PROMPTS)
    s = SamplingConfig(max_new_tokens=N, temperature=0.7, top_k=12, top_p=0.9, min_p=0.02, stop_token_ids=(4, 17),
                       pad_token_id=0, group_size=2)
    out = jax.device_get(sample(graphdef, params, CONFIG, tokens, mask, jax.random.key(3), s))
    G = 2
    assert out.tokens.shape == (len(PROMPTS) * G, N)
    rep_tokens, rep_mask = np.repeat(tokens, G, 0), np.repeat(mask, G, 0)
    seq, hidden = full_forward(graphdef, params, rep_tokens, rep_mask, out.tokens)
    P = tokens.shape[1]
    targets = np.concatenate([seq[:, 1:], np.zeros_like(seq[:, :1])], axis=1)
    ref = np.asarray(token_logprobs(params, CONFIG, hidden, jnp.asarray(targets), chunk_size=8))
    ref = ref[:, P - 1:P - 1 + N]
    cm = out.completion_mask
    # float32: the decode step and the full forward sum the logits in different orders (differences up to
    # 1e-5 on log-probs of about -3, as in test_sampler_continuation).
    np.testing.assert_allclose(out.logprobs * cm, ref * cm, atol=2e-5, rtol=0)
    # Processed log-probs: the same tokens under temperature / top-k / top-p / min-p of the full-forward logits.
    z = np.asarray(logits(params, CONFIG, hidden))[:, P - 1:P - 1 + N]
    proc = np.asarray(jax.nn.log_softmax(processing.process_logits(jnp.asarray(z), 0.7, 12, 0.9, 0.02), axis=-1))
    proc_tok = np.take_along_axis(proc, out.tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(out.processed_logprobs * cm, np.where(cm > 0, proc_tok, 0.0), atol=2e-5, rtol=0)
    assert np.isfinite(out.processed_logprobs).all()
    # Samples of one prompt differ (sampling is on, each row has its own key).
    assert any((out.tokens[2 * b] != out.tokens[2 * b + 1]).any() for b in range(len(PROMPTS)))
    np.testing.assert_array_equal(out.logprobs[cm == 0], 0.0)


def test_stop_tokens_per_row(model, greedy_run):
    graphdef, params = model
    tokens, mask, free = greedy_run
    # Stop on row 0's 4th greedy token and on row 2's 2nd; row 1 may or may not hit either.
    stops = (int(free.tokens[0, 3]), int(free.tokens[2, 1]))
    pad = 63
    out = jax.device_get(sample(graphdef, params, CONFIG, tokens, mask, jax.random.key(0),
                                SamplingConfig(max_new_tokens=N, temperature=0.0, stop_token_ids=stops,
                                               pad_token_id=pad)))
    for b in range(len(PROMPTS)):
        hits = [t for t in range(N) if free.tokens[b, t] in stops]
        length = hits[0] + 1 if hits else N
        np.testing.assert_array_equal(out.tokens[b, :length], free.tokens[b, :length])
        np.testing.assert_array_equal(out.tokens[b, length:], pad)
        np.testing.assert_array_equal(out.completion_mask[b], (np.arange(N) < length).astype(np.float32))
        assert out.lengths[b] == length
        assert out.finished[b] == bool(hits)
        np.testing.assert_allclose(out.logprobs[b, :length], free.logprobs[b, :length], atol=1e-6)
        np.testing.assert_array_equal(out.logprobs[b, length:], 0.0)
    assert out.finished[0] and out.finished[2] and out.lengths[0] <= 4 and out.lengths[2] <= 2


def test_top_k_1_is_greedy(model, greedy_run):
    graphdef, params = model
    tokens, mask, free = greedy_run
    out = sample(graphdef, params, CONFIG, tokens, mask, jax.random.key(123),
                 SamplingConfig(max_new_tokens=N, temperature=1.3, top_k=1))
    np.testing.assert_array_equal(np.asarray(out.tokens), free.tokens)
    np.testing.assert_allclose(np.asarray(out.logprobs), free.logprobs, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.processed_logprobs), 0.0)  # log 1


def test_temperature_sampling_is_deterministic_and_batch_independent(model):
    graphdef, params = model
    s = SamplingConfig(max_new_tokens=6, temperature=1.0)
    sampler = Sampler(graphdef, CONFIG, s)
    a = sampler.sample_ids(params, PROMPTS, jax.random.key(7))
    b = sampler.sample_ids(params, PROMPTS, jax.random.key(7))
    c = sampler.sample_ids(params, PROMPTS, jax.random.key(8))
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()
    # Row 0 alone (batch bucket 1 instead of 4) draws the same tokens: keys are per row.
    alone = sampler.sample_ids(params, PROMPTS[:1], jax.random.key(7))
    np.testing.assert_array_equal(np.asarray(alone.tokens)[0], np.asarray(a.tokens)[0])
    np.testing.assert_allclose(np.asarray(alone.logprobs)[0], np.asarray(a.logprobs)[0], atol=1e-5)
    assert a.tokens.shape == (3, 6) and alone.tokens.shape == (1, 6)


def test_group_shares_prefill_and_equals_repeated_prompts(model):
    """group_size=G prefills each prompt once and repeats its cache; rows match prompts repeated by hand."""
    graphdef, params = model
    G = 3
    tokens, mask = left_pad(PROMPTS)
    grouped = sample(graphdef, params, CONFIG, tokens, mask, jax.random.key(3),
                     SamplingConfig(max_new_tokens=6, temperature=1.0, group_size=G))
    repeated = sample(graphdef, params, CONFIG, np.repeat(tokens, G, 0), np.repeat(mask, G, 0), jax.random.key(3),
                      SamplingConfig(max_new_tokens=6, temperature=1.0))
    np.testing.assert_array_equal(np.asarray(grouped.tokens), np.asarray(repeated.tokens))
    np.testing.assert_allclose(np.asarray(grouped.logprobs), np.asarray(repeated.logprobs), atol=1e-5)
    assert len({tuple(r) for r in np.asarray(grouped.tokens)[:G].tolist()}) > 1  # the group's samples differ
    # The prefill forward runs over the 3 prompts, not the 9 rows.
    hlo = jax.jit(lambda p: sample(graphdef, p, CONFIG, tokens, mask, jax.random.key(3),
                                   SamplingConfig(max_new_tokens=6, temperature=1.0, group_size=G))
                  ).lower(params).as_text()
    width = tokens.shape[1]
    assert f"tensor<3x{width}x" in hlo and f"tensor<9x{width}x" not in hlo


def test_bfloat16_cache_for_a_float32_model(model, greedy_run):
    """cache_dtype='bfloat16': the cache is stored in bf16 and greedy decoding barely moves."""
    graphdef, params = model
    tokens, mask, fp32 = greedy_run
    s = SamplingConfig(max_new_tokens=N, temperature=0.0, cache_dtype="bfloat16")
    hlo = jax.jit(lambda p: sample(graphdef, p, CONFIG, tokens, mask, jax.random.key(0), s)).lower(params).as_text()
    K, H = CONFIG.num_kv_heads, CONFIG.dim_per_head
    assert re.search(rf"x{K}x\d+x{H}xbf16>", hlo)  # the cache [B, Nkv, S, Hd] in bf16
    assert f"x{K}x{H}xf32>" in hlo  # keys/values [B, T, Nkv, Hd] computed in f32
    out = jax.device_get(sample(graphdef, params, CONFIG, tokens, mask, jax.random.key(0), s))
    same = np.asarray(out.tokens) == np.asarray(fp32.tokens)
    assert same[:, 0].all() and same.mean() > 0.8, same
    first = np.asarray(out.logprobs)[:, 0]
    np.testing.assert_allclose(first, np.asarray(fp32.logprobs)[:, 0], atol=0.05)
    with pytest.raises(ValueError, match="cache_dtype must be"):
        SamplingConfig(cache_dtype="int8")


def test_bounded_compilation(model, greedy_run):
    graphdef, params = model
    tokens, mask, free = greedy_run
    sampler = Sampler(graphdef, CONFIG, SamplingConfig(max_new_tokens=N, temperature=0.0), min_length_bucket=16)
    rng = np.random.default_rng(0)
    compiled = sampler_module.compiled_programs  # jax's own count of compiled signatures
    before = compiled()
    for n in (3, 5, 9, 16, 12, 17, 20, 31, 2, 25):
        prompts = [list(rng.integers(5, 60, size=n)), list(rng.integers(5, 60, size=max(1, n - 2))), [1, 2]]
        out = sampler.sample_ids(params, prompts, jax.random.key(0))
        assert out.tokens.shape == (3, N)
    assert sampler.compiled_shapes == {(4, 16), (4, 32)}
    # Per prompt bucket: a prefill, one decode phase (no row stops early, the cache of P + N slots
    # is below one cache_block), a finishing program.
    assert compiled() - before <= 6
    # Extra left padding (7 -> 16) and a padding row change nothing: same tokens as the exact shape.
    np.testing.assert_array_equal(np.asarray(sampler(params, tokens, mask, jax.random.key(0)).tokens), free.tokens)
    assert compiled() - before <= 6


@pytest.mark.parametrize("scan_layers", [False, True])
def test_decode_loop_copies_no_cache(scan_layers):
    """Each decode step writes its token's keys and values in place, at 1 row as at 3.

    At 1 row, XLA:CPU used to copy every layer's cache several times per
    step (a size-1 batch axis in the loop's carry and in the cache update).
    The compiled program is read for copies of any array with the cache's
    slot axis; there must be none.
    """
    import dataclasses

    from jaxpost.generate import decode
    from jaxpost.generate.decode import Static

    config = dataclasses.replace(CONFIG, scan_layers=scan_layers)
    graphdef, params = create(config, seed=1)
    s = SamplingConfig(max_new_tokens=N, temperature=0.0, cache_block=0)
    for rows in (1, 3):
        tokens, mask = left_pad(PROMPTS[:rows])
        slots = tokens.shape[1] + N  # cache_block 0: one cache of P + N slots
        budget, key_ids = np.full((rows,), N, np.int32), np.arange(rows, dtype=np.int32)
        hlo = decode.sample_jit.lower(Static(graphdef), params, tokens, mask, budget, key_ids, jax.random.key(0),
                                      config=config, sampling=s, partitioner=None).compile().as_text()
        copies = [line.strip() for line in hlo.splitlines() if " copy(" in line
                  and re.search(rf"\[[\d,]*\b{slots}\b[\d,]*\]", line.split(" copy(")[0])]
        assert not copies, (rows, copies)
        assert "dynamic-update-slice(" in hlo  # the loop writes its cache: the test reads the right text


@pytest.mark.slow
def test_sharded_sampling_matches_single_device(model):
    graphdef, _ = model
    part = Partitioner(make_mesh(data=2, fsdp=2, tensor=2), "fsdp_tp")
    _, sharded = create(CONFIG, seed=1, partitioner=part)
    sharded = jax.tree.map(lambda x: x * 20.0 if x.ndim == 2 else x, sharded)
    _, params = model
    prompts = PROMPTS + [[9, 8, 7, 6], [1]]
    s = SamplingConfig(max_new_tokens=5, temperature=0.9, top_p=0.95, group_size=2)
    local = Sampler(graphdef, CONFIG, s)(params, *left_pad(prompts), jax.random.key(5))
    dist = Sampler(graphdef, CONFIG, s, partitioner=part)(sharded, *left_pad(prompts), jax.random.key(5))
    assert dist.tokens.shape == (10, 5)
    np.testing.assert_array_equal(np.asarray(dist.tokens), np.asarray(local.tokens))
    np.testing.assert_allclose(np.asarray(dist.logprobs), np.asarray(local.logprobs), atol=1e-5)


def test_bad_prompts_raise(model):
    graphdef, params = model
    s = SamplingConfig(max_new_tokens=2)
    tokens, mask = left_pad(PROMPTS)
    right = mask[:, ::-1].copy()
    with pytest.raises(ValueError, match=r"rows \[0, 2\] are not left-padded"):
        sample(graphdef, params, CONFIG, tokens, right, jax.random.key(0), s)
    empty = mask.copy()
    empty[1] = 0
    with pytest.raises(ValueError, match=r"rows \[1\] have no real token"):
        sample(graphdef, params, CONFIG, tokens, empty, jax.random.key(0), s)
    with pytest.raises(ValueError, match=r"prompt_mask \(3, 6\)"):
        sample(graphdef, params, CONFIG, tokens, mask[:, 1:], jax.random.key(0), s)
    part = Partitioner(make_mesh(data=2, fsdp=2, tensor=2), "fsdp_tp")
    with pytest.raises(ValueError, match="3 rows does not divide over 4 batch shards"):
        sample(graphdef, params, CONFIG, tokens, mask, jax.random.key(0), s, part)
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SamplingConfig(temperature=-1.0)


def test_sampling_config_from_gin():
    import gin

    with gin.unlock_config():
        gin.parse_config("SamplingConfig.stop_token_ids = [2, 7]\nSamplingConfig.temperature = 0.0")
    try:
        s = SamplingConfig()
    finally:
        gin.clear_config()
    assert s.stop_token_ids == (2, 7) and s.temperature == 0.0
    hash(s)  # a jit static argument


# --- processing: hand-checkable numbers -------------------------------------------------------

# Probabilities in vocabulary order; sorted: 0.5 (id 3), 0.2 (id 0), 0.15 (id 4), 0.1 (id 1), 0.05 (id 2).
PROBS = np.array([0.2, 0.1, 0.05, 0.5, 0.15], np.float32)


@pytest.mark.parametrize("p, kept", [(0.3, {3}), (0.6, {3, 0}), (0.8, {3, 0, 4}), (0.9, {3, 0, 4, 1}),
                                     (0.97, {0, 1, 2, 3, 4}), (1.0, {0, 1, 2, 3, 4})])
def test_top_p_keeps_smallest_set_reaching_p(p, kept):
    out = np.asarray(processing.top_p_filter(jnp.log(jnp.asarray(PROBS))[None], p))[0]
    assert set(np.flatnonzero(np.isfinite(out)).tolist()) == kept
    np.testing.assert_allclose(out[np.isfinite(out)], np.log(PROBS)[np.isfinite(out)], rtol=1e-6)


@pytest.mark.parametrize("p, kept", [(0.0, {0, 1, 2, 3, 4}), (0.09, {0, 1, 2, 3, 4}), (0.25, {3, 0, 4}),
                                     (0.35, {3, 0}), (0.5, {3}), (1.0, {3})])
def test_min_p_keeps_tokens_at_least_p_times_the_top_ones_probability(p, kept):
    # The top probability is 0.5 (id 3): min_p 0.25 keeps q >= 0.125 (0.5, 0.2, 0.15), 0.35 keeps q >= 0.175.
    out = np.asarray(processing.min_p_filter(jnp.log(jnp.asarray(PROBS))[None], p))[0]
    assert set(np.flatnonzero(np.isfinite(out)).tolist()) == kept
    np.testing.assert_allclose(out[np.isfinite(out)], np.log(PROBS)[np.isfinite(out)], rtol=1e-6)


def test_processing_equals_transformers_logits_warpers():
    """temperature, top-k, top-p and min-p against transformers' own warpers, chained in generate's order."""
    import torch
    from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    z = np.random.default_rng(0).normal(0, 2.0, (64, 50)).astype(np.float32)
    for temperature, top_k, top_p, min_p in ((0.7, 12, 0.9, 0.05), (1.3, 0, 0.8, 0.0), (1.0, 0, 1.0, 0.2),
                                             (0.5, 20, 1.0, 0.01)):
        chain = [TemperatureLogitsWarper(temperature)]
        chain += [TopKLogitsWarper(top_k)] if top_k else []
        chain += [TopPLogitsWarper(top_p)] if top_p < 1 else []
        chain += [MinPLogitsWarper(min_p)] if min_p else []
        want = LogitsProcessorList(chain)(torch.zeros((64, 1), dtype=torch.long), torch.from_numpy(z)).numpy()
        got = np.asarray(processing.process_logits(jnp.asarray(z), temperature, top_k, top_p, min_p))
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want), err_msg=str((temperature, top_k, top_p,
                                                                                       min_p)))
        np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-6)
        assert 0 < np.isfinite(got).sum() < z.size or (top_k, top_p, min_p) == (0, 1.0, 0.0)


def test_repetition_penalty_by_hand_and_against_transformers():
    import torch
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    # Context ids 0, 1, 1 (id 4 sits under padding): penalty 2 halves the positive logit of id 0 and doubles
    # the negative one of id 1; unseen ids keep theirs.
    seen = processing.seen_tokens(jnp.asarray([[4, 0, 1, 1]]), jnp.asarray([[0, 1, 1, 1]]), 5)
    np.testing.assert_array_equal(np.asarray(seen)[0], [True, True, False, False, False])
    z = jnp.asarray([[2.0, -1.0, 0.5, 3.0, 0.0]])
    np.testing.assert_allclose(np.asarray(processing.penalize_repetitions(z, seen, 2.0))[0], [1.0, -2.0, 0.5, 3.0, 0.0])
    np.testing.assert_array_equal(np.asarray(processing.penalize_repetitions(z, seen, 1.0)), np.asarray(z))
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2.0, (16, 50)).astype(np.float32)
    ids = rng.integers(0, 50, (16, 12))
    seen = processing.seen_tokens(jnp.asarray(ids), jnp.ones(ids.shape, bool), 50)
    for penalty in (1.3, 0.7):
        want = RepetitionPenaltyLogitsProcessor(penalty)(torch.from_numpy(ids), torch.from_numpy(z.copy())).numpy()
        got = np.asarray(processing.penalize_repetitions(jnp.asarray(z), seen, penalty))
        np.testing.assert_allclose(got, want, rtol=1e-6)
        assert (got != z).sum() > 100


@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "sampled"])
def test_repetition_penalty_against_the_full_forward(model, greedy_run, temperature):
    """Each step penalises the row's prompt and its tokens so far, written out here from the full forward."""
    graphdef, params = model
    tokens, mask = left_pad(PROMPTS)
    G, penalty, P, V = 2, 1.8, tokens.shape[1], CONFIG.vocab_size
    s = SamplingConfig(max_new_tokens=N, temperature=temperature, top_k=12, repetition_penalty=penalty,
                       group_size=G)
    out = jax.device_get(sample(graphdef, params, CONFIG, tokens, mask, jax.random.key(5), s))
    rep_tokens, rep_mask = np.repeat(tokens, G, 0), np.repeat(mask, G, 0)
    seq, hidden = full_forward(graphdef, params, rep_tokens, rep_mask, out.tokens)
    z = np.asarray(logits(params, CONFIG, hidden))[:, P - 1:P - 1 + N].astype(np.float64)
    for b in range(len(PROMPTS) * G):
        context = set(rep_tokens[b][rep_mask[b] > 0].tolist())
        for t in range(N):
            zt = z[b, t].copy()
            seen = np.isin(np.arange(V), sorted(context))
            zt[seen] = np.where(zt[seen] > 0, zt[seen] / penalty, zt[seen] * penalty)
            tok = int(out.tokens[b, t])
            if temperature == 0:
                assert tok == np.argmax(zt), (b, t)
            else:
                q = np.asarray(jax.nn.log_softmax(processing.process_logits(jnp.asarray(zt, jnp.float32), 0.8, 12)))
                np.testing.assert_allclose(out.processed_logprobs[b, t], q[tok], atol=2e-5, err_msg=str((b, t)))
            context.add(tok)
    # logprobs stay those of the unpenalised model, the training forward's quantity.
    raw = np.take_along_axis(np.asarray(jax.nn.log_softmax(z, -1)), out.tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(out.logprobs, raw, atol=2e-5)
    if temperature == 0:  # the penalty changed the greedy completions
        assert (out.tokens[::G] != greedy_run[2].tokens).any()


def test_top_k_and_temperature_by_hand():
    z = jnp.asarray([[1.0, 4.0, 2.0, 3.0]])
    np.testing.assert_array_equal(np.isfinite(np.asarray(processing.top_k_filter(z, 2)))[0],
                                  [False, True, False, True])
    np.testing.assert_array_equal(np.asarray(processing.top_k_filter(z, 0)), np.asarray(z))
    # temperature 2 then top-k 3: [0.5, 2, 1, 1.5] with the smallest dropped.
    got = np.asarray(processing.process_logits(z, 2.0, 3, 1.0))[0]
    np.testing.assert_allclose(got, [-np.inf, 2.0, 1.0, 1.5])


def test_draws_follow_the_processed_distribution():
    # temperature 0.5 on log PROBS squares the probabilities: q = PROBS**2 / 0.325 =
    # [0.123, 0.031, 0.008, 0.769, 0.069]. top_p 0.9: ids 3, 0 hold 0.892 < 0.9, so id 4 is kept
    # too, and id 1 (0.961 above it) is not; draws follow q renormalised over {3, 0, 4}.
    z = jnp.tile(jnp.log(jnp.asarray(PROBS))[None], (4000, 1))
    keys = jax.random.split(jax.random.key(0), 4000)
    tok, lp = jax.jit(processing.choose_tokens, static_argnums=(2, 3, 4))(keys, z, 0.5, 0, 0.9)
    q = PROBS.astype(np.float64) ** 2
    q = np.where(np.isin(np.arange(5), [0, 3, 4]), q, 0.0)
    q /= q.sum()
    freq = np.bincount(np.asarray(tok), minlength=5) / 4000
    np.testing.assert_allclose(freq, q, atol=0.025)
    np.testing.assert_allclose(np.asarray(lp), np.log(q[np.asarray(tok)]), rtol=1e-5)


def test_inverse_cdf_index_by_hand():
    # Weights over 40 ids (blocks of 16, the last one padded): id 3 holds 1/4, id 17 1/8, id 18 zero,
    # id 20 1/2, id 39 (the last) 1/8. Cumulative: 0.25 through id 3, 0.375 through 17 (and 18), 0.875
    # through 20, 1.0 through 39: all exact in float32. The draw is the first id whose cumulative weight
    # exceeds u * total; ids of zero weight are never drawn.
    w = np.zeros(40, np.float32)
    w[[3, 17, 20, 39]] = [0.25, 0.125, 0.5, 0.125]
    cases = {0.0: 3, 0.2499: 3, 0.25: 17, 0.3: 17, 0.375: 20, 0.874: 20, 0.875: 39, 0.99999994: 39,
             1.0: 39}  # u = 1 (outside [0, 1)): u * total is the total; the last id of positive weight
    u = np.asarray(list(cases), np.float32)
    for scale in (1.0, 3.0):  # unnormalised weights draw the same ids
        got = np.asarray(processing.inverse_cdf_index(jnp.asarray(np.tile(w * scale, (len(u), 1))), jnp.asarray(u)))
        np.testing.assert_array_equal(got, list(cases.values()))
    # One id of positive weight: always that id, whatever u.
    one = np.zeros((3, 40), np.float32)
    one[:, 0] = 2.0
    np.testing.assert_array_equal(processing.inverse_cdf_index(jnp.asarray(one), jnp.asarray([0.0, 0.5, 1.0])),
                                  [0, 0, 0])


def test_choose_tokens_draws_follow_softmax_over_many_blocks():
    # 300 ids (blocks of 32): random logits, every third id filtered out (-inf). 40000 rows, one key each:
    # each id's frequency within 5 standard deviations of its softmax probability; filtered ids never drawn.
    rng = np.random.default_rng(0)
    z = rng.normal(size=300).astype(np.float32) * 2
    z[::3] = -np.inf
    p = np.exp(z - z[np.isfinite(z)].max())
    p /= p.sum()
    n = 40000
    keys = jax.random.split(jax.random.key(7), n)
    tok, lp = jax.jit(processing.choose_tokens, static_argnums=(2,))(keys, jnp.tile(jnp.asarray(z), (n, 1)), 1.0)
    freq = np.bincount(np.asarray(tok), minlength=300) / n
    assert freq[::3].sum() == 0
    assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-12)
    np.testing.assert_allclose(np.asarray(lp), np.log(p[np.asarray(tok)]), rtol=1e-5)
