"""Shared-prompt preference batches: same pairs, same losses, metrics and gradients as one pair per row."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost import models
from preference_helpers import dpo_losses, value_and_grad
from jaxpost.algorithms import SHARED_PROMPT_KEYS, make_dpo_loss, make_reward_loss
from jaxpost.algorithms.shared_prompt import shared_rows
from jaxpost.data import build_tokenizer, make_preference_pipeline
from jaxpost.models.config import ModelConfig
from jaxpost.algorithms.reference import reference_logps

SEQ_LEN = 32
TINY = dict(vocab_size=264, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(None, vocab_size=261)


def _rows(n=8, seed=0, margin=False):
    rng = np.random.default_rng(seed)
    word = lambda k: "".join(rng.choice(list("abcdefghij"), size=k))
    rows = [{"prompt": word(int(rng.integers(1, 9))), "chosen": word(int(rng.integers(1, 12))),
             "rejected": word(int(rng.integers(1, 12)))} for _ in range(n)]
    for row in rows if margin else ():
        row["margin"] = float(rng.uniform(0, 1))
    return rows


def _batch(rows, tok, shared):
    it = make_preference_pipeline(rows, tok, SEQ_LEN, len(rows), shared_prompt=shared, num_epochs=1,
                                  shuffle=False)
    return {k: jnp.asarray(v) for k, v in next(it).items()}



def _assert_same(a, b):
    (la, ma, ga), (lb, mb, gb) = a, b
    np.testing.assert_allclose(float(lb), float(la), rtol=1e-5, atol=1e-6)
    assert ma.keys() == mb.keys()
    for k in ma:
        np.testing.assert_allclose(float(mb[k]), float(ma[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-6)
    assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(ga)) > 0


def test_layout_left_pads_the_prompt_and_right_pads_each_reply(tok):
    rows = _rows(n=6, seed=1)
    b = _batch(rows, tok, shared=True)
    assert set(SHARED_PROMPT_KEYS) <= set(b)
    P, R = SEQ_LEN // 2, SEQ_LEN - SEQ_LEN // 2
    assert b["prompt_tokens"].shape == (6, P) and b["chosen_tokens"].shape == (6, R)
    unpacked = _batch(rows, tok, shared=False)
    for i in range(6):
        n_p = int(b["prompt_mask"][i].sum())
        assert (np.asarray(b["prompt_mask"][i, P - n_p:]) == 1).all()  # real tokens at the right end
        for side in ("chosen", "rejected"):
            n = int(b[f"{side}_mask"][i].sum())
            assert (np.asarray(b[f"{side}_mask"][i, :n]) == 1).all()
            # prompt + reply is the unpacked sequence; the loss weighs the same tokens.
            full = np.r_[b["prompt_tokens"][i, P - n_p:], b[f"{side}_tokens"][i, :n]]
            m = int(unpacked[f"{side}_segment_ids"][i].sum())
            np.testing.assert_array_equal(full, unpacked[f"{side}_tokens"][i, :m])
            assert float(b[f"{side}_loss_mask"][i].sum()) == float(unpacked[f"{side}_loss_mask"][i].sum())
    # The joint row: replies continue the prompt's positions; both start at the prompt's length.
    tokens, positions, segments, branches = shared_rows(b)
    assert tokens.shape == (6, P + 2 * R) and branches.prefix == P and branches.count == 2
    n_p = np.asarray(b["prompt_mask"].sum(1))
    np.testing.assert_array_equal(positions[:, P], n_p)
    np.testing.assert_array_equal(positions[:, P + R], n_p)
    np.testing.assert_array_equal(positions[:, P - 1], n_p - 1)


def test_long_replies_are_cut_and_counted(tok):
    rows = [{"prompt": "ab", "chosen": "c" * 40, "rejected": "d"}, {"prompt": "a", "chosen": "b", "rejected": "c"}]
    it = make_preference_pipeline(rows, tok, SEQ_LEN, 2, shared_prompt=True, num_epochs=1, shuffle=False)
    b = next(it)
    assert int(b["chosen_mask"][0].sum()) == SEQ_LEN - SEQ_LEN // 2
    assert it.stats.counts()["truncated"] == 1
    it = make_preference_pipeline(rows, tok, SEQ_LEN, 2, shared_prompt=True, num_epochs=1, shuffle=False,
                                  overlong="drop")
    assert int(next(it)["pair_mask"].sum()) == 1 and it.stats.counts()["dropped_too_long"] == 1
    with pytest.raises(ValueError, match="two layouts"):
        make_preference_pipeline(rows, tok, SEQ_LEN, 2, shared_prompt=True, packing=True)


def test_dpo_losses_shared_equal_unpacked_with_both_references(tok):
    config = ModelConfig(**TINY)
    graphdef, params = models.create(config, seed=0)
    _, ref = models.create(config, seed=1)
    rows = _rows(seed=3)
    # The reference cache pass reads the shared layout too.
    caches = []
    for shared in (False, True):
        it = make_preference_pipeline(rows, tok, SEQ_LEN, 4, shared_prompt=shared, num_epochs=1, shuffle=False)
        caches.append(reference_logps(graphdef, config, ref, it))
    np.testing.assert_array_equal(caches[0][0], caches[1][0])
    np.testing.assert_allclose(caches[1][1], caches[0][1], rtol=1e-5)
    np.testing.assert_allclose(caches[1][2], caches[0][2], rtol=1e-5)
    for row, c, r in zip(rows, caches[0][1], caches[0][2]):
        row.update(ref_chosen_logps=float(c), ref_rejected_logps=float(r))
    unpacked, shared = _batch(rows, tok, False), _batch(rows, tok, True)
    assert shared["prompt_tokens"].shape[1] + 2 * shared["chosen_tokens"].shape[1] < 2 * SEQ_LEN
    all_losses = dpo_losses(graphdef, config)
    got_u, got_s = all_losses(params, unpacked, ref), all_losses(params, shared, ref)
    for kind in got_u:
        _assert_same(got_u[kind], got_s[kind])


def test_reward_loss_shared_equals_unpacked(tok):
    config = ModelConfig(**TINY, head="score")
    graphdef, params = models.create(config, seed=0)
    rows = _rows(seed=4, margin=True)
    run = jax.jit(value_and_grad(make_reward_loss(graphdef, config, center_coef=0.01)))
    _assert_same(run(params, _batch(rows, tok, False)), run(params, _batch(rows, tok, True)))


def test_shared_batch_shape_errors_name_the_arrays(tok):
    config = ModelConfig(**TINY)
    graphdef, params = models.create(config, seed=0)
    b = dict(_batch(_rows(n=2), tok, True))
    b["rejected_mask"] = b["rejected_mask"][:, :-1]
    with pytest.raises(ValueError, match="rejected_mask"):
        make_dpo_loss(graphdef, config, kind="simpo")(params, b)
    del b["rejected_mask"]
    with pytest.raises(KeyError, match="rejected_mask"):
        make_dpo_loss(graphdef, config, kind="simpo")(params, b)
