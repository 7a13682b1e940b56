"""Models, tokenizers and datasets by Hugging Face Hub name, through a local hub cache (offline)."""

import json
import time

import datasets
import numpy as np
import pytest

from jaxpost import hub, models
from jaxpost.data import build_tokenizer, check_run_inputs, load_rows, load_tokenizer
from jaxpost.errors import UserError
from jaxpost.models.config import ModelConfig
from jaxpost.models.hf import load_hf, save_hf

datasets.disable_progress_bars()

REV = "0123456789abcdef0123456789abcdef01234567"
TINY = ModelConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1)


def cache_snapshot(cache, repo_type: str, repo_id: str):
    """An empty snapshot directory in huggingface_hub's cache layout, with ``refs/main`` pointing at it."""
    root = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snap = root / "snapshots" / REV
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(REV)
    return snap


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A hub cache in tmp_path holding the model ``org/tiny`` (with tokenizer) and the dataset ``org/chat``."""
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # relative names must not find a local directory by accident
    model_dir = cache_snapshot(cache, "model", "org/tiny")
    _, params = models.create(TINY, seed=0)
    save_hf(model_dir, TINY, params)
    build_tokenizer(None, vocab_size=261).save_pretrained(model_dir)
    ds_dir = cache_snapshot(cache, "dataset", "org/chat")
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (ds_dir / "data").mkdir()
    (ds_dir / "data" / "train.jsonl").write_text(json.dumps(chat) + "\n" + json.dumps(chat) + "\n")
    (ds_dir / "data" / "test.jsonl").write_text(json.dumps(chat) + "\n")
    (ds_dir / "plain").mkdir()
    (ds_dir / "plain" / "train.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"}\n')
    (ds_dir / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train.jsonl\n"
        "  - split: test\n    path: data/test.jsonl\n- config_name: plain\n  data_files:\n  - split: train\n"
        "    path: plain/train.jsonl\n---\n")
    return {"cache": cache, "model": model_dir, "params": params}


def test_model_tokenizer_and_dataset_load_by_name_offline(hub_cache):
    assert hub.resolve_model_dir("org/tiny") == str(hub_cache["model"])
    config, _, params = load_hf("org/tiny")
    assert config.vocab_size == TINY.vocab_size and config.num_layers == TINY.num_layers
    np.testing.assert_array_equal(np.asarray(params["embed"]["embedding"]),
                                  np.asarray(hub_cache["params"]["embed"]["embedding"]))
    assert len(load_tokenizer("org/tiny")) == 261

    assert len(load_rows("org/chat")) == 2                          # default config, split train
    assert len(load_rows("org/chat@test")) == 1                     # split in the name
    assert load_rows("org/chat:plain")["text"] == ["a", "b", "c"]   # config in the name
    assert len(load_rows("org/chat", split="test")) == 1            # TRL-style separate keys
    assert len(load_rows("org/chat", config="plain")) == 3
    with pytest.raises(UserError, match="org/chat@validation.*validation"):
        load_rows("org/chat@validation")

    # A run by names only: the tokenizer defaults to the model, the data comes from the cache.
    tok, rows = check_run_inputs("sft", train_data="org/chat", kind="lm", init_from="org/tiny",
                                 eval_data="org/chat@test")
    assert len(tok) == 261 and len(rows) == 2


def test_local_directory_wins_over_a_cached_name(hub_cache, tmp_path):
    local = tmp_path / "org" / "tiny"
    tok = build_tokenizer(None)
    tok.add_tokens(["<local-only>"])
    tok.save_pretrained(local)
    assert len(load_tokenizer("org/tiny")) == 262          # relative to the working directory
    assert hub.resolve_tokenizer_dir("org/tiny") == str(local)


def test_missing_names_are_fast_user_errors(hub_cache):
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"tokenizer='mytok/tokenizer' not found: no local directory .*mytok"
                                        r"/tokenizer.*Hugging Face cache .*hub.*HF_HUB_OFFLINE=1"):
        load_tokenizer("mytok/tokenizer")
    with pytest.raises(UserError, match=r"model 'org/missing' not found.*Hugging Face cache"):
        load_hf("org/missing")
    with pytest.raises(UserError, match=r"init_from='org/missing' not found"):
        hub.resolve_model_dir("org/missing")
    with pytest.raises(UserError, match=r"data 'org/missing-ds' could not be loaded.*Hugging Face cache"):
        load_rows("org/missing-ds")
    with pytest.raises(UserError, match=r"runs/sft/final.*does not exist.*Hub name"):
        load_tokenizer("runs/sft/final")   # not a valid repo id: no Hub lookup, no "Repo id must be" error
    assert time.perf_counter() - start < 5.0


def test_a_cached_model_without_a_tokenizer_is_named(hub_cache):
    bare = cache_snapshot(hub_cache["cache"], "model", "org/bare")
    (bare / "config.json").write_text((hub_cache["model"] / "config.json").read_text())
    with pytest.raises(UserError, match=r"sft.init_from \(used as the tokenizer\)='org/bare' not found.*"
                                        r"give an existing tokenizer directory"):
        check_run_inputs("sft", train_data="org/chat", kind="lm", init_from="org/bare")
