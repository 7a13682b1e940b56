"""Checks of the benchmark harness: same work for every system, correct arithmetic, bf16/MFU path runs.

    python -m pytest -q benchmarks/test_benchmark.py
"""

import os
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import cpu_workload as C  # noqa: E402
import workload as W  # noqa: E402

TINY = os.path.join(os.path.dirname(HERE), "configs", "models", "tiny.gin")


def test_lm_batch_shift_and_mask_by_hand():
    ids = np.array([[5, 6, 7, 8]], np.int32)
    b = W.lm_batch(ids)
    np.testing.assert_array_equal(b["targets"], [[6, 7, 8, 0]])
    np.testing.assert_array_equal(b["loss_mask"], [[1, 1, 1, 0]])  # all 3 next-token predictions
    np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 3]])
    # Prompt of 2 tokens: trained predictions are those of tokens 2 and 3, made at positions 1 and 2.
    np.testing.assert_array_equal(W.lm_batch(ids, trained_from=2)["loss_mask"], [[0, 1, 1, 0]])


def test_workload_token_counts_match_workload_md():
    sft = W.lm_batch(W.sft_ids(W.SFT_SHAPE, 8192))
    assert sft["tokens"].shape == (8, 512) and W.trained_tokens(sft) == 8 * 511
    pairs = W.dpo_ids(W.DPO_SHAPE, 8192)
    assert pairs["prompt"].shape == (4, 128) and pairs["chosen"].shape == (4, 384)
    assert (pairs["chosen"][:, -1] == W.EOS_ID).all() and (pairs["rejected"][:, -1] == W.EOS_ID).all()
    dpo = W.dpo_batch(pairs)
    assert dpo["chosen_tokens"].shape == (4, 512)
    assert W.trained_tokens(dpo) == 2 * 4 * 384  # every completion token, chosen and rejected
    np.testing.assert_array_equal(dpo["chosen_tokens"][:, :128], dpo["rejected_tokens"][:, :128])
    # Same seed, same ids: every system sees the same integers.
    np.testing.assert_array_equal(W.sft_ids(W.SFT_SHAPE, 8192), W.sft_ids(W.SFT_SHAPE, 8192))
    assert W.sft_ids(W.SFT_SHAPE, 8192).min() >= W.FIRST_FREE_ID


def test_tokenizer_round_trips_ids_and_concatenation(tmp_path):
    tok = W.build_tokenizer(64, tmp_path)
    a, b = np.array([2, 9, 63]), np.array([5, W.EOS_ID])
    assert tok(W.ids_to_text(a), add_special_tokens=False)["input_ids"] == a.tolist()
    joined = W.ids_to_text(a) + " " + W.ids_to_text(b)
    assert tok(joined, add_special_tokens=False)["input_ids"] == a.tolist() + b.tolist()
    assert tok.eos_token_id == W.EOS_ID and tok.pad_token_id == W.PAD_ID


def test_throughput_ratios_and_mfu_by_hand():
    shape = W.Shape(batch=8, seq=512)
    assert C.throughput("sft", shape, 2.0) == 2048.0
    assert C.throughput("dpo", W.Shape(batch=4, seq=512, prompt=128), 2.0) == 2.0
    res = {"jaxpost": {"median_step_s": 1.0, "peak_rss_mib": 500.0, "first_step_s": 6.0, "flops_per_step": 989e12,
                       "device_kind": "NVIDIA H100 80GB HBM3", "n_devices": 2},
           "trl": {"median_step_s": 4.0, "peak_rss_mib": 1000.0, "first_step_s": 3.0, "device_kind": "cpu"}}
    s = C.summarize("sft", shape, res)
    assert s["ratios"]["trl"] == {"speedup": 4.0, "rss_ratio": 0.5, "first_step_ratio": 2.0}
    assert s["systems"]["jaxpost"]["mfu"] == pytest.approx(0.5)  # 989e12 / 1 s / (2 x 989e12)
    assert s["systems"]["trl"]["mfu"] is None  # no peak known for CPU


def test_tunix_is_skipped_without_its_interpreter(monkeypatch, tmp_path, capsys):
    import importlib.util

    assert "--tunix-python" in C.tunix_unavailable(None)
    if importlib.util.find_spec("tunix") is None:  # Tunix lives in its own venv, not in this one
        assert "no tunix package" in C.tunix_unavailable(sys.executable)
    # The interpreter defaults to $JAXPOST_TUNIX_PYTHON; a missing one skips Tunix with the reason printed.
    missing = str(tmp_path / "venv" / "bin" / "python")
    monkeypatch.setenv(C.TUNIX_ENV, missing)
    report = C.main(["--systems", "tunix", "--task", "sft", "--out", ""])
    assert missing in report["skipped"]["tunix"] and "does not exist" in report["skipped"]["tunix"]
    assert report["tasks"][0]["systems"] == {} and report["settings"]["tunix_python"] == missing
    assert f"[skip] tunix: Tunix interpreter {missing}" in capsys.readouterr().out


def test_dpo_flops_count_reference_forward():
    import run_jaxpost

    cfg = run_jaxpost.model_config(TINY, "float32")
    shape = W.Shape(batch=2, seq=16, prompt=4)
    sft = run_jaxpost.step_flops(cfg, "sft", shape)
    assert sft == cfg.flops_per_token(16) * 2 * 16
    # 2B sequences trained (3 forwards each) + the reference forward (1 more) = 4/3 x 2 x SFT.
    assert run_jaxpost.step_flops(cfg, "dpo", shape) == pytest.approx(sft * 2 * 4 / 3)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_jaxpost_runner_bf16_tiny(task):
    import run_jaxpost

    # Batch 8: splits over the 8 fake devices of tests/conftest.py too, when both suites share a process.
    shape = C.task_shape(task, 8, 32)
    res = run_jaxpost.run(task, TINY, shape, steps=2, warmup=1, dtype="bfloat16", chunk=16)
    assert len(res["step_s"]) == 2 and len(res["losses"]) == 3
    assert np.isfinite(res["losses"]).all()
    if task == "sft":  # random init: loss near log(V)
        assert abs(res["losses"][0] - np.log(256)) < 0.3
    else:  # policy == reference at step 0: -log sigmoid(0) = log 2
        assert res["losses"][0] == pytest.approx(np.log(2), abs=1e-3)
    assert res["trained_tokens"] == (8 * 31 if task == "sft" else 8 * 2 * 24)


def test_jaxpost_runner_steps_per_call():
    """Two steps per call: per-step times count each call once per step, and the losses match one per call."""
    import run_jaxpost

    shape = C.task_shape("sft", 8, 32)
    one = run_jaxpost.run("sft", TINY, shape, steps=4, warmup=2, chunk=16)
    two = run_jaxpost.run("sft", TINY, shape, steps=4, warmup=2, chunk=16, steps_per_call=2)
    assert two["steps_per_call"] == 2 and len(two["step_s"]) == 4 and len(two["losses"]) == 6
    assert two["step_s"][0] == two["step_s"][1] and two["step_s"][2] == two["step_s"][3]
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
