"""Tokenizer, chat-template masking, per-example limits (truncation/drop events)."""

import numpy as np
import pytest

from jaxpost.data import encode, formats, prepare, tokenizer as tk

CORPUS = ["What color is the sky? Blue. And the grass? Green."] * 4


@pytest.fixture(scope="module")
def tok():
    return tk.build_tokenizer(CORPUS, vocab_size=300)


def _runs(mask):
    """Maximal runs of consecutive True indices, as (start, end) pairs."""
    idx = np.flatnonzero(mask)
    if not len(idx):
        return []
    cuts = np.flatnonzero(np.diff(idx) > 1)
    starts, ends = np.r_[idx[0], idx[cuts + 1]], np.r_[idx[cuts], idx[-1]] + 1
    return list(zip(starts.tolist(), ends.tolist()))


def test_tokenizer_specials_roundtrip_and_reload(tok, tmp_path):
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id] == [0, 1, 2]
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [3, 4]
    text = "Héllo wörld 😀, the sky!"
    ids = encode.encode_text(tok, text)
    assert tok.decode(ids) == text                    # byte-level: any text round-trips
    assert tok(text)["input_ids"] == ids              # nothing is added implicitly
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert encode.encode_text(again, text) == ids
    assert again.chat_template == tok.chat_template
    loaded = tk.load_tokenizer(tmp_path)
    assert loaded.pad_token_id == 0 and tk.stop_token_ids(loaded) == [2, 4]
    with pytest.raises(ValueError, match="below 261"):
        tk.build_tokenizer(None, vocab_size=100)
    assert len(tk.build_tokenizer(None, vocab_size=400)) == 261   # bytes + specials only


def _wordpiece_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=80, special_tokens=["[UNK]", "[SEP]"]))
    return PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]", sep_token="[SEP]")


def test_encode_text_equals_the_tokenizer_call(tok):
    """The direct backend path gives ``tokenizer(text, add_special_tokens=False)``'s ids, and falls
    back to that call when the backend is set up differently (truncation, split special tokens)."""
    texts = ["", "Blue.", "  two  spaces\nand a newline", "<|im_start|>user\nSky?<|im_end|>\n", "Héllo 😀 [SEP] x"]
    wordpiece = _wordpiece_tokenizer()
    for t in (tok, wordpiece):
        for text in texts:
            assert encode.encode_text(t, text) == t(text, add_special_tokens=False)["input_ids"], (t, text)
    assert encode.encode_text(wordpiece, "a [SEP] b")[1] == wordpiece.sep_token_id
    assert 3 in encode.encode_text(tok, "<|im_start|>")              # a special token in the text stays one id
    split = tk.build_tokenizer(CORPUS, vocab_size=300)
    split.split_special_tokens = True
    assert len(encode.encode_text(split, "<|im_start|>")) > 1        # ... unless the tokenizer splits them
    assert encode.encode_text(split, "<|im_start|>") == split("<|im_start|>", add_special_tokens=False)["input_ids"]
    cut = tk.build_tokenizer(CORPUS, vocab_size=300)
    cut.backend_tokenizer.enable_truncation(max_length=2)             # a tokenizer.json may carry this
    long = "What color is the sky? Blue."
    assert encode.encode_text(cut, long) == encode.encode_text(tok, long) and len(encode.encode_text(tok, long)) > 2


def test_chat_mask_trains_only_assistant_replies_and_end_markers(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What color is the sky?"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And the grass?"},
        {"role": "assistant", "content": "Green."},
    ]
    ids, trained = encode.encode_lm(tok, formats.normalize_row({"messages": messages}, "messages"))
    # The hand-written ChatML rendering, independent of the template machinery.
    expected = ("<|bos|><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat color is the sky?"
                "<|im_end|>\n<|im_start|>assistant\nBlue.<|im_end|>\n<|im_start|>user\nAnd the grass?"
                "<|im_end|>\n<|im_start|>assistant\nGreen.<|im_end|>\n")
    assert tok.decode(ids) == expected
    arrays = encode.lm_arrays(ids, trained, pad=0)
    np.testing.assert_array_equal(arrays["targets"][:-1], ids[1:])
    assert arrays["loss_mask"][-1] == 0
    spans = _runs(arrays["loss_mask"] > 0)
    assert [tok.decode(arrays["targets"][a:b]) for a, b in spans] == ["Blue.<|im_end|>", "Green.<|im_end|>"]
    # The prediction of the first reply token is made at the header's last token "\n".
    assert tok.decode(arrays["tokens"][spans[0][0]:spans[0][0] + 1]) == "\n"
    ids_all, trained_all = encode.encode_lm(tok, {"format": "messages", "messages": messages},
                                            train_on_prompt=True)
    assert trained_all.all() and (ids_all == ids).all()


def test_plain_prompt_completion_and_text(tok):
    ex = formats.normalize_row({"prompt": "Sky?", "completion": " Blue."}, "prompt_completion")
    ids, trained = encode.encode_lm(tok, ex)
    p = [1] + encode.encode_text(tok, "Sky?")
    c = encode.encode_text(tok, " Blue.") + [2]
    assert ids.tolist() == p + c
    assert trained.tolist() == [False] * len(p) + [True] * len(c)
    ids, trained = encode.encode_lm(tok, {"format": "text", "text": "Blue."})
    assert ids.tolist() == [1] + encode.encode_text(tok, "Blue.") + [2] and trained.all()


def test_conversational_prompt_completion(tok):
    ex = {"format": "prompt_completion", "conversational": True,
          "prompt": [{"role": "user", "content": "Sky?"}],
          "completion": [{"role": "assistant", "content": "Blue."}]}
    ids, trained = encode.encode_lm(tok, ex)
    prompt_ids = encode.encode_prompt(tok, ex["prompt"])
    assert tok.decode(prompt_ids) == "<|bos|><|im_start|>user\nSky?<|im_end|>\n<|im_start|>assistant\n"
    assert ids[:len(prompt_ids)].tolist() == prompt_ids.tolist()
    assert tok.decode(ids[trained]) == "Blue.<|im_end|>"


def test_completions_with_tool_turns_train_only_the_assistant_messages(tok):
    """Episode rows (synthesize with an environment): tool results inside a completion are context."""
    prompt = [{"role": "user", "content": "37*48?"}]
    turns = [{"role": "assistant", "content": "call"}, {"role": "tool", "content": "1776"},
             {"role": "assistant", "content": "1776"}]
    ids, trained = encode.encode_lm(tok, {"format": "prompt_completion", "conversational": True, "prompt": prompt,
                                          "completion": turns})
    assert [tok.decode(ids[a:b]) for a, b in _runs(trained)] == ["call<|im_end|>", "1776<|im_end|>"]
    _, chosen, rejected = encode.encode_preference(tok, {"prompt": prompt, "chosen": turns, "rejected": turns[:1]})
    assert [tok.decode(chosen[0][a:b]) for a, b in _runs(chosen[1])] == ["call<|im_end|>", "1776<|im_end|>"]
    assert tok.decode(rejected[0][rejected[1]]) == "call<|im_end|>"


def test_template_without_prefix_property_is_rejected():
    bad = tk.build_tokenizer(CORPUS, vocab_size=300)
    # Marks the last message specially, so a prefix renders differently.
    bad.chat_template = ("{% for m in messages %}{% if loop.last %}[LAST]{% endif %}"
                         "{{ m['role'] }}:{{ m['content'] }}\n{% endfor %}")
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(ValueError, match=r"not prefix-stable.*messages\[:1\]|messages\[:1\].*not a prefix"):
        encode.chat_encode(bad, msgs, [False, True])


def test_prepare_lm_events(tok):
    ok = {"format": "prompt_completion", "conversational": False, "prompt": "Sky?", "completion": " Blue."}
    arrays, events = prepare.prepare_lm(tok, ok, seq_len=64)
    assert events == () and arrays["loss_mask"].sum() == len(encode.encode_text(tok, " Blue.")) + 1
    empty = {**ok, "completion": ""}
    assert prepare.prepare_lm(tok, empty, 64) == (None, ("dropped_empty",))
    no_reply = {"format": "messages", "messages": [{"role": "user", "content": "hi"}]}
    assert prepare.prepare_lm(tok, no_reply, 64) == (None, ("dropped_empty",))
    n = len(encode.encode_lm(tok, ok)[0])
    arrays, events = prepare.prepare_lm(tok, ok, seq_len=n - 2)
    assert events == ("truncated",) and len(arrays["tokens"]) == n - 2
    assert prepare.prepare_lm(tok, ok, seq_len=n - 2, overlong="drop") == (None, ("dropped_too_long",))
    p = len(encode.encode_text(tok, "Sky?")) + 1          # bos + prompt: nothing trainable survives
    assert prepare.prepare_lm(tok, ok, seq_len=p) == (None, ("dropped_truncated_empty",))


def test_prepare_preference_shares_prompt_and_truncates_like_trl(tok):
    ex = formats.normalize_row({"prompt": "What color is the sky?", "chosen": " Blue.", "rejected": " Green."},
                               "preference")
    out, events = prepare.prepare_preference(tok, ex, seq_len=32)
    assert events == ()
    prompt = encode.encode_prompt(tok, ex["prompt"])
    P = len(prompt)
    for side, text in (("chosen", " Blue."), ("rejected", " Green.")):
        toks, mask, tgt = out[f"{side}_tokens"], out[f"{side}_loss_mask"], out[f"{side}_targets"]
        assert toks.shape == (32,) and toks[:P].tolist() == prompt.tolist()
        assert mask[:P - 1].sum() == 0 and mask[P - 1] == 1     # first target is the first reply token
        assert tok.decode(tgt[mask > 0]) == text + "<|eos|>"
        n = P + len(encode.encode_text(tok, text)) + 1
        assert out[f"{side}_segment_ids"].tolist() == [1] * n + [0] * (32 - n)
        assert out[f"{side}_positions"][:n].tolist() == list(range(n))
    out, events = prepare.prepare_preference(tok, ex, seq_len=P + 2, max_prompt_len=4)
    assert events == ("prompt_truncated",)
    # bos kept, then the prompt's last 3 tokens; the whole completion fits after them.
    assert out["chosen_tokens"][:4].tolist() == [1] + prompt[-3:].tolist()
    c = encode.encode_text(tok, " Blue.") + [2]
    assert out["chosen_tokens"][4:].tolist() == c + [0] * (P + 2 - 4 - len(c))
    out, events = prepare.prepare_preference(tok, ex, seq_len=P + 2, max_prompt_len=P)
    assert events == ("truncated",) and out["chosen_loss_mask"].sum() == 2   # both kept reply tokens are targets
    assert prepare.prepare_preference(tok, ex, P + 2, max_prompt_len=P, overlong="drop") == \
        (None, ("dropped_too_long",))
    assert prepare.prepare_preference(tok, {**ex, "rejected": ""}, 32) == (None, ("dropped_empty",))


def test_prepare_prompt_left_pads_and_keeps_end(tok):
    out, events = prepare.prepare_prompt(tok, "Sky?", 8)
    ids = [1] + encode.encode_text(tok, "Sky?")
    assert events == () and out["prompt_tokens"].tolist() == [0] * (8 - len(ids)) + ids
    assert out["prompt_mask"].tolist() == [0] * (8 - len(ids)) + [1] * len(ids)
    long = "What color is the sky? " * 3
    out, events = prepare.prepare_prompt(tok, long, 5)
    full = [1] + encode.encode_text(tok, long)
    assert events == ("prompt_truncated",) and out["prompt_tokens"].tolist() == [1] + full[-4:]
