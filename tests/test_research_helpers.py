"""The public research helpers against hand-built arrays: HF mask -> positions/segments,
preference batches from token ids (both layouts), and the HF parameter-name map."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.algorithms.batch import PREFERENCE_KEYS, SHARED_PROMPT_KEYS
from jaxpost.data.preference import (preference_batch, preference_example, shared_prompt_batch,
                                     shared_prompt_example)
from jaxpost.models import ModelConfig, inputs_from_attention_mask, weight_map

PAD = 9


def test_attention_mask_left_and_right_padding_by_hand():
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    positions, segment_ids = inputs_from_attention_mask(mask)
    assert isinstance(positions, np.ndarray) and positions.dtype == np.int32
    np.testing.assert_array_equal(positions, [[0, 0, 0, 1, 2], [0, 1, 2, 0, 0], [0, 1, 2, 3, 4]])
    np.testing.assert_array_equal(segment_ids, [[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    # JAX arrays in, JAX arrays out, also traced under jit; bool masks work the same.
    jp, js = jax.jit(inputs_from_attention_mask)(jnp.asarray(mask, bool))
    assert isinstance(jp, jax.Array)
    np.testing.assert_array_equal(jp, positions)
    np.testing.assert_array_equal(js, segment_ids)


def test_attention_mask_with_packed_position_ids_by_hand():
    # Two rows as HF's DataCollatorWithFlattening / packed datasets give them: position ids restart per
    # sequence; the second row ends in padding, and its first sequence is a continuation (starts at 3).
    mask = np.array([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])
    pos = np.array([[0, 1, 2, 0, 1, 0, 1], [3, 4, 0, 1, 2, 0, 0]])
    positions, segment_ids = inputs_from_attention_mask(mask, position_ids=pos)
    np.testing.assert_array_equal(positions, [[0, 1, 2, 0, 1, 0, 1], [3, 4, 0, 1, 2, 0, 0]])
    np.testing.assert_array_equal(segment_ids, [[1, 1, 1, 2, 2, 3, 3], [1, 1, 2, 2, 2, 0, 0]])
    jp, js = inputs_from_attention_mask(jnp.asarray(mask), jnp.asarray(pos))
    np.testing.assert_array_equal(jp, positions)
    np.testing.assert_array_equal(js, segment_ids)


def test_preference_example_unpacked_layout_by_hand():
    out = preference_example([1, 2], [3, 4, 5], [6], seq_len=7, pad=PAD, rejected_trained=[False])
    assert set(out) == set(PREFERENCE_KEYS)
    for key, dtype in PREFERENCE_KEYS.items():
        assert out[key].dtype == dtype and out[key].shape == (7,), key
    expect = {
        "chosen_tokens": [1, 2, 3, 4, 5, PAD, PAD],
        "chosen_positions": [0, 1, 2, 3, 4, 0, 0],
        "chosen_segment_ids": [1, 1, 1, 1, 1, 0, 0],
        "chosen_targets": [2, 3, 4, 5, PAD, PAD, PAD],
        "chosen_loss_mask": [0, 1, 1, 1, 0, 0, 0],
        "rejected_tokens": [1, 2, 6, PAD, PAD, PAD, PAD],
        "rejected_positions": [0, 1, 2, 0, 0, 0, 0],
        "rejected_segment_ids": [1, 1, 1, 0, 0, 0, 0],
        "rejected_targets": [2, 6, PAD, PAD, PAD, PAD, PAD],
        "rejected_loss_mask": [0, 0, 0, 0, 0, 0, 0],  # its one reply token is not trained
    }
    for key, value in expect.items():
        np.testing.assert_array_equal(out[key], value, err_msg=key)
    with pytest.raises(ValueError, match="do not fit seq_len=4"):
        preference_example([1, 2], [3, 4, 5], [6], seq_len=4)


def test_shared_prompt_example_layout_by_hand():
    out = shared_prompt_example([1, 2], [3, 4, 5], [6], prompt_len=4, reply_len=3, pad=PAD,
                                chosen_trained=[True, False, True])
    assert set(out) == set(SHARED_PROMPT_KEYS)
    expect = {
        "prompt_tokens": [PAD, PAD, 1, 2], "prompt_mask": [0, 0, 1, 1],
        "chosen_tokens": [3, 4, 5], "chosen_mask": [1, 1, 1], "chosen_loss_mask": [1, 0, 1],
        "rejected_tokens": [6, PAD, PAD], "rejected_mask": [1, 0, 0], "rejected_loss_mask": [1, 0, 0],
    }
    for key, value in expect.items():
        np.testing.assert_array_equal(out[key], value, err_msg=key)
        assert out[key].dtype == SHARED_PROMPT_KEYS[key], key
    # Nothing predicts the first reply token after an empty prompt.
    empty = shared_prompt_example([], [3, 4], [5], prompt_len=2, reply_len=2, pad=PAD)
    np.testing.assert_array_equal(empty["prompt_mask"], [0, 0])
    np.testing.assert_array_equal(empty["chosen_loss_mask"], [0, 1])
    np.testing.assert_array_equal(empty["rejected_loss_mask"], [0, 0])
    with pytest.raises(ValueError, match="reply_len=2"):
        shared_prompt_example([1], [3, 4, 5], [6], prompt_len=2, reply_len=2)
    with pytest.raises(ValueError, match="prompt_len=1"):
        shared_prompt_example([1, 2], [3], [6], prompt_len=1, reply_len=2)


def test_batches_stack_examples():
    prompts, chosen, rejected = [[1], [1, 2, 3]], [[4, 5], [6]], [[7], [8, 8]]
    batch = preference_batch(prompts, chosen, rejected, seq_len=6, pad=PAD)
    assert all(batch[k].shape == (2, 6) for k in PREFERENCE_KEYS)
    np.testing.assert_array_equal(batch["chosen_tokens"][1], [1, 2, 3, 6, PAD, PAD])
    np.testing.assert_array_equal(batch["rejected_loss_mask"][1], [0, 0, 1, 1, 0, 0])
    shared = shared_prompt_batch(prompts, chosen, rejected, prompt_len=3, reply_len=2, pad=PAD)
    np.testing.assert_array_equal(shared["prompt_tokens"], [[PAD, PAD, 1], [1, 2, 3]])
    np.testing.assert_array_equal(shared["rejected_tokens"], [[7, PAD], [8, 8]])
    with pytest.raises(ValueError, match="as many"):
        preference_batch(prompts, chosen, rejected[:1], seq_len=6)


def test_weight_map_by_hand():
    config = ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                         num_kv_heads=1, qk_norm=True)
    expect = [("model.embed_tokens.weight", ("embed", "embedding"), False)]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        expect.append((f"model.layers.0.self_attn.{name}.weight", ("layers", 0, "attn", name, "kernel"), True))
    expect += [("model.layers.0.self_attn.q_norm.weight", ("layers", 0, "attn", "q_norm", "scale"), False),
               ("model.layers.0.self_attn.k_norm.weight", ("layers", 0, "attn", "k_norm", "scale"), False)]
    for name in ("gate_proj", "up_proj", "down_proj"):
        expect.append((f"model.layers.0.mlp.{name}.weight", ("layers", 0, "mlp", name, "kernel"), True))
    expect += [("model.layers.0.input_layernorm.weight", ("layers", 0, "input_norm", "scale"), False),
               ("model.layers.0.post_attention_layernorm.weight", ("layers", 0, "post_attn_norm", "scale"), False),
               ("model.norm.weight", ("final_norm", "scale"), False),
               ("lm_head.weight", ("lm_head", "kernel"), True)]
    assert weight_map(config) == expect
