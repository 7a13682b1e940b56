"""Logit parity with the PyTorch models of `transformers` (tiny fp32 configs).

Each HF model gets random weights (norms and biases included), is saved with
``save_pretrained`` and loaded with ``load_hf``; logits must agree to 1e-4 on
a batch with a right-padded row, GQA (4 query heads, 2 kv heads), tied and
untied embeddings, Llama 3.1 RoPE scaling, Qwen2 biases, Qwen3 q/k norms and
a Mistral sliding window shorter than the sequence. Logits and scores are
checked in both layer layouts (``scan_layers``: the layers under
``jax.lax.scan``), gradients in the scanned layout for the Qwen3 case.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_models import CASES, make_model
from jaxpost.models import forward, load_hf, logits, scores
from jaxpost.models.layout import is_scanned, layer_index

B, L = 3, 12
LENGTHS = [12, 7, 10]  # rows 1 and 2 are right-padded


def _batch():
    rng = np.random.RandomState(0)
    ids = rng.randint(1, 96, size=(B, L))
    mask = (np.arange(L)[None] < np.array(LENGTHS)[:, None]).astype(np.int64)
    ids = ids * mask  # pad id 0
    positions = np.broadcast_to(np.arange(L), (B, L)).astype(np.int32)
    return ids, mask, positions


LAYOUTS = pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])


@LAYOUTS
@pytest.mark.parametrize("case", sorted(CASES))
def test_causal_lm_logits_match_transformers(case, scan, tmp_path):
    model = make_model(case)
    model.save_pretrained(tmp_path)
    config, graphdef, params = load_hf(tmp_path, scan_layers=scan)
    assert is_scanned(params) == scan
    ids, mask, positions = _batch()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    hidden, _ = jax.jit(forward, static_argnums=0)(graphdef, params, ids.astype(np.int32), positions,
                                                   mask.astype(np.int32))
    ours = np.asarray(logits(params, config, hidden))
    valid = mask.astype(bool)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=0)
    # The comparison is not vacuous: logits vary well beyond the tolerance.
    assert np.std(ref[valid]) > 0.05


@LAYOUTS
@pytest.mark.parametrize("case", ["llama_gqa_untied", "qwen3_qknorm_headdim"])
def test_sequence_classification_scores_match_transformers(case, scan, tmp_path):
    model = make_model(case, head="score")
    model.save_pretrained(tmp_path)
    config, graphdef, params = load_hf(tmp_path, scan_layers=scan)
    assert config.head == "score"
    ids, mask, positions = _batch()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()[:, 0]
    hidden, _ = forward(graphdef, params, ids.astype(np.int32), positions, mask.astype(np.int32))
    per_token = np.asarray(scores(params, hidden))
    last = np.array(LENGTHS) - 1  # HF pools the score at the last non-pad token
    np.testing.assert_allclose(per_token[np.arange(B), last], ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case,scan", [("llama_gqa_untied", False), ("mistral_window", False),
                                       ("qwen3_qknorm_headdim", False), ("qwen3_qknorm_headdim", True)])
def test_sft_loss_gradients_match_transformers(case, scan, tmp_path):
    """Every parameter's gradient of the next-token loss equals PyTorch autograd's.

    This covers jaxpost's hand-written backward passes (LM head log-prob,
    blocked attention, SwiGLU) against an independent implementation:
    ``loss = mean over real target slots of -log softmax(logits)[next id]``.
    """
    from jaxpost.models import token_logprobs
    from jaxpost.models.hf import weight_map

    model = make_model(case)
    model.save_pretrained(tmp_path)
    config, graphdef, params = load_hf(tmp_path, scan_layers=scan)
    ids, mask, positions = _batch()
    targets = np.concatenate([ids[:, 1:], np.zeros((B, 1), ids.dtype)], axis=1)
    weights = (mask * np.concatenate([mask[:, 1:], np.zeros((B, 1), mask.dtype)], axis=1)).astype(np.float32)

    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    logp = torch.log_softmax(out, dim=-1).gather(-1, torch.tensor(targets)[..., None])[..., 0]
    w = torch.tensor(weights)
    (-(logp * w).sum() / w.sum()).backward()
    ref = dict(model.named_parameters())

    def loss(p):
        hidden, _ = forward(graphdef, p, ids.astype(np.int32), positions, mask.astype(np.int32))
        lp = token_logprobs(p, config, hidden, targets.astype(np.int32), chunk_size=8)
        return -jnp.sum(lp * weights) / weights.sum()

    grads = jax.jit(jax.grad(loss))(params)
    checked = 0
    for hf_name, path, transpose in weight_map(config):
        leaf_path, layer = layer_index(path, scan)
        g = grads
        for k in leaf_path:
            g = g[k]
        g = np.asarray(g if layer is None else g[layer])
        expected = ref[hf_name].grad.numpy()
        np.testing.assert_allclose(g.T if transpose else g, expected, atol=2e-5, rtol=1e-3, err_msg=hf_name)
        checked += 1
    assert checked == len(weight_map(config))
    # Not vacuous: the gradients are far from zero at this tolerance.
    assert np.abs(ref["model.layers.0.mlp.gate_proj.weight"].grad.numpy()).max() > 1e-3
