"""`load_tokenizer` loads generic tokenizers directly, the same tokenizer `AutoTokenizer` gives, without torch; and a
`jaxpost train` run with torch installed never imports it (3 s of every command's start)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli_env import WITHOUT_TORCH
from jaxpost.data.tokenizer import PLAIN_MODEL_TYPES, load_tokenizer, plain_tokenizer_dir
from pipeline_utils import tiny_model_dir

TEXTS = ["hello there", "<|im_start|>user\nabc<|im_end|>\n<|pad|><|eos|>", "ünïcödé  spaces\t\n", ""]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tok") / "model")


def _with_model_type(src, dst, model_type):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["model_type"] = model_type
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _same_tokenizer(ours, theirs):
    assert type(ours) is type(theirs)
    assert ours.special_tokens_map == theirs.special_tokens_map
    assert (ours.pad_token_id, ours.eos_token_id, ours.bos_token_id) == \
        (theirs.pad_token_id, theirs.eos_token_id, theirs.bos_token_id)
    assert ours.chat_template == theirs.chat_template and len(ours) == len(theirs)
    for text in TEXTS:
        assert ours(text).input_ids == theirs(text).input_ids, text
        assert ours(text, add_special_tokens=False).input_ids == theirs(text, add_special_tokens=False).input_ids
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert ours.apply_chat_template(chat, tokenize=False) == theirs.apply_chat_template(chat, tokenize=False)


def test_plain_model_types_are_the_ones_auto_tokenizer_does_not_override():
    from transformers.models.auto.tokenization_auto import (MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS,
                                                            TOKENIZER_MAPPING_NAMES)

    for model_type in filter(None, PLAIN_MODEL_TYPES):
        assert model_type not in MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS, model_type
        assert TOKENIZER_MAPPING_NAMES.get(model_type) != "MistralCommonBackend", model_type


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen3", "no config", "qwen2"])
def test_the_direct_load_is_what_auto_tokenizer_loads(model_dir, tmp_path, model_type):
    from transformers import AutoTokenizer

    if model_type == "no config":
        where = shutil.copytree(model_dir, tmp_path / "tok")
        (where / "config.json").unlink()
    else:
        where = _with_model_type(model_dir, tmp_path / "m", model_type)
    # qwen2 is one of transformers' models whose Hub tokenizers declare the wrong class: AutoTokenizer decides.
    assert plain_tokenizer_dir(where) == (model_type != "qwen2")
    _same_tokenizer(load_tokenizer(where), AutoTokenizer.from_pretrained(where))


def test_directories_that_need_auto_tokenizer_go_through_it(model_dir, tmp_path):
    assert plain_tokenizer_dir(model_dir)
    for change in ("auto_map", "class", "tekken", "no tokenizer.json", "bad json"):
        where = shutil.copytree(model_dir, tmp_path / change.replace(" ", "_"))
        declared = json.loads((where / "tokenizer_config.json").read_text())
        if change == "auto_map":
            declared["auto_map"] = {"AutoTokenizer": [None, "my_code.MyTokenizer"]}
        elif change == "class":
            declared["tokenizer_class"] = "LlamaTokenizer"
        elif change == "tekken":
            (where / "tekken.json").write_text("{}")
        elif change == "no tokenizer.json":
            (where / "tokenizer.json").unlink()
        (where / "tokenizer_config.json").write_text("{" if change == "bad json" else json.dumps(declared))
        assert not plain_tokenizer_dir(where), change


def _torch_importable_env():
    # As in most users' installs; the suite's other subprocesses hide torch (tests/cli_env.py).
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                        if p and p != str(WITHOUT_TORCH))
    env.pop("XLA_FLAGS", None)
    return env


def test_loading_a_plain_tokenizer_imports_no_torch(model_dir, tmp_path):
    env = _torch_importable_env()
    code = ("import sys, importlib.util; from jaxpost.data import load_tokenizer; tok = load_tokenizer(sys.argv[1]); "
            "assert tok('hi').input_ids and importlib.util.find_spec('torch'); print('torch' in sys.modules)")
    for where, imports_torch in ((model_dir, False), (_with_model_type(model_dir, tmp_path / "q", "qwen2"), True)):
        out = subprocess.run([sys.executable, "-c", code, str(where)], env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.strip() == str(imports_torch), where  # qwen2: AutoTokenizer, which imports torch


@pytest.mark.slow
def test_a_run_with_torch_installed_never_imports_it(model_dir, tmp_path):
    """Two SFT steps through the CLI, TensorBoard on (tensorboardX's writer imports torch unless kept from it)."""
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {i}", "completion": f"{i} said"}) + "\n" for i in range(16)))
    code = ("import sys; from jaxpost.cli import main; rc = main(sys.argv[1:]); "
            "print('torch' in sys.modules, flush=True); sys.exit(rc)")
    args = ["--gin_file=configs/runs/sft.gin", f"--gin.sft.run_dir={tmp_path / 'run'}", f"--gin.sft.train_data={data}",
            f"--gin.sft.init_from={model_dir}", "--gin.LoopConfig.num_steps=2", "--gin.sft.seq_len=32"]
    out = subprocess.run([sys.executable, "-c", code, "train", *args], env=_torch_importable_env(), capture_output=True,
                         text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))  # TensorBoard still written
