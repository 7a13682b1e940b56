"""Distillation wiring: model-aware losses against full-logit references, vocab checks, teacher cache."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost import models
from jaxpost.algorithms import make_sft_loss
from jaxpost.algorithms.distill import make_cached_distill_loss, make_distill_loss
from jaxpost.data import build_tokenizer, make_lm_pipeline
from jaxpost.errors import UserError
from jaxpost.models.config import ModelConfig
from jaxpost.models.heads import logits as full_logits
from jaxpost.train.fit import LoopConfig
from jaxpost.generate.rollout import batch_prompts, rollout_sequences
from jaxpost.recipes.distill import distill
from jaxpost.algorithms.teacher_cache import TeacherCache, build_teacher_cache, make_cache_pipeline

STUDENT = ModelConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1)
TEACHER = ModelConfig(vocab_size=264, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4, num_kv_heads=2)
ROWS = [{"prompt": f"reverse: {w}", "completion": w[::-1]} for w in
        ("abc", "hgfe", "cab", "ddea", "bh", "gaceb", "ffa", "hab", "cc", "dba")]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(None, vocab_size=261)


@pytest.fixture(scope="module")
def batch(tok):
    b = next(make_lm_pipeline(ROWS, tok, seq_len=32, batch_size=4, packing=False, shuffle=False))
    return {k: jnp.asarray(v) for k, v in b.items()}


def _full(graphdef, config, params, batch):
    @jax.jit
    def run(params, tokens, positions, segment_ids):
        h, _ = models.forward(graphdef, params, tokens, positions, segment_ids)
        return full_logits(params, config, h)
    return np.asarray(run(params, batch["tokens"], batch["positions"], batch["segment_ids"]), np.float64)


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_identical_student_and_teacher_give_zero_forward_kl_and_alpha0_is_sft(batch):
    graphdef, params = models.create(STUDENT, seed=0)
    loss_fn = jax.jit(make_distill_loss(graphdef, STUDENT, graphdef, STUDENT, chunk_size=7))
    loss, m = loss_fn(params, batch, {"teacher": params})
    assert abs(float(loss)) < 1e-6 and abs(float(m["distill_loss"])) < 1e-6
    sft, sft_m = jax.jit(make_sft_loss(graphdef, STUDENT))(params, batch)
    assert float(m["ce_loss"]) == pytest.approx(float(sft), rel=1e-5)
    assert float(m["loss_tokens"]) == float(sft_m["loss_tokens"]) == float(batch["loss_mask"].sum())
    hard, _ = jax.jit(make_distill_loss(graphdef, STUDENT, graphdef, STUDENT, alpha=0.0))(params, batch,
                                                                                        {"teacher": params})
    assert float(hard) == pytest.approx(float(sft), rel=1e-5)
    # Gradient of a student identical to its teacher under pure forward KL is zero.
    g = jax.jit(jax.grad(lambda p: loss_fn(p, batch, {"teacher": params})[0]))(params)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g)) < 1e-5


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_distill_loss_matches_full_logit_reference_with_a_bigger_teacher(batch, divergence):
    """Student 2x32 vs teacher 3x64: the loss equals the divergence re-derived in numpy from full logits."""
    sg, sp = models.create(STUDENT, seed=1)
    tg, tp = models.create(TEACHER, seed=2)
    T, beta, alpha = 2.0, 0.3, 0.7
    loss, m = jax.jit(make_distill_loss(sg, STUDENT, tg, TEACHER, divergence=divergence, temperature=T, beta=beta,
                                        alpha=alpha, chunk_size=5))(sp, batch, {"teacher": tp})
    s, z = _full(sg, STUDENT, sp, batch), _full(tg, TEACHER, tp, batch)
    ls, lt = _log_softmax(s / T), _log_softmax(z / T)
    ps, pt = np.exp(ls), np.exp(lt)
    if divergence == "forward_kl":
        d = (pt * (lt - ls)).sum(-1)
    elif divergence == "reverse_kl":
        d = (ps * (ls - lt)).sum(-1)
    else:
        mix = beta * pt + (1 - beta) * ps
        d = beta * (pt * (lt - np.log(mix))).sum(-1) + (1 - beta) * (ps * (ls - np.log(mix))).sum(-1)
    d *= T ** 2
    ce = -np.take_along_axis(_log_softmax(s), np.asarray(batch["targets"])[..., None], -1)[..., 0]
    mask = np.asarray(batch["loss_mask"], np.float64)
    expected = ((alpha * d + (1 - alpha) * ce) * mask).sum() / mask.sum()
    assert float(loss) == pytest.approx(expected, rel=1e-4)
    assert float(m["distill_loss"]) == pytest.approx((d * mask).sum() / mask.sum(), rel=1e-3, abs=1e-6)


def test_vocab_mismatch_names_both_sizes(tmp_path, tok):
    sg, _ = models.create(STUDENT, seed=0)
    other = TEACHER.replace(vocab_size=300)
    tg, _ = models.create(other, seed=0)
    with pytest.raises(UserError, match=r"student vocab_size 264 != teacher vocab_size 300"):
        make_distill_loss(sg, STUDENT, tg, other)
    # The run checks before training: a teacher directory with another vocabulary.
    from jaxpost.models.hf import save_hf
    _, tp = models.create(other, seed=0)
    save_hf(tmp_path / "teacher", other, tp)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    tok.save_pretrained(tmp_path / "tok")
    with pytest.raises(UserError, match=r"student vocab_size 264 != teacher vocab_size 300"):
        distill(run_dir=str(tmp_path / "run"), train_data=str(data), tokenizer=str(tmp_path / "tok"),
                teacher_from=str(tmp_path / "teacher"), model=STUDENT)


def test_bad_options_raise_clearly(tmp_path):
    with pytest.raises(UserError, match=r"distill.mode='online' is unknown"):
        distill(run_dir=str(tmp_path), train_data="x", tokenizer="x", teacher_from="x", model=STUDENT, mode="online")
    with pytest.raises(UserError, match=r"set distill.alpha = 1.0 \(got 0.5\)"):
        distill(run_dir=str(tmp_path), train_data="x", tokenizer="x", teacher_from="x", model=STUDENT,
                mode="on_policy", alpha=0.5)
    with pytest.raises(UserError, match="LoopConfig.steps_per_call=2 and LoopConfig.grad_accum_steps=1 must both"):
        distill(run_dir=str(tmp_path), train_data="x", tokenizer="x", teacher_from="x", model=STUDENT,
                mode="on_policy", loop=LoopConfig(steps_per_call=2))
    with pytest.raises(UserError, match=r"set distill.top_k >= 1 \(got 0\)"):
        distill(run_dir=str(tmp_path), train_data="x", tokenizer="x", teacher_from="x", model=STUDENT,
                teacher_cache=str(tmp_path / "c"))
    sg, _ = models.create(STUDENT, seed=0)
    with pytest.raises(ValueError, match="only forward_kl"):
        make_distill_loss(sg, STUDENT, sg, STUDENT, divergence="jsd", top_k=4)


def test_teacher_cache_equals_live_teacher_restricted_to_top_k(tmp_path, tok):
    """Cache rows are the LM rows; loss and gradients from the cache equal the live top-k teacher's."""
    tg, tp = models.create(TEACHER, seed=3)
    sg, sp = models.create(STUDENT, seed=4)
    k = 5
    cache = build_teacher_cache(tmp_path / "cache", ROWS, tok, (TEACHER, tg, tp), seq_len=32, top_k=k, batch_size=8)
    assert len(cache) == len(ROWS)
    reopened = TeacherCache(tmp_path / "cache")
    live_rows = list(make_lm_pipeline(ROWS, tok, seq_len=32, batch_size=len(ROWS), packing=False, shuffle=False,
                                      num_epochs=1))[0]
    n_trained = int(live_rows["loss_mask"].sum())
    assert reopened.num_tokens == n_trained and reopened.logps.shape == (n_trained, k)

    live_grad = jax.jit(jax.value_and_grad(make_distill_loss(sg, STUDENT, tg, TEACHER, top_k=k, temperature=1.5,
                                                             alpha=0.8), has_aux=True))
    cached_grad = jax.jit(jax.value_and_grad(make_cached_distill_loss(sg, STUDENT, temperature=1.5, alpha=0.8),
                                             has_aux=True))
    it = make_cache_pipeline(reopened, batch_size=4, num_epochs=1, shuffle=False)
    seen = 0
    for b in it:
        rows = b["segment_ids"].any(-1)
        for key in ("tokens", "positions", "segment_ids", "targets", "loss_mask"):
            np.testing.assert_array_equal(b[key][rows], live_rows[key][seen:seen + rows.sum()])
        seen += int(rows.sum())
        jb = {kk: jnp.asarray(v) for kk, v in b.items()}
        lm = {kk: jb[kk] for kk in ("tokens", "positions", "segment_ids", "targets", "loss_mask")}
        (l1, m1), g1 = live_grad(sp, lm, {"teacher": tp})
        (l2, m2), g2 = cached_grad(sp, jb, None)
        assert float(l2) == pytest.approx(float(l1), rel=1e-5)
        assert float(m2["distill_loss"]) == pytest.approx(float(m1["distill_loss"]), rel=1e-5)
        for a, c in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
            np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=1e-4, atol=1e-6)
    assert seen == len(ROWS)
    # The stored top-k are the teacher's k most likely next tokens, by hand at one trained position.
    lm = {kk: jnp.asarray(live_rows[kk][:1]) for kk in ("tokens", "positions", "segment_ids")}
    z = _full(tg, TEACHER, tp, lm)[0]
    t0 = int(np.argmax(live_rows["loss_mask"][0]))
    row0 = reopened[0]
    np.testing.assert_array_equal(np.sort(row0["teacher_topk_ids"][t0]), np.sort(np.argsort(-z[t0])[:k]))
    np.testing.assert_allclose(row0["teacher_topk_logps"][t0], np.sort(_log_softmax(z[t0]))[::-1][:k], rtol=1e-5)


def test_cache_rejects_a_run_with_another_seq_len(tmp_path, tok):
    tg, tp = models.create(TEACHER, seed=3)
    cache = build_teacher_cache(tmp_path / "c", ROWS[:4], tok, (TEACHER, tg, tp), seq_len=32, top_k=2)
    with pytest.raises(ValueError, match="seq_len 32, the run asks for 64"):
        cache.check_compatible(64, 264)
    (tmp_path / "c" / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="not a finished teacher cache"):
        TeacherCache(tmp_path / "c")


def test_on_policy_batches_keep_the_prompt_and_replace_the_response(batch):
    """``batch_prompts`` cuts each row right before its first response token; the rebuilt row trains the sample."""
    host = {k: np.asarray(v) for k, v in batch.items()}
    P = 24
    ptok, pmask, truncated = batch_prompts(host, P, pad=0)
    assert truncated == 0
    for r in range(host["tokens"].shape[0]):
        t0 = int(np.argmax(host["loss_mask"][r]))
        n = int(pmask[r].sum())
        assert n == t0 + 1
        np.testing.assert_array_equal(ptok[r, P - n:], host["tokens"][r, :t0 + 1])
    sample = np.array([[7, 8, 2, 0, 0, 0, 0, 0]] * 4, np.int32)
    smask = np.array([[1, 1, 1, 0, 0, 0, 0, 0]] * 4, np.float32)
    out = rollout_sequences(ptok, pmask, sample, smask, 0)
    assert out["tokens"].shape == (4, P + 8)
    # The trained targets are exactly the sampled tokens, stop token included.
    np.testing.assert_array_equal(out["targets"][out["loss_mask"] == 1].reshape(4, 3), sample[:, :3])
    short, _, cut = batch_prompts(host, 4, pad=0)
    assert cut == 4 and short.shape == (4, 4)
