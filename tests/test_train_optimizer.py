"""Optimizer: schedules at hand-checked steps, weight-decay mask, trainable mask, MFU table."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpost.errors import UserError
from jaxpost.train import (Optimizer, default_decay_mask, make_optimizer, make_schedule, mfu, path_mask,
                           peak_flops_per_device)


@pytest.mark.parametrize("kind,expected", [
    # warmup 10, total 110, peak 1.0, end 0.1: warmup t/10, then p = (t-10)/100.
    ("cosine", {0: 0.0, 5: 0.5, 10: 1.0, 60: 0.55, 35: 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi / 4)), 110: 0.1,
                500: 0.1}),
    ("linear", {0: 0.0, 5: 0.5, 10: 1.0, 35: 0.775, 60: 0.55, 110: 0.1, 500: 0.1}),
    ("constant", {0: 0.0, 5: 0.5, 10: 1.0, 60: 1.0, 500: 1.0}),
])
def test_schedules_at_hand_checked_steps(kind, expected):
    sched = make_schedule(1.0, kind, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    for t, lr in expected.items():
        np.testing.assert_allclose(float(sched(t)), lr, rtol=1e-6, atol=1e-7, err_msg=f"{kind} step {t}")


def test_schedule_without_warmup_and_bad_names():
    np.testing.assert_allclose(float(make_schedule(2.0, "cosine", 0, 4)(0)), 2.0)
    np.testing.assert_allclose(float(make_schedule(2.0, "cosine", 0, 4)(2)), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="'step'"):
        make_schedule(1.0, "step")
    with pytest.raises(ValueError, match="'sgd'"):
        make_optimizer("sgd")


@pytest.mark.parametrize("kwargs,message", [
    ({"learning_rate": -1e-3}, "make_optimizer.learning_rate must be >= 0, got -0.001"),
    ({"warmup_steps": -1}, "make_optimizer.warmup_steps must be >= 0, got -1"),
    ({"min_lr_ratio": 1.5}, "make_optimizer.min_lr_ratio must be in [0, 1], got 1.5"),
    ({"weight_decay": -0.1}, "make_optimizer.weight_decay must be >= 0, got -0.1"),
    ({"b2": 1.0}, "make_optimizer.b2 must be in [0, 1), got 1.0"),
    ({"eps": 0.0}, "make_optimizer.eps must be > 0, got 0.0"),
    ({"clip_norm": -1.0}, "make_optimizer.clip_norm must be None or 0 (off), or > 0, got -1.0"),
    ({"total_steps": 0}, "the run's steps (make_optimizer.total_steps) must be >= 1, got 0"),
])
def test_an_optimizer_value_out_of_range_names_its_key(kwargs, message):
    with pytest.raises(UserError) as e:
        make_optimizer(**kwargs)
    assert str(e.value).splitlines()[0] == message  # gin appends the configurable it was raised in
    make_optimizer(clip_norm=0.0)  # 0 turns clipping off, as None does


def test_lion_steps_by_exactly_the_scheduled_lr():
    # Lion's update is lr * sign(...), so |delta| per step is the schedule value (no weight decay).
    opt = make_optimizer("lion", learning_rate=0.1, schedule="linear", warmup_steps=2, total_steps=6,
                         weight_decay=0.0, clip_norm=None)
    assert isinstance(opt, optax.GradientTransformation) and isinstance(opt, Optimizer)
    p = {"w": jnp.zeros((3, 2))}
    state = opt.init(p)
    g = {"w": jnp.ones((3, 2))}
    for t in range(7):
        u, state = opt.update(g, state, p)
        np.testing.assert_allclose(np.abs(np.asarray(u["w"])), float(opt.schedule(t)), rtol=1e-6)
    np.testing.assert_allclose([float(opt.schedule(t)) for t in (0, 1, 2, 4, 6)], [0, 0.05, 0.1, 0.05, 0.0],
                               atol=1e-7)


PARAMS = {
    "embed": {"embedding": jnp.ones((8, 4))},
    "layers": [{"attn_norm": {"scale": jnp.ones((4,))}, "mlp": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones((4,))},
                "odd_bias_matrix": jnp.ones((4, 4))}],
    "final_norm": {"scale": jnp.ones((4,))},
}


def test_default_decay_mask():
    m = default_decay_mask(PARAMS)
    assert m["embed"]["embedding"] and m["layers"][0]["mlp"]["kernel"]
    assert not m["layers"][0]["attn_norm"]["scale"] and not m["final_norm"]["scale"]
    assert not m["layers"][0]["mlp"]["bias"] and not m["layers"][0]["odd_bias_matrix"]
    assert not default_decay_mask(PARAMS, decay_embeddings=False)["embed"]["embedding"]


def test_weight_decay_applies_only_to_masked_leaves():
    # Zero gradients: Adam's step is 0, so the only change is decoupled decay p <- p * (1 - lr * wd).
    opt = make_optimizer("adamw", learning_rate=0.1, schedule="constant", weight_decay=0.5, clip_norm=None)
    zeros = jax.tree.map(jnp.zeros_like, PARAMS)
    u, _ = opt.update(zeros, opt.init(PARAMS), PARAMS)
    new = optax.apply_updates(PARAMS, u)
    np.testing.assert_allclose(new["layers"][0]["mlp"]["kernel"], 0.95, rtol=1e-6)
    np.testing.assert_allclose(new["embed"]["embedding"], 0.95, rtol=1e-6)
    for leaf in (new["layers"][0]["mlp"]["bias"], new["final_norm"]["scale"], new["layers"][0]["odd_bias_matrix"]):
        np.testing.assert_array_equal(leaf, 1.0)


def test_trainable_mask_freezes_leaves_without_optimizer_state():
    trainable = jax.tree.map(lambda _: False, PARAMS)
    trainable["layers"][0]["mlp"]["kernel"] = True
    trainable["final_norm"]["scale"] = True
    for mask in (trainable, path_mask(trainable)):
        opt = make_optimizer("adamw", learning_rate=0.1, schedule="constant", weight_decay=0.5,
                             trainable_mask=mask)
        state = opt.init(PARAMS)
        arrays = [x for x in jax.tree.leaves(state) if x.ndim > 0]
        # Adam mu and nu for the two trainable leaves only: 2 * (16 + 4) numbers.
        assert sum(x.size for x in arrays) == 2 * (16 + 4)
        grads = jax.tree.map(jnp.ones_like, PARAMS)
        u, _ = opt.update(grads, state, PARAMS)
        for (path, upd), t in zip(jax.tree_util.tree_flatten_with_path(u)[0], jax.tree.leaves(trainable)):
            assert bool(jnp.any(upd != 0)) == t, jax.tree_util.keystr(path)
        # Trainable kernel: Adam's first step is -lr * sign(g) = -0.1, plus decay -lr*wd*p = -0.05.
        np.testing.assert_allclose(u["layers"][0]["mlp"]["kernel"], -0.15, rtol=1e-5)


def test_adafactor_runs_and_descends():
    opt = make_optimizer("adafactor", learning_rate=0.05, schedule="constant")
    p = {"w": jnp.ones((4, 3))}
    s = opt.init(p)
    loss = lambda p: jnp.sum(jnp.square(p["w"] - 0.5))
    before = float(loss(p))
    for _ in range(5):
        u, s = opt.update(jax.grad(loss)(p), s, p)
        p = optax.apply_updates(p, u)
    assert float(loss(p)) < before


def test_mfu_table():
    assert peak_flops_per_device("cpu") is None
    assert mfu(1e12, 1.0, 8, "cpu") is None
    assert peak_flops_per_device("TPU v5 lite") == 197e12
    assert peak_flops_per_device("TPU v5") == 459e12
    assert peak_flops_per_device("TPU v5p") == 459e12
    assert peak_flops_per_device("TPU v4") == 275e12
    assert peak_flops_per_device("TPU v6 lite") == 918e12
    assert peak_flops_per_device("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_per_device("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_per_device("NVIDIA H200") == 989e12
    assert peak_flops_per_device("NVIDIA B200") == 2250e12
    # 4 H100s at half their 989 TFLOP/s peak: 4 * 494.5e12 FLOPs in 1 s -> 0.5.
    np.testing.assert_allclose(mfu(4 * 494.5e12, 1.0, 4, "NVIDIA H100 80GB HBM3"), 0.5)


def _old_schedule(t, peak, kind, W, T, ratio):
    """The formulas make_schedule implemented by hand before it used optax's schedules."""
    end, decay_len = ratio * peak, max(T - W, 1)
    p = np.clip((t - W) / decay_len, 0.0, 1.0)
    after = {"cosine": end + (peak - end) * 0.5 * (1.0 + np.cos(np.pi * p)),
             "linear": peak + (end - peak) * p, "constant": peak}[kind]
    return after if W == 0 or t >= W else peak * t / W


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("peak,W,T,ratio", [(3e-4, 100, 1000, 0.1), (1e-5, 0, 50, 0.0), (2.0, 7, 7, 0.5),
                                            (1e-3, 3, 1, 0.2)])
def test_optax_schedules_give_the_old_learning_rates(kind, peak, W, T, ratio):
    sched = make_schedule(peak, kind, warmup_steps=W, total_steps=T, min_lr_ratio=ratio)
    steps = sorted({0, 1, W // 2, max(W - 1, 0), W, W + 1, (W + T) // 2, T - 1, T, T + 5, 3 * T + 11})
    for t in steps:
        # optax's warmup is peak - peak * (1 - t / W) in float32: equal to peak * t / W up to the
        # rounding of numbers of size peak, hence atol relative to peak (float32 eps is 1.2e-7).
        np.testing.assert_allclose(float(sched(t)), _old_schedule(t, peak, kind, W, T, ratio), rtol=1e-6,
                                   atol=2.4e-7 * peak, err_msg=f"{kind} step {t}")
        # Traced with an int32 count, as inside the train step.
        np.testing.assert_allclose(float(jax.jit(sched)(jnp.int32(t))), float(sched(t)), rtol=1e-6,
                                   atol=2.4e-7 * peak)
