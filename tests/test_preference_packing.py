"""Packed preference batches: same pairs, same losses, metrics and gradients as one pair per row."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpost import models
from preference_helpers import dpo_losses, value_and_grad
from jaxpost.algorithms import make_dpo_loss, make_reward_loss
from jaxpost.losses import pair_last_index, pair_sums
from jaxpost.data import build_tokenizer, make_preference_pipeline
from jaxpost.models.config import ModelConfig
from jaxpost.train.batches import on_mesh
from jaxpost.algorithms.reference import reference_logps
from jaxpost.sharding import Partitioner, make_mesh
from jaxpost.train import init_state, make_train_step

SEQ_LEN = 32
N_PAIRS = 8
TINY = dict(vocab_size=264, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(None, vocab_size=261)


def _rows(n=N_PAIRS, seed=0, ref=False, margin=False):
    rng = np.random.default_rng(seed)
    letters = "abcdefghij"
    rows = []
    for i in range(n):
        word = lambda k: "".join(rng.choice(list(letters), size=k))
        row = {"prompt": word(int(rng.integers(1, 4))), "chosen": word(int(rng.integers(1, 6))),
               "rejected": word(int(rng.integers(1, 6)))}
        if ref:
            row.update(ref_chosen_logps=float(rng.normal(-8, 2)), ref_rejected_logps=float(rng.normal(-8, 2)))
        if margin:
            row["margin"] = float(rng.uniform(0, 1))
        rows.append(row)
    return rows


def _one_batch(rows, tok, *, packing, batch_size):
    it = make_preference_pipeline(rows, tok, SEQ_LEN, batch_size, packing=packing, num_epochs=1, shuffle=False)
    batch = next(it)
    with pytest.raises(StopIteration):  # the whole data set is in this one batch
        next(it)
    return {k: jnp.asarray(v) for k, v in batch.items()}


def _both(rows, tok):
    unpacked = _one_batch(rows, tok, packing=False, batch_size=len(rows))
    packed = _one_batch(rows, tok, packing=True, batch_size=2)
    return unpacked, packed


def _model(head="lm", seed=0):
    config = ModelConfig(**TINY, head=head)
    graphdef, params = models.create(config, seed=seed)
    return config, graphdef, params


def _assert_same(unpacked_out, packed_out, n_pairs):
    """``(loss, metrics, grads)`` of the unpacked and the packed batch agree (fp32, 1e-5)."""
    (lu, mu, gu), (lp, mp, gp) = unpacked_out, packed_out
    np.testing.assert_allclose(float(lp), float(lu), rtol=1e-5, atol=1e-6)
    for k in mu:
        np.testing.assert_allclose(float(mp[k]), float(mu[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    assert float(mp["loss_tokens"]) == n_pairs  # real pairs, for gradient accumulation
    flat_u, flat_p = jax.tree.leaves(gu), jax.tree.leaves(gp)
    for a, b in zip(flat_u, flat_p):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
    assert sum(float(jnp.abs(g).sum()) for g in flat_u) > 0  # the comparison is not between zeros



def test_layout_keeps_every_pair_once_and_saves_rows(tok):
    rows = _rows(n=40, seed=1)
    packed_rows = real_pairs = 0
    seen = []
    it = make_preference_pipeline(rows, tok, SEQ_LEN, 4, packing=True, num_epochs=1, shuffle=False)
    for batch in it:
        packed_rows += int((batch["pair_mask"].sum(axis=1) > 0).sum())
        seen += batch["row_index"][batch["pair_mask"] > 0].tolist()
        real_pairs += int(batch["pair_mask"].sum())
        # Each sequence is its own segment: ids 2k-1 (chosen) and 2k (rejected) of slot k.
        pid, side, seg = batch["pair_ids"], batch["pair_sides"], batch["segment_ids"]
        np.testing.assert_array_equal(seg, np.where(pid > 0, 2 * pid - (side == 1), 0))
        starts = np.diff(seg, axis=1, prepend=-1) != 0
        assert (batch["positions"][starts & (seg > 0)] == 0).all()
        assert (batch["loss_mask"][seg == 0] == 0).all()
    assert sorted(seen) == list(range(len(rows)))  # every pair exactly once
    assert it.stats.counts()["examples"] == len(rows)
    # One pair per row unpacked: 40 rows; short pairs share rows when packed.
    assert packed_rows <= len(rows) // 3, packed_rows


def test_packed_pipeline_resumes_exactly(tok):
    rows = _rows(n=30, seed=6, margin=True)
    make = lambda: make_preference_pipeline(rows, tok, SEQ_LEN, 2, packing=True, seed=3, num_epochs=2)
    it = make()
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = list(it)
    resumed = make()
    resumed.set_state(state)
    got = list(resumed)
    assert len(got) == len(expected) > 0
    for g, want in zip(got, expected):
        assert g.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(g[k], want[k], err_msg=k)
    # Counted once each, resumed or not (prefetch replays are recognised).
    assert resumed.stats.counts()["examples"] == it.stats.counts()["examples"] == 2 * len(rows)


def test_overlong_pairs_are_counted_as_unpacked(tok):
    rows = _rows(n=6, seed=2) + [{"prompt": "a", "chosen": "b" * 80, "rejected": "c"}]
    counts = []
    for packing in (False, True):
        it = make_preference_pipeline(rows, tok, SEQ_LEN, 2, packing=packing, num_epochs=1, shuffle=False,
                                      overlong="drop")
        pairs = sum(int(np.asarray(b["pair_mask"]).sum()) for b in it)
        counts.append((pairs, it.stats.counts()["dropped_too_long"]))
    assert counts[0] == counts[1] == (6, 1)


def test_pair_sums_and_last_index():
    pair_ids = jnp.array([[1, 1, 1, 2, 2, 2, 0]])
    sides = jnp.array([[1, 1, 2, 1, 2, 2, 0]])
    v = jnp.array([[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]])
    c, r = pair_sums(v, pair_ids, sides, 3)
    np.testing.assert_array_equal(c, [[3.0, 8.0, 0.0]])
    np.testing.assert_array_equal(r, [[4.0, 48.0, 0.0]])
    ic, ir = pair_last_index(pair_ids, sides, 3)
    np.testing.assert_array_equal(ic, [[1, 3, 0]])
    np.testing.assert_array_equal(ir, [[2, 5, 0]])


def test_dpo_losses_packed_equal_unpacked_with_both_references(tok):
    """Sigmoid+RPO reads precomputed reference log-probs, IPO and a sum with AOT run the frozen reference, SimPO
    needs none."""
    config, graphdef, params = _model()
    _, _, ref = _model(seed=1)
    rows = _rows(seed=3)
    # The reference cache pass gives the same per-row values over packed and unpacked batches.
    caches = []
    for packing in (False, True):
        it = make_preference_pipeline(rows, tok, SEQ_LEN, 2, packing=packing, num_epochs=1, shuffle=False)
        idx, c, r = reference_logps(graphdef, config, ref, it)
        order = np.argsort(idx)
        caches.append((idx[order], c[order], r[order]))
    for idx, _, _ in caches:
        np.testing.assert_array_equal(idx, np.arange(len(rows)))
    np.testing.assert_allclose(caches[1][1], caches[0][1], rtol=1e-5)
    np.testing.assert_allclose(caches[1][2], caches[0][2], rtol=1e-5)
    for row, c, r in zip(rows, caches[0][1], caches[0][2]):
        row.update(ref_chosen_logps=float(c), ref_rejected_logps=float(r))
    unpacked, packed = _both(rows, tok)
    assert packed["tokens"].shape[0] < unpacked["chosen_tokens"].shape[0]
    assert packed["ref_chosen_logps"].shape == packed["pair_mask"].shape
    all_losses = dpo_losses(graphdef, config)
    got_u, got_p = all_losses(params, unpacked, ref), all_losses(params, packed, ref)
    for kind in got_u:
        _assert_same(got_u[kind], got_p[kind], len(rows))


def test_reward_loss_packed_equals_unpacked(tok):
    config, graphdef, params = _model(head="score")
    unpacked, packed = _both(_rows(seed=4, margin=True), tok)
    assert packed["margin"].shape == packed["pair_mask"].shape
    run = jax.jit(value_and_grad(make_reward_loss(graphdef, config, center_coef=0.01)))
    _assert_same(run(params, unpacked), run(params, packed), N_PAIRS)


def test_sharded_accumulated_packed_step_equals_one_device(tok):
    """8 devices with 2 micro-batches of packed rows give the one-device, one-batch update."""
    config, graphdef, params = _model()
    rows = _rows(n=24, seed=5)
    it = make_preference_pipeline(rows, tok, SEQ_LEN, 8, packing=True, num_epochs=1, shuffle=False,
                                  packing_bins=8)
    batch = next(it)
    assert batch["tokens"].shape[0] == 8
    # Micro-batches (strided rows) hold different numbers of pairs, so an
    # unweighted mean of micro-batch losses would differ from the batch mean.
    per_row = batch["pair_mask"].sum(axis=1)
    assert per_row[0::2].sum() != per_row[1::2].sum()
    loss_fn = make_dpo_loss(graphdef, config, kind="simpo", beta=2.0)
    opt = optax.sgd(1.0)  # new params = params - grads: comparing params compares gradients
    state = init_state(params, opt)
    one = jax.jit(make_train_step(loss_fn, opt))(state, batch)
    part = Partitioner(make_mesh(fsdp=-1), "fsdp")
    assert part.mesh.size == 8
    with part.activate():
        sharded = jax.jit(make_train_step(loss_fn, opt, grad_accum_steps=2))(state, on_mesh(batch, part))
    np.testing.assert_allclose(float(sharded[1]["loss"]), float(one[1]["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(sharded[1]["grad_norm"]), float(one[1]["grad_norm"]), rtol=1e-4)
    for a, b in zip(jax.tree.leaves(one[0].params), jax.tree.leaves(sharded[0].params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
