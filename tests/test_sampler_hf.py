"""jaxpost greedy decoding reproduces transformers' ``generate(do_sample=False)`` token for token (both layer layouts)."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxpost.generate.sampler import SamplingConfig, left_pad, sample  # noqa: E402
from jaxpost.models.hf import load_hf  # noqa: E402

EOS, PAD = 2, 0
PROMPTS = [[1, 17, 33, 90, 5, 61, 7], [1, 44, 12], [1, 70, 71, 72, 73], [1]]
N = 12


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=500.0,
        # Large init: peaked, context-dependent next-token distributions (argmax ties are then
        # far apart, and the continuations differ between prompts).
        initializer_range=0.3, bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("hf_llama")
    model.save_pretrained(path)
    return path, model


def hf_greedy(model, prompts, eos):
    tokens, mask = left_pad(prompts, pad_token_id=PAD)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor(tokens, dtype=torch.long),
                             attention_mask=torch.tensor(mask, dtype=torch.long), do_sample=False,
                             max_new_tokens=N, min_new_tokens=0, eos_token_id=eos, pad_token_id=PAD)
    gen = out[:, tokens.shape[1]:].numpy()
    # HF stops when every row is done; pad its output to N like ours.
    return np.pad(gen, ((0, 0), (0, N - gen.shape[1])), constant_values=PAD)


LAYOUTS = pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])


@pytest.mark.parametrize("stop,scan", [(None, False), ("from_hf", False), ("from_hf", True)],
                         ids=["no_stop", "stop", "stop-scanned"])
def test_greedy_matches_transformers_generate(hf_dir, stop, scan):
    path, hf_model = hf_dir
    config, graphdef, params = load_hf(path, scan_layers=scan)
    if stop is None:
        eos = None
        want = hf_greedy(hf_model, PROMPTS, eos)
    else:
        # Pick a stop id that greedy reaches mid-way in some rows, so per-row stopping is exercised.
        free = hf_greedy(hf_model, PROMPTS, None)
        eos = int(free[0, 4])
        want = hf_greedy(hf_model, PROMPTS, eos)
    tokens, mask = left_pad(PROMPTS, pad_token_id=PAD)
    s = SamplingConfig(max_new_tokens=N, temperature=0.0, stop_token_ids=() if eos is None else (eos,),
                       pad_token_id=PAD)
    out = jax.device_get(sample(graphdef, params, config, tokens, mask, jax.random.key(0), s))
    np.testing.assert_array_equal(out.tokens, want)
    assert len({tuple(r) for r in want.tolist()}) == len(PROMPTS)
    if eos is not None:
        assert out.finished[0] and out.lengths[0] <= 5
        for b in range(len(PROMPTS)):
            hit = np.flatnonzero(want[b] == eos)
            assert out.lengths[b] == (hit[0] + 1 if hit.size else N)


@LAYOUTS
def test_logprobs_match_transformers(hf_dir, scan):
    """Sampled log-probs equal log_softmax of HF's logits of the full sequence."""
    path, hf_model = hf_dir
    config, graphdef, params = load_hf(path, scan_layers=scan)
    tokens, mask = left_pad(PROMPTS, pad_token_id=PAD)
    s = SamplingConfig(max_new_tokens=N, temperature=0.0, pad_token_id=PAD)
    out = jax.device_get(sample(graphdef, params, config, tokens, mask, jax.random.key(0), s))
    seq = np.concatenate([tokens, out.tokens], axis=1)
    att = np.concatenate([mask, np.ones_like(out.tokens)], axis=1)
    pos = np.maximum(np.cumsum(att, axis=1) - 1, 0)
    with torch.no_grad():
        z = hf_model(input_ids=torch.tensor(seq, dtype=torch.long), attention_mask=torch.tensor(att),
                     position_ids=torch.tensor(pos, dtype=torch.long)).logits.double()
    logp = torch.log_softmax(z, -1).numpy()
    P = tokens.shape[1]
    ref = np.take_along_axis(logp[:, P - 1:P - 1 + N], out.tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(out.logprobs, ref, atol=2e-5)


def test_greedy_with_a_repetition_penalty_matches_transformers_generate(hf_dir):
    """``repetition_penalty`` as transformers applies it: over the prompt and the tokens sampled so far.

    Each prompt goes to transformers alone: with left padding, its penalty
    would also count the pad id, which is not in a row's context here.
    """
    path, hf_model = hf_dir
    config, graphdef, params = load_hf(path)
    want = []
    for prompt in PROMPTS:
        with torch.no_grad():
            gen = hf_model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones((1, len(prompt)),
                                    dtype=torch.long), do_sample=False, max_new_tokens=N, min_new_tokens=N,
                                    repetition_penalty=1.6, eos_token_id=None, pad_token_id=PAD)
        want.append(gen[0, len(prompt):].numpy())
    tokens, mask = left_pad(PROMPTS, pad_token_id=PAD)
    s = SamplingConfig(max_new_tokens=N, temperature=0.0, pad_token_id=PAD, repetition_penalty=1.6)
    out = jax.device_get(sample(graphdef, params, config, tokens, mask, jax.random.key(0), s))
    np.testing.assert_array_equal(out.tokens, np.stack(want))
    # The penalty changed what greedy picks (the check is not vacuous).
    plain = hf_greedy(hf_model, PROMPTS, None)
    assert (plain != out.tokens).any()
