"""KTO: the loss, KL estimate and metrics against the paper's formula written out here, and against TRL 1.16's
own ``KTOTrainer`` code (its ``_compute_loss`` on the same log-probs, its dataset preparation for the KL rows)."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from jaxpost.data import build_tokenizer
from jaxpost.data.unpaired import make_unpaired_pipeline
from jaxpost.losses.kto import kl_estimate, kto_loss


def a(*xs):
    return np.array(xs, np.float32)


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


# Three examples: two desirable, one undesirable. Log-ratios r = pi - ref: [1, -2, 3]; KL rows: pi_kl - ref_kl = [2, 0, 1].
PI, REF = a(-4.0, -6.0, -1.0), a(-5.0, -4.0, -4.0)
PI_KL, REF_KL = a(-3.0, -5.0, -6.0), a(-5.0, -5.0, -7.0)
LABELS = a(1.0, 1.0, 0.0)


def test_hand_example():
    beta = 0.5
    loss, m = kto_loss(PI, REF, PI_KL, REF_KL, LABELS, beta=beta)
    z0 = (2.0 + 0.0 + 1.0) / 3  # = 1, positive so not clamped
    expected = [1 - sig(beta * (1 - z0)), 1 - sig(beta * (-2 - z0)), 1 - sig(beta * (z0 - 3))]
    # 1 - sigma(0) = 0.5; 1 - sigma(-1.5) = 0.817574; 1 - sigma(-1) = 0.731059
    assert expected == pytest.approx([0.5, 0.817574, 0.731059], abs=1e-6)
    assert float(loss) == pytest.approx(sum(expected) / 3, abs=1e-6)
    assert float(m["kl"]) == pytest.approx(1.0)
    assert float(m["rewards/chosen"]) == pytest.approx(beta * (1 - 2) / 2)   # mean of 0.5, -1.0
    assert float(m["rewards/rejected"]) == pytest.approx(beta * 3)
    assert float(m["rewards/margins"]) == pytest.approx(-0.25 - 1.5)
    assert float(m["logps/chosen"]) == pytest.approx(-5.0) and float(m["logps/rejected"]) == pytest.approx(-1.0)
    assert float(m["count/chosen"]) == 2 and float(m["count/rejected"]) == 1


def test_weights_clamp_mask_and_gradient():
    beta = 0.2
    # Negative mean KL is clamped to 0.
    assert float(kl_estimate(a(-5.0, -5.0), a(-4.0, -3.0))) == 0.0
    loss, m = kto_loss(PI, REF, PI_KL - 10, REF_KL, LABELS, beta=beta, desirable_weight=2.0, undesirable_weight=0.5)
    expected = [2.0 * (1 - sig(beta * 1)), 2.0 * (1 - sig(beta * -2)), 0.5 * (1 - sig(beta * (0 - 3)))]
    assert float(m["kl"]) == 0.0
    assert float(loss) == pytest.approx(sum(expected) / 3, abs=1e-6)
    # A padding row changes nothing, KL mean included.
    pad = lambda x, v: np.r_[x, np.float32(v)]
    loss_p, m_p = kto_loss(pad(PI, 9), pad(REF, -9), pad(PI_KL, 50), pad(REF_KL, 0), pad(LABELS, 1), beta=beta,
                           example_mask=a(1, 1, 1, 0))
    loss_0, m_0 = kto_loss(PI, REF, PI_KL, REF_KL, LABELS, beta=beta)
    assert float(loss_p) == pytest.approx(float(loss_0)) and float(m_p["kl"]) == pytest.approx(float(m_0["kl"]))
    # d loss / d pi_i = -(w/n) beta s(1-s) for desirable (s = sigma(beta (r - z0))), + for undesirable; KL: no gradient.
    g_pi, g_kl = jax.grad(lambda p, k: kto_loss(p, REF, k, REF_KL, LABELS, beta=beta)[0], argnums=(0, 1))(PI, PI_KL)
    s = [sig(beta * (1 - 1)), sig(beta * (-2 - 1)), sig(beta * (1 - 3))]
    want = [-beta * s[0] * (1 - s[0]) / 3, -beta * s[1] * (1 - s[1]) / 3, beta * s[2] * (1 - s[2]) / 3]
    np.testing.assert_allclose(g_pi, want, rtol=1e-5)
    np.testing.assert_array_equal(g_kl, 0.0)


def test_apo_zero_unpaired():
    loss, m = kto_loss(PI, REF, None, None, LABELS, beta=0.5, loss_type="apo_zero_unpaired")
    expected = [1 - sig(0.5), 1 - sig(-1.0), sig(1.5)]
    assert float(loss) == pytest.approx(sum(expected) / 3, abs=1e-6) and float(m["kl"]) == 0.0


# --- TRL's own code ------------------------------------------------------------------------------------------------

def _trl_trainer(**attrs):
    """A KTOTrainer without __init__ (no model, no accelerator): only what _compute_loss and _prepare_dataset read."""
    trl = pytest.importorskip("trl")
    import torch

    t = object.__new__(trl.KTOTrainer)
    t.__dict__.update(model=SimpleNamespace(training=True), aux_loss_enabled=False, calculate_KL=True,
                      precompute_ref_logps=True, loss_type="kto", desirable_weight=1.0, undesirable_weight=1.0,
                      _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0,
                      _tp_size=1, accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x))
    t.__dict__.update(attrs)
    return t


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.7)])
@pytest.mark.parametrize("kl_shift", [0.0, -10.0])  # -10: TRL's clamp at 0
def test_loss_kl_and_metrics_equal_trl_kto_trainer(weights, kl_shift):
    import torch

    dw, uw, beta = *weights, 0.3
    t = _trl_trainer(beta=beta, desirable_weight=dw, undesirable_weight=uw)
    rng = np.random.default_rng(0)
    B = 6
    pi, ref = rng.normal(-8, 3, B).astype(np.float32), rng.normal(-8, 3, B).astype(np.float32)
    pi_kl, ref_kl = rng.normal(-9, 3, B).astype(np.float32) + kl_shift, rng.normal(-9, 3, B).astype(np.float32)
    labels = np.array([1, 0, 0, 1, 1, 0], bool)

    def model(input_ids, **_):  # one completion token: its log-prob is the sequence's; KL rows are marked by id 1
        logps = pi_kl if int(input_ids[0, 0]) == 1 else pi
        n = input_ids.shape[0]
        return SimpleNamespace(log_probs=torch.tensor(logps)[:, None], entropy=torch.zeros(n, 1),
                               mean_logits=torch.zeros(n, 1))

    ones = torch.ones(B, 2, dtype=torch.long)
    batch = {"input_ids": 0 * ones, "attention_mask": ones, "completion_mask": ones, "KL_input_ids": ones,
             "KL_attention_mask": ones, "KL_completion_mask": ones, "label": torch.tensor(labels),
             "ref_logps": torch.tensor(ref), "ref_KL_logps": torch.tensor(ref_kl)}
    trl_loss = float(t._compute_loss(model, batch, return_outputs=False))
    trl_metrics = {k: v[-1] for k, v in t._metrics["train"].items()}

    loss, m = kto_loss(pi, ref, pi_kl, ref_kl, labels.astype(np.float32), beta=beta, desirable_weight=dw,
                       undesirable_weight=uw)
    assert float(loss) == pytest.approx(trl_loss, rel=1e-5)
    for key in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert float(m[key]) == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-6), key


def test_kl_rows_rotate_completions_as_trl_builds_them(tmp_path):
    """TRL's dataset preparation (its own code) and jaxpost's pipeline pair the same prompt with the same other
    completion, batch by batch, including a short last batch (10 rows, batches of 4)."""
    import datasets

    tok = build_tokenizer(None, vocab_size=261)
    rows = [{"prompt": f"p{i} ", "completion": "abcdefghij"[i] * (i % 3 + 1), "label": i % 2 == 0} for i in range(10)]
    completions = [r["completion"] for r in rows]
    t = _trl_trainer(beta=0.1, _tokenizer=tok)
    from trl import KTOConfig

    args = KTOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, max_length=None, report_to=[],
                     bf16=False, use_cpu=True)
    trl_rows = list(t._prepare_dataset(datasets.Dataset.from_list(rows), tok, args, "train"))
    by_ids = {tuple(r["completion_ids"]): i for i, r in enumerate(trl_rows)}
    trl_kl = [by_ids[tuple(r["KL_completion_ids"])] for r in trl_rows]

    ours = {}
    for batch in make_unpaired_pipeline(rows, tok, seq_len=24, batch_size=4, num_epochs=1, shuffle=False):
        for b in range(4):
            if batch["example_mask"][b]:
                kl = tok.decode(batch["kl_targets"][b][batch["kl_loss_mask"][b] > 0], skip_special_tokens=True)
                own = tok.decode(batch["targets"][b][batch["loss_mask"][b] > 0], skip_special_tokens=True)
                assert own == completions[batch["row_index"][b]]
                # The KL row starts with this row's own prompt.
                prompt_len = int(np.argmax(batch["kl_loss_mask"][b] > 0))
                np.testing.assert_array_equal(batch["kl_tokens"][b][:prompt_len + 1],
                                              batch["tokens"][b][:prompt_len + 1])
                ours[int(batch["row_index"][b])] = completions.index(kl)
    assert [ours[i] for i in range(10)] == trl_kl == [3, 0, 1, 2, 7, 4, 5, 6, 9, 8]
