"""generate_to_jsonl: prompt file -> one row per completion, matching the sampler run directly."""

import json

import jax
import pytest

from jaxpost.data.encode import encode_prompt
from jaxpost.data.tokenizer import build_tokenizer, stop_token_ids
from jaxpost.generate.generate_file import generate_to_jsonl
from jaxpost.generate.sampler import Sampler, SamplingConfig, left_pad
from jaxpost.models import ModelConfig, create, save_hf
from jaxpost.paths import jsonl_lines

ROWS = [
    {"prompt": "12+7=", "answer": 19},
    {"prompt": [{"role": "user", "content": "What is 3*4?"}], "answer": 12, "id": "conv"},
    {"prompt": "5-9=", "answer": -4, "completion": "overridden"},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    tok = build_tokenizer(["12+7=19", "What is 3*4? 12", "5-9=-4"] * 5, vocab_size=300)
    tok.save_pretrained(tmp / "tok")
    config = ModelConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2)
    graphdef, params = create(config, seed=3)
    params = jax.tree.map(lambda x: x * 20.0 if x.ndim == 2 else x, params)
    save_hf(tmp / "model", config, params)
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    return tmp, tok, config, graphdef, params, prompts


@pytest.mark.slow
def test_rows_fields_and_completions(setup):
    tmp, tok, config, graphdef, params, prompts = setup
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0)
    out = tmp / "out" / "gen.jsonl"
    n = generate_to_jsonl(str(tmp / "model"), str(tmp / "tok"), prompts, out, sampling,
                          n_samples_per_prompt=2, batch_size=2, seed=4)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert n == len(rows) == 6
    assert [r["sample_index"] for r in rows] == [0, 1] * 3
    for k, r in enumerate(rows):
        src = ROWS[k // 2]
        assert r["prompt"] == src["prompt"] and r["answer"] == src["answer"]
        assert isinstance(r["completion"], str)
    assert rows[2]["id"] == "conv" and "id" not in rows[0]

    # The same draws from the sampler called directly: batches of 2 prompts, key fold_in(seed, batch).
    s = sampling.replace(group_size=2, stop_token_ids=tuple(stop_token_ids(tok)))
    sampler = Sampler(graphdef, config, s)
    ids = [encode_prompt(tok, r["prompt"]) for r in ROWS]
    # Conversational prompts go through the chat template with the assistant header.
    assert tok.decode(ids[1]).endswith("<|im_start|>assistant\n")
    assert tok.decode(ids[0]).startswith("<|bos|>")
    want = []
    for k, chunk in enumerate([ids[:2], ids[2:]]):
        res = jax.device_get(sampler(params, *left_pad(chunk), jax.random.fold_in(jax.random.PRNGKey(4), k)))
        for r in range(res.tokens.shape[0]):
            keep = int(res.lengths[r]) - int(res.finished[r])
            want.append(tok.decode(res.tokens[r, :keep].tolist(), skip_special_tokens=True))
    assert [r["completion"] for r in rows] == want
    assert len(set(want)) > 1

    # Same seed, same file -> same output; another seed -> different samples.
    out2 = tmp / "gen2.jsonl"
    generate_to_jsonl((config, graphdef, params), tok, prompts, out2, sampling, 2, 2, seed=4)
    assert out2.read_text() == out.read_text()
    generate_to_jsonl((config, graphdef, params), tok, prompts, out2, sampling, 2, 2, seed=5)
    assert out2.read_text() != out.read_text()


def test_bad_prompt_files(setup, tmp_path):
    _, tok, config, graphdef, params, _ = setup
    model = (config, graphdef, params)
    s = SamplingConfig(max_new_tokens=2)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": "b"\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed JSON"):
        generate_to_jsonl(model, tok, bad, tmp_path / "o.jsonl", s)
    bad.write_text('{"prompt": "a"}\n\n{"question": "b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: no 'prompt' field \(fields: \['question'\]\)"):
        generate_to_jsonl(model, tok, bad, tmp_path / "o.jsonl", s)
    bad.write_text('{"prompt": [{"role": "user"}]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: 'prompt' must be a string or a non-empty list"):
        generate_to_jsonl(model, tok, bad, tmp_path / "o.jsonl", s)
    bad.write_text('{"prompt": "a long prompt that has many tokens"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: prompt has \d+ tokens, more than max_prompt_length=3"):
        generate_to_jsonl(model, tok, bad, tmp_path / "o.jsonl", s, max_prompt_length=3)
    small = (config.replace(vocab_size=100), graphdef, params)
    with pytest.raises(ValueError, match="vocab_size is 100"):
        generate_to_jsonl(small, tok, bad, tmp_path / "o.jsonl", s)


def _snapshot(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_failures_leave_an_existing_output_untouched(setup, tmp_path, monkeypatch):
    """Prompts are all read and checked first and the output is replaced atomically: a failure writes nothing."""
    import jaxpost.generate.generate_file as gf
    from jaxpost.errors import UserError

    _, tok, config, graphdef, params, _ = setup
    model, s = (config, graphdef, params), SamplingConfig(max_new_tokens=2)
    out = tmp_path / "out" / "samples.jsonl"
    out.parent.mkdir()
    out.write_bytes(b'{"old": "output"}\n')
    before = _snapshot(out.parent)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c"\n')  # malformed last line
    with pytest.raises(UserError, match=r"bad.jsonl:3: malformed JSON"):
        generate_to_jsonl(model, tok, bad, out, s, batch_size=1)
    bad.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "a much longer prompt"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:3: prompt has \d+ tokens"):
        generate_to_jsonl(model, tok, bad, out, s, batch_size=1, max_prompt_length=4)
    assert _snapshot(out.parent) == before

    # A run that fails after sampling has started (here while decoding the second batch).
    calls = []

    def failing_decode(*args):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("interrupted")
        return "x"

    monkeypatch.setattr(gf, "_decode", failing_decode)
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    with pytest.raises(RuntimeError, match="interrupted"):
        generate_to_jsonl(model, tok, good, out, s, batch_size=1)
    assert len(calls) == 2 and _snapshot(out.parent) == before  # no partial file, no temporary left


def test_cli_refuses_out_equal_to_prompts_and_accepts_relative_paths(setup, tmp_path, monkeypatch, capsys):
    from jaxpost.cli import main

    tmp, *_ = setup
    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes((tmp / "prompts.jsonl").read_bytes())
    original = prompts.read_bytes()
    base = ["generate", "--model", str(tmp / "model"), "--tokenizer", str(tmp / "tok"), "--prompts", "prompts.jsonl",
            "--n", "2", "--max_new_tokens", "3", "--batch_size", "2"]
    # The same file under another name: refused before anything loads, the prompts kept.
    assert main(base + ["--out", "./sub/../prompts.jsonl"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxpost: error: ") and "is the prompts file" in err and err.count("\n") == 1
    assert prompts.read_bytes() == original
    # A relative --out is written under the working directory.
    assert main(base + ["--out", "rel/samples.jsonl"]) == 0
    rows = [json.loads(line) for line in jsonl_lines((tmp_path / "rel" / "samples.jsonl").read_text(encoding="utf-8"))]
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in ROWS for _ in range(2)]
    assert [p.name for p in (tmp_path / "rel").iterdir()] == ["samples.jsonl"]
    # A malformed prompts file is an error (exit 2) that leaves the earlier output as it was.
    kept = (tmp_path / "rel" / "samples.jsonl").read_bytes()
    prompts.write_text('{"prompt": "a"}\nnot json\n')
    assert main(base + ["--out", "rel/samples.jsonl"]) == 2
    assert "prompts.jsonl:2: malformed JSON" in capsys.readouterr().err
    assert (tmp_path / "rel" / "samples.jsonl").read_bytes() == kept


def test_cli_sampling_flags_reach_the_sampler(setup, tmp_path, monkeypatch):
    """``--temperature --top_k --top_p --min_p --repetition_penalty`` sample what that SamplingConfig samples."""
    from jaxpost.cli import main

    tmp, tok, config, graphdef, params, prompts = setup
    monkeypatch.chdir(tmp_path)
    flags = {"temperature": 0.7, "top_k": 40, "top_p": 0.95, "min_p": 0.01, "repetition_penalty": 3.0}
    argv = ["generate", "--model", str(tmp / "model"), "--tokenizer", str(tmp / "tok"), "--prompts", str(prompts),
            "--n", "2", "--max_new_tokens", "8", "--seed", "1", "--out", "cli.jsonl"]
    assert main(argv + [x for k, v in flags.items() for x in (f"--{k}", str(v))]) == 0
    model = (config, graphdef, params)
    for name, sampling in (("same.jsonl", SamplingConfig(max_new_tokens=8, **flags)),
                           ("plain.jsonl", SamplingConfig(max_new_tokens=8, **{**flags, "repetition_penalty": 1.0}))):
        generate_to_jsonl(model, tok, prompts, tmp_path / name, sampling, n_samples_per_prompt=2, batch_size=8, seed=1)
    assert (tmp_path / "cli.jsonl").read_text() == (tmp_path / "same.jsonl").read_text()
    assert (tmp_path / "cli.jsonl").read_text() != (tmp_path / "plain.jsonl").read_text()


@pytest.mark.parametrize("command", ["generate", "synthesize"])
@pytest.mark.parametrize("flag,value,message", [
    ("--n", "0", "argument --n: must be >= 1, got 0"),
    ("--max_new_tokens", "0", "argument --max_new_tokens: must be >= 1, got 0"),
    ("--batch_size", "-2", "argument --batch_size: must be >= 1, got -2"),
    ("--temperature", "-0.5", "argument --temperature: must be >= 0, got -0.5"),
    ("--top_k", "-1", "argument --top_k: must be >= 0, got -1"),
    ("--top_p", "1.5", "argument --top_p: must be in (0, 1], got 1.5"),
    ("--top_p", "0", "argument --top_p: must be in (0, 1], got 0.0"),
    ("--min_p", "1.5", "argument --min_p: must be in [0, 1], got 1.5"),
    ("--repetition_penalty", "0", "argument --repetition_penalty: must be > 0, got 0.0"),
    ("--batch_size", "two", "argument --batch_size: invalid int value: 'two'"),
])
def test_cli_flags_out_of_range_name_the_flag(command, flag, value, message, capsys, tmp_path):
    from jaxpost.cli import main

    argv = [command, "--model", str(tmp_path), "--prompts", "p.jsonl", "--out", str(tmp_path / "out"), flag, value]
    with pytest.raises(SystemExit) as e:  # argparse: before anything is read or loaded
        main(argv + (["--reward", "exact_match"] if command == "synthesize" else []))
    assert e.value.code == 2 and f"jaxpost {command}: error: {message}" in capsys.readouterr().err
