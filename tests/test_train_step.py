"""Train step: gradient accumulation exactness, mixed precision, one compilation, donation, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxpost.sharding import Partitioner, make_mesh
from jaxpost.train import (abstract_state, batch_shardings, compile_train_step, init_sharded_state, init_state,
                           make_eval_step, make_optimizer, make_train_step, state_shardings)
from test_train_fixtures import LOGICAL_AXES, Batches, init_params, lm_loss, make_batch


def _sgd_step(loss_fn, accum, batch):
    """One SGD(lr=1) step so that params_before - params_after is exactly the gradient used."""
    params = init_params()
    step = jax.jit(make_train_step(loss_fn, optax.sgd(1.0), grad_accum_steps=accum))
    new, metrics = step(init_state(params, optax.sgd(1.0)), batch, None)
    grads = jax.tree.map(lambda a, b: a - b, params, new.params)
    return grads, jax.device_get(metrics)


def _assert_trees_close(a, b, rtol=2e-5, atol=1e-7):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


def test_grad_accum_4x2_equals_1x8_with_uneven_token_counts():
    batch = make_batch(3)
    counts = batch["loss_mask"].sum(1)
    g1, m1 = _sgd_step(lm_loss, 1, batch)
    g4, m4 = _sgd_step(lm_loss, 4, batch)
    _assert_trees_close(g4, g1)
    # The reference: gradient of the full-batch token mean, computed directly.
    ref = jax.jit(jax.grad(lambda p: lm_loss(p, batch)[0]))(init_params())
    _assert_trees_close(g1, ref)
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m4["accuracy"], m1["accuracy"], rtol=1e-6)
    assert m4["loss_tokens"] == counts.sum() == m1["loss_tokens"]
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
    # A mean of per-micro-batch means (strided micro-batches: rows i, i+4) would be visibly different.
    loss_of = jax.jit(lambda p, b: lm_loss(p, b)[0])
    micro_means = [float(loss_of(init_params(), jax.tree.map(lambda x: x[i::4], batch))) for i in range(4)]
    assert abs(np.mean(micro_means) - m1["loss"]) > 1e-3


def test_grad_accum_with_only_loss_tokens_and_with_plain_mean():
    batch = make_batch(5)

    def tokens_only(params, b, frozen):
        loss, m = lm_loss(params, b)
        return loss, {"loss_tokens": m["loss_tokens"]}

    g1, _ = _sgd_step(tokens_only, 1, batch)
    g4, _ = _sgd_step(tokens_only, 4, batch)
    _assert_trees_close(g4, g1)

    def per_example_mean(params, b, frozen):  # no token metrics: equal-sized micro-batches, plain mean
        logits = jax.nn.log_softmax(jax.numpy.asarray(params["embed"]["embedding"])[b["tokens"][:, 0]], -1)
        return -jnp.mean(logits[:, 0]), {}

    g1, m1 = _sgd_step(per_example_mean, 1, batch)
    g2, m2 = _sgd_step(per_example_mean, 2, batch)
    _assert_trees_close(g2, g1)
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-6)


def test_grad_accum_rejects_indivisible_batch():
    step = make_train_step(lm_loss, optax.sgd(1.0), grad_accum_steps=3)
    with pytest.raises(ValueError, match=r"\['loss_mask'\] has shape \(8, 8\).*divisible by grad_accum_steps=3"):
        jax.jit(step)(init_state(init_params(), optax.sgd(1.0)), make_batch(0), None)


def test_metrics_and_learning_rate():
    opt = make_optimizer("adamw", learning_rate=1e-2, schedule="linear", warmup_steps=2, total_steps=10)
    step = jax.jit(make_train_step(lm_loss, opt))
    state = init_state(init_params(), opt)
    lrs = []
    for i in range(3):
        state, m = step(state, make_batch(i), None)
        lrs.append(float(m["learning_rate"]))
        assert set(m) >= {"loss", "loss_sum", "loss_tokens", "accuracy", "grad_norm", "learning_rate", "is_finite"}
        assert bool(m["is_finite"])
    np.testing.assert_allclose(lrs, [0.0, 5e-3, 1e-2], rtol=1e-6)
    assert int(state.step) == 3


def test_bf16_compute_keeps_fp32_master_params():
    """One bf16 switch, ModelConfig.dtype: the forward computes in bf16, master params and moments stay fp32."""
    from jaxpost import models
    from jaxpost.algorithms import make_sft_loss
    from jaxpost.models.config import ModelConfig

    base = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1)
    B, L = 2, 16
    tokens = np.random.default_rng(0).integers(1, 64, (B, L)).astype(np.int32)
    batch = {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "positions": np.tile(np.arange(L), (B, 1)),
             "segment_ids": np.ones((B, L), np.int32), "loss_mask": np.ones((B, L), np.float32)}
    opt = optax.adam(1e-3)
    out = {}
    for dtype in ("float32", "bfloat16"):
        config = base.replace(dtype=dtype)
        graphdef, params = models.create(config, seed=0)
        state = init_state(params, opt)
        out[dtype] = jax.jit(make_train_step(make_sft_loss(graphdef, config, 8), opt))(state, batch, None)
    bf, m_bf = out["bfloat16"]
    _, m_fp = out["float32"]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bf.params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bf.opt_state) if jnp.ndim(x))
    np.testing.assert_allclose(m_bf["loss"], m_fp["loss"], rtol=2e-2)
    np.testing.assert_allclose(m_bf["grad_norm"], m_fp["grad_norm"], rtol=5e-2)
    assert float(m_bf["loss"]) != float(m_fp["loss"])  # the bf16 forward did run in bf16


def _sharded_setup(partitioner, opt, accum=1):
    params = init_params()
    p_sh = partitioner.shardings(LOGICAL_AXES, params)
    shardings = state_shardings(abstract_state(params, opt), p_sh, partitioner, opt)
    state = init_sharded_state(params, opt, shardings)
    b_sh = batch_shardings(next(Batches()), partitioner)
    step = compile_train_step(make_train_step(lm_loss, opt, grad_accum_steps=accum), shardings, b_sh, None)
    return state, step, shardings


def test_compiles_once_over_50_steps_and_donates_state():
    part = Partitioner(make_mesh(fsdp=-1), "fsdp")
    opt = make_optimizer("adamw", learning_rate=1e-2, total_steps=50, weight_decay=0.1)
    state, step, _ = _sharded_setup(part, opt, accum=2)
    batches, losses = Batches(), []
    for _ in range(50):
        old = state
        state, m = step(state, next(batches), None)
        losses.append(m["loss"])
    assert step._cache_size() == 1
    assert old.params["mlp"]["kernel"].is_deleted()  # donated buffers were reused
    assert int(state.step) == 50
    losses = np.asarray(jax.device_get(losses))
    assert np.all(np.isfinite(losses)) and losses[-5:].mean() < losses[:5].mean()


def test_sharded_fsdp_run_matches_single_device():
    opt = make_optimizer("adamw", learning_rate=1e-2, total_steps=6, weight_decay=0.1)
    runs = {}
    for name, mesh in {"one": make_mesh(devices=jax.devices()[:1]), "fsdp8": make_mesh(fsdp=8)}.items():
        part = Partitioner(mesh, "fsdp")
        state, step, shardings = _sharded_setup(part, opt, accum=2)
        batches, losses = Batches(), []
        for _ in range(6):
            state, m = step(state, next(batches), None)
            losses.append(float(m["loss"]))
        runs[name] = (losses, jax.device_get(state.params), state, shardings)
    np.testing.assert_allclose(runs["fsdp8"][0], runs["one"][0], rtol=1e-5)
    _assert_trees_close(runs["fsdp8"][1], runs["one"][1], rtol=1e-4, atol=1e-6)
    state, shardings = runs["fsdp8"][2], runs["fsdp8"][3]
    assert state.params["mlp"]["kernel"].sharding.spec == PartitionSpec("fsdp", None)
    mu = state.opt_state[1][0].mu  # chain(clip, adamw=(scale_by_adam, ...))
    assert mu["mlp"]["kernel"].sharding.spec == PartitionSpec("fsdp", None)
    assert mu["embed"]["embedding"].sharding.spec == PartitionSpec(None, "fsdp")
    assert state.opt_state[1][0].count.sharding.spec == PartitionSpec()


def test_state_shardings_for_factored_adafactor_moments():
    part = Partitioner(make_mesh(fsdp=8), "fsdp")
    params = {"w": jax.ShapeDtypeStruct((128, 256), jnp.float32), "b": jax.ShapeDtypeStruct((256,), jnp.float32)}
    axes = {"w": ("embed", "mlp"), "b": ("mlp",)}
    opt = make_optimizer("adafactor", learning_rate=1e-3)
    sh = state_shardings(abstract_state(params, opt), part.shardings(axes, params), part, opt)
    abstract = abstract_state(params, opt)
    specs = {jax.tree_util.keystr(p): (tuple(a.shape), s.spec) for (p, a), s in zip(
        jax.tree_util.tree_flatten_with_path(abstract.opt_state)[0], jax.tree.leaves(sh.opt_state))}
    factored = {k: v for k, v in specs.items() if "['w']" in k and "v_row" in k or "['w']" in k and "v_col" in k}
    assert factored, specs
    for key, (shape, spec) in factored.items():
        # v_row drops the last dim (keeps 'fsdp' on dim 0); v_col drops dim 0 (nothing left to shard).
        expected = PartitionSpec("fsdp") if shape == (128,) else PartitionSpec(None)
        assert shape in ((128,), (256,)) and spec == expected, (key, shape, spec)
    assert isinstance(sh.step, NamedSharding) and sh.step.spec == PartitionSpec()

    # With frozen leaves (LoRA-style) the moments of the trainable ones are still sharded like them.
    opt = make_optimizer("adamw", learning_rate=1e-3, trainable_mask={"w": True, "b": False})
    sh = state_shardings(abstract_state(params, opt), part.shardings(axes, params), part, opt)
    specs = [s.spec for s in jax.tree.leaves(sh.opt_state)]
    assert specs.count(PartitionSpec("fsdp", None)) == 2  # mu and nu of "w"; "b" has none


def _numpy_lm_metrics(params, batch):
    """The fixture model's token-mean NLL, loss-token count and accuracy, in float64 numpy."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    x = p["embed"]["embedding"][batch["tokens"]]
    x = x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + 1e-6) * p["norm"]["scale"]
    logits = np.tanh(x @ p["mlp"]["kernel"] + p["mlp"]["bias"]) @ p["head"]["kernel"]
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    mask = batch["loss_mask"].astype(np.float64)
    correct = logits.argmax(-1) == batch["targets"]
    return (nll * mask).sum() / mask.sum(), mask.sum(), (correct * mask).sum() / mask.sum()


def test_eval_step_reports_the_loss_at_the_given_params_without_training():
    params, batch = init_params(), make_batch(0)
    m = jax.device_get(jax.jit(make_eval_step(lm_loss))(params, batch, None))
    loss, tokens, accuracy = _numpy_lm_metrics(params, batch)
    np.testing.assert_allclose(m["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(m["accuracy"], accuracy, rtol=1e-6)
    assert m["loss_tokens"] == tokens
    assert set(m) == {"loss", "loss_sum", "loss_tokens", "accuracy"}  # no gradient or optimizer metrics
    # The train step's metrics describe the same params before its update: the same numbers.
    _, train_m = jax.jit(make_train_step(lm_loss, optax.sgd(1.0)))(init_state(params, optax.sgd(1.0)), batch, None)
    for key in m:
        np.testing.assert_allclose(m[key], train_m[key], rtol=1e-6, err_msg=key)
    # `frozen` reaches the loss.
    with_frozen = lambda p, b, frozen: (lm_loss(p, b)[0] + frozen["offset"], {})
    shifted = jax.jit(make_eval_step(with_frozen))(params, batch, {"offset": jnp.float32(2.0)})
    np.testing.assert_allclose(shifted["loss"], loss + 2.0, rtol=1e-5)


def test_a_preference_batch_without_a_real_pair_changes_nothing():
    # Momentum and weight decay would move the params on zero gradients; a batch of padding pairs must not.
    def loss_fn(params, batch, frozen=None):
        return jnp.sum(batch["pair_mask"] * (params["w"] ** 2).sum()), {}

    opt = optax.adamw(0.1, weight_decay=0.1)
    step = jax.jit(make_train_step(loss_fn, opt))
    state = init_state({"w": jnp.ones((3,))}, opt)
    state, _ = step(state, {"pair_mask": jnp.ones((2,))})  # builds momentum
    before = jax.device_get(state)
    state, _ = step(state, {"pair_mask": jnp.zeros((2,))})
    after = jax.device_get(state)
    assert int(after.step) == int(before.step) + 1
    for a, b in zip(jax.tree.leaves((after.params, after.opt_state)), jax.tree.leaves((before.params, before.opt_state))):
        np.testing.assert_array_equal(a, b)
    state, _ = step(state, {"pair_mask": jnp.ones((2,))})
    assert not np.array_equal(jax.device_get(state.params["w"]), after.params["w"])
