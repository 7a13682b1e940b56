"""Export of a run's final model: stop tokens that transformers honours, the model card, atomic replacement."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from jaxpost.data.tokenizer import build_tokenizer, end_of_turn_id, stop_token_ids
from jaxpost.models import ModelConfig, create
from jaxpost.models.export import export
from jaxpost.models.model_card import jaxpost_version

CONFIG = ModelConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(None, vocab_size=261)


def test_end_of_turn_is_read_from_the_chat_template(tok):
    # ChatML: <|im_end|> (id 4) follows the assistant's content.
    assert end_of_turn_id(tok) == 4 and stop_token_ids(tok) == [2, 4]
    other = build_tokenizer(None, vocab_size=261)
    other.add_tokens(["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|my_turn_end|>"],
                     special_tokens=True)
    eot, mine = other.convert_tokens_to_ids("<|eot_id|>"), other.convert_tokens_to_ids("<|my_turn_end|>")
    # Llama 3's layout.
    other.chat_template = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
                           "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}")
    assert stop_token_ids(other) == [2, eot]
    # A marker no fixed list knows is still found, after whitespace.
    other.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} \n<|my_turn_end|>{% endfor %}"
    assert stop_token_ids(other) == [2, mine]
    # Llama 2's layout: eos ends a turn, and the template refuses a conversation that starts with the assistant.
    other.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                           "{{ raise_exception('roles must alternate') }}{% endif %}{% if m['role'] == 'user' %}"
                           "{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}{% else %}"
                           "{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")
    assert end_of_turn_id(other) == 2 and stop_token_ids(other) == [2]
    # Plain text ends a turn: eos only, although <|im_end|> and <|eot_id|> are in the vocabulary.
    other.chat_template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
    assert stop_token_ids(other) == [2]
    # No template: the known end-of-turn markers in the vocabulary.
    other.chat_template = None
    assert stop_token_ids(other) == [2, 4, eot]


def _always(params: dict, token: int) -> dict:
    """Weights whose every greedy choice is ``token``.

    No layer writes to the residual stream (o_proj, down_proj = 0), every
    embedding has a 1 in dimension 0, the final norm keeps only that
    dimension (so it is > 0 after the norm), and only ``token``'s LM-head
    column reads it: its logit is positive, every other one is 0.
    """
    p = jax.tree.map(np.array, params)
    for layer in p["layers"].values():
        layer["attn"]["o_proj"]["kernel"][:] = 0
        layer["mlp"]["down_proj"]["kernel"][:] = 0
    p["embed"]["embedding"][:, 0] = 1.0
    p["final_norm"]["scale"][:] = 0
    p["final_norm"]["scale"][0] = 1.0
    p["lm_head"]["kernel"][:] = 0
    p["lm_head"]["kernel"][0, token] = 10.0
    return p


def test_exported_model_stops_at_end_of_turn_in_transformers(tok, tmp_path):
    torch = pytest.importorskip("torch")
    import transformers

    _, params = create(CONFIG, seed=0)
    out = export(tmp_path / "run", CONFIG, _always(params, 4), tok)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, 4] and gen["pad_token_id"] == 0
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 2

    model = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        seq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    # The model emits <|im_end|> at once; with eos alone as the stop it would run on for all 5 tokens.
    assert seq[0, ids.shape[1]:].tolist() == [4]


def test_model_card_says_what_the_model_is_and_how_to_load_it(tok, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, params = create(CONFIG, seed=0)
    summary = {"step": 40, "loss": 0.5123456, "eval/token_accuracy": 0.75, "loss_kind": "sigmoid"}
    # A relative run directory: written under the working directory.
    out = export("runs/a", CONFIG, params, tok, method="sft", data={"train": "data/sft.jsonl", "eval": None},
                 summary=summary)
    card = (tmp_path / "runs/a/final/README.md").read_text()
    assert str(out) == str(tmp_path / "runs/a/final")
    assert card.startswith("---\nlibrary_name: transformers\n") and "- sft\n" in card
    assert "| method | sft |" in card and "| base model | random init |" in card
    assert "| train data | `data/sft.jsonl` |" in card and "eval data" not in card
    assert "| optimizer steps | 40 |" in card
    assert "| `loss` | 0.512346 |" in card and "| `eval/token_accuracy` | 0.75 |" in card
    assert "| `loss_kind` | `sigmoid` |" in card
    assert f"jaxpost {jaxpost_version()}" in card and jaxpost_version() != "unknown"
    assert "LlamaForCausalLM: 2 layers, hidden 32" in card
    assert "`<|eos|>` (2), `<|im_end|>` (4)" in card
    assert f"path = '{tmp_path / 'runs/a/final'}'" in card and "AutoModelForCausalLM.from_pretrained(path)" in card
    assert "apply_chat_template" in card

    # Exported again (a rerun): final/ is replaced whole, nothing staged is left beside it.
    (out / "stale.txt").write_text("from an earlier export")
    score = CONFIG.replace(head="score")
    _, sparams = create(score, seed=0)
    export("runs/a", score, sparams, tok, method="reward_model", init_from="runs/sft/final",
           data={"train": "pairs.jsonl"}, summary={"step": 7, "rollout": 3})
    assert sorted(p.name for p in (tmp_path / "runs/a").iterdir()) == ["final"]
    assert not (out / "stale.txt").exists()
    card = (out / "README.md").read_text()
    assert "| base model | `runs/sft/final` |" in card and "| optimizer steps | 7 |" in card
    assert "| rollouts | 3 |" in card and "Final metrics" not in card
    assert "AutoModelForSequenceClassification.from_pretrained(path)" in card and "pipeline_tag: text-classification" in card
