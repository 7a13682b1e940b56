"""Sampler.start / Sampler.extend: continuing conversations from their KV cache equals re-prefilling them.

The reference for every turn is ``Sampler.__call__`` on each live row's whole
conversation so far (prompt, sampled tokens, new tokens) with the row's own
``row_ids``: the same tokens must come out (sampled at temperature 1, keys per
(row, step)) with the same log-probs, for rows that stop on a stop token or a
budget at different turns, rows that sit a turn out (budget 0) and rows whose
conversation ended. On 1 device, on a sharded mesh and with scanned layers.
"""

import jax
import numpy as np
import pytest

from jaxpost.generate import sampler as sampler_module
from jaxpost.generate.sampler import Sampler, SamplingConfig, continuation_capacities, left_pad
from jaxpost.models import ModelConfig, create
from jaxpost.sharding import Partitioner, make_mesh

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2)
N, STOP = 8, 17
PROMPTS = [[5, 9, 11], [7, 3, 8, 21, 30, 2, 14], [40, 41, 42, 43, 44], [9, 8, 7, 6], [1], [12, 13]]
# Per turn and row: the budget (0: the row sits the turn out) and the new tokens before the turn.
BUDGETS = [np.array([3, 8, 5, 1, 8, 6]), np.array([8, 0, 4, 8, 2, 0]), np.array([5, 8, 0, 3, 8, 0])]
NEW = [None, [[31, 32], [], [33, 34, 35, 36], [37], [38, 39, 40], []],
       [[41], [42, 43], [], [44, 45, 46], [47, 48], []]]  # row 5: its conversation ended after turn 1


def sampling(**kw):
    return SamplingConfig(**{"max_new_tokens": N, "temperature": 1.0, "stop_token_ids": (STOP,),
                             "cache_block": 8, **kw})


def peaked(params):
    return jax.tree.map(lambda x: x * 20.0 if x.ndim == 2 else x, params)  # context-dependent distributions


def converse(smp: Sampler, params, rng, turns: int = 3):
    """Runs the scripted conversation with start/extend; returns every turn's host outputs and the final state."""
    outs, state = [], None
    for t in range(turns):
        key = jax.random.fold_in(rng, t)
        if t == 0:
            tokens, mask = left_pad(PROMPTS)
            out, state = smp.start(params, tokens, mask, key, BUDGETS[0])
        else:
            tokens, mask = left_pad(NEW[t])
            out, state = smp.extend(params, state, tokens, mask, key, BUDGETS[t])
        outs.append(jax.device_get(out))
    return outs, state


def reference(smp: Sampler, params, rng, outs):
    """Each turn by ``__call__`` on the live rows' whole conversations (row ids kept); compares with ``outs``."""
    conv = [list(p) for p in PROMPTS]
    for t, out in enumerate(outs):
        if t:
            for b, new in enumerate(NEW[t]):
                conv[b] += new
        live = np.flatnonzero(BUDGETS[t] > 0)
        tokens, mask = left_pad([conv[b] for b in live])
        ref = jax.device_get(smp(params, tokens, mask, jax.random.fold_in(rng, t), BUDGETS[t][live], row_ids=live))
        np.testing.assert_array_equal(out.tokens[live], ref.tokens, err_msg=f"turn {t}")
        np.testing.assert_array_equal(out.completion_mask[live], ref.completion_mask)
        np.testing.assert_array_equal(out.finished[live], ref.finished)
        np.testing.assert_allclose(out.logprobs[live], ref.logprobs, atol=2e-5)
        np.testing.assert_allclose(out.processed_logprobs[live], ref.processed_logprobs, atol=2e-5)
        idle = BUDGETS[t] == 0
        assert (out.lengths[idle] == 0).all() and (out.completion_mask[idle] == 0).all()
        for b in live:
            conv[b] += out.tokens[b, :out.lengths[b]].tolist()
    return conv


def check_variety(outs):
    """The script is not vacuous: rows stop on the stop token and on their budget, at different turns."""
    finished = np.concatenate([o.finished for o in outs])
    assert finished.any() and not finished.all()
    assert len({int(n) for o in outs for n in o.lengths}) > 3


@pytest.fixture(scope="module")
def model():
    graphdef, params = create(CONFIG, seed=1)
    return graphdef, peaked(params)


@pytest.mark.parametrize("penalty", [1.0, 2.0], ids=["plain", "repetition_penalty"])
def test_continuation_equals_reprefill(model, penalty):
    """With a repetition penalty, a turn's context is the whole conversation, as a re-prefill's is."""
    graphdef, params = model
    smp = Sampler(graphdef, CONFIG, sampling(repetition_penalty=penalty))
    outs, state = converse(smp, params, jax.random.key(3))
    conv = reference(Sampler(graphdef, CONFIG, sampling(repetition_penalty=penalty)), params, jax.random.key(3), outs)
    check_variety(outs)
    # The carry's invariant: each row's cache holds its conversation but the last sampled token.
    carry = jax.device_get(state.carry)
    for b in range(len(PROMPTS)):
        assert carry.n_real[b] == len(conv[b]) - int(carry.has_last[b])
        assert carry.cache.segment_ids[b].sum() == carry.n_real[b]


def test_start_equals_call_with_groups_and_greedy(model):
    """``start`` is ``__call__`` plus a state (groups share the prompt's prefill); greedy continues greedily."""
    graphdef, params = model
    smp = Sampler(graphdef, CONFIG, sampling(temperature=0.0, group_size=2))
    tokens, mask = left_pad(PROMPTS[:4])
    out, state = smp.start(params, tokens, mask, jax.random.key(0))
    ref = smp(params, tokens, mask, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=1e-6)
    assert state.rows == 8
    new = [[31, 32]] * 8
    out2, _ = smp.extend(params, state, *left_pad(new), jax.random.key(1), 4)
    conv = [list(PROMPTS[b // 2]) + np.asarray(out.tokens)[b, :int(out.lengths[b])].tolist() + [31, 32]
            for b in range(8)]
    one = Sampler(graphdef, CONFIG, sampling(temperature=0.0, max_new_tokens=4))
    ref2 = one(params, *left_pad(conv), jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(out2.tokens)[:, :4], np.asarray(ref2.tokens))


def test_sharded_mesh_continuation_equals_one_device(model):
    graphdef, params1 = model
    part = Partitioner(make_mesh(data=2, fsdp=2, tensor=2), "fsdp_tp")
    _, params = create(CONFIG, seed=1, partitioner=part)
    params = peaked(params)
    # Two turns (a start and an extend with rows sitting out) keep the compiles of the sharded programs short.
    outs, state = converse(Sampler(graphdef, CONFIG, sampling(), partitioner=part), params, jax.random.key(5), 2)
    k = state.carry.cache.k[0]
    assert len(k.sharding.device_set) == 8 and not k.sharding.is_fully_replicated  # the cache stays sharded
    single, _ = converse(Sampler(graphdef, CONFIG, sampling()), params1, jax.random.key(5), 2)
    for o, s in zip(outs, single):
        np.testing.assert_array_equal(o.tokens, s.tokens)
        np.testing.assert_allclose(o.logprobs, s.logprobs, atol=2e-5)


def test_scanned_layers_continuation_equals_reprefill():
    scanned = CONFIG.replace(scan_layers=True)
    graphdef, params = create(scanned, seed=1)
    params = peaked(params)
    smp = Sampler(graphdef, scanned, sampling())
    outs, state = converse(smp, params, jax.random.key(7), 2)  # 2 turns: the scanned programs compile slowly
    assert not isinstance(state.carry.cache.k, tuple)  # the stacked layout
    reference(smp, params, jax.random.key(7), outs)


def random_conversation(smp: Sampler, params, seed: int, turns: int = 4) -> int:
    """A conversation of ``turns`` calls with random budgets (0 included) and new-token counts; its cache index."""
    r = np.random.default_rng(seed)
    _, state = smp.start(params, *left_pad(PROMPTS), jax.random.key(seed), r.integers(1, N + 1, len(PROMPTS)))
    for t in range(1, turns):
        new = [r.integers(1, 60, r.integers(1, 24)).tolist() for _ in PROMPTS]
        _, state = smp.extend(params, state, *left_pad(new), jax.random.key(100 * seed + t),
                              r.integers(0, N + 1, len(PROMPTS)))
    return state.index


def test_compiled_programs_stay_bounded_across_turns_and_conversations(model):
    """Conversations of other lengths reuse the programs: chunk lengths are bucketed and cache sizes come from a
    fixed ladder (exact sizes would compile new programs for about every call: 32 calls here)."""
    graphdef, params = model
    smp = Sampler(graphdef, CONFIG, sampling())
    before = sampler_module.compiled_programs()
    indices = [random_conversation(smp, params, seed) for seed in range(4)]
    warm = sampler_module.compiled_programs()
    indices += [random_conversation(smp, params, seed) for seed in range(4, 8)]
    assert len(set(indices)) > 4  # the conversations did fill their caches differently
    assert sampler_module.compiled_programs() - before <= 20
    assert sampler_module.compiled_programs() - warm <= 2


def test_contract_errors(model):
    graphdef, params = model
    smp = Sampler(graphdef, CONFIG, sampling())
    _, state = smp.start(params, *left_pad(PROMPTS), jax.random.key(0), 2)
    with pytest.raises(ValueError, match="not left-padded"):
        smp.extend(params, state, np.ones((6, 2), np.int32), np.array([[1, 0]] * 6), jax.random.key(1))
    with pytest.raises(ValueError, match=r"must both be \[6, C\]"):
        smp.extend(params, state, np.ones((5, 2), np.int32), np.ones((5, 2), np.int32), jax.random.key(1))
    with pytest.raises(ValueError, match=r"must be in \[0, 8\]"):
        smp.extend(params, state, *left_pad([[1]] * 6), jax.random.key(1), 9)
    windowed = CONFIG.replace(sliding_window=4)
    with pytest.raises(ValueError, match="sliding_window"):
        Sampler(graphdef, windowed, sampling()).start(params, *left_pad(PROMPTS), jax.random.key(0))


def test_continuation_capacities_are_ladder_values():
    assert continuation_capacities(0, 16, 8, 8) == [24]
    assert continuation_capacities(24, 40, 8, 8) == [48]
    assert continuation_capacities(0, 16, 30, 8) == [24, 32, 48]
    assert continuation_capacities(64, 16, 8, 8) == [64]  # never shrinks
    assert continuation_capacities(0, 20, 8, 0) == [32]
