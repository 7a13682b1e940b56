"""What every run checks on its tokenizer and data before a model loads: one UserError naming what and where."""

import json
import re
import time

import datasets
import pytest

from jaxpost.data import build_tokenizer, check_rows, check_run_inputs, load_rows, load_tokenizer
from jaxpost.errors import UserError
from jaxpost.models.config import ModelConfig

datasets.disable_progress_bars()

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
MODEL = ModelConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1)


def write_jsonl(path, rows, blank_after: int | None = None):
    lines = [json.dumps(r) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer"
    build_tokenizer(None).save_pretrained(path)   # 261 tokens, ChatML template
    return path


def test_missing_tokenizer_directory_is_a_fast_user_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"tokenizer='mytok/tokenizer' not found: no local directory "
                                        rf"{tmp_path}/mytok/tokenizer, and as a Hub name it is not in the "
                                        r"Hugging Face cache"):
        load_tokenizer("mytok/tokenizer")
    with pytest.raises(UserError, match=rf"tokenizer='{tmp_path}/no/such/dir' does not exist"):
        load_tokenizer(tmp_path / "no" / "such" / "dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"tokenizer directory .*empty .* has no tokenizer files \(tokenizer.json"):
        load_tokenizer("empty")
    assert time.perf_counter() - start < 5.0


def test_tokenizer_larger_than_the_model_vocab_fails_before_the_model_loads(tok_dir, tmp_path, monkeypatch):
    import importlib
    sft_module = importlib.import_module("jaxpost.recipes.sft")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(sft_module, "load_model", no_model)
    data = write_jsonl(tmp_path / "train.jsonl", [CHAT, CHAT])
    with pytest.raises(UserError, match=r"sft: the tokenizer .*tokenizer has 261 tokens but the model's vocab_size "
                                        r"is 100 \(ModelConfig.vocab_size\)"):
        sft_module.sft(run_dir=str(tmp_path / "run"), train_data=str(data), tokenizer=str(tok_dir),
                       model=MODEL.replace(vocab_size=100))
    assert not (tmp_path / "run").exists()   # nothing was started
    # From init_from's config.json alone: no weights are read (there are none).
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"vocab_size": 200, "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(UserError, match=rf"261 tokens but the model's vocab_size is 200 \({ckpt}/config.json\)"):
        sft_module.sft(run_dir=str(tmp_path / "run"), train_data=str(data), tokenizer=str(tok_dir),
                       init_from=str(ckpt))


def test_tokenizer_defaults_to_init_from_and_one_of_them_is_needed(tok_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [CHAT])
    with pytest.raises(UserError, match=r"sft: no tokenizer: set sft.tokenizer .* or sft.init_from"):
        check_run_inputs("sft", train_data=str(data), kind="lm", model=MODEL)
    ckpt = tmp_path / "ckpt"
    build_tokenizer(None).save_pretrained(ckpt)
    (ckpt / "config.json").write_text(json.dumps({"vocab_size": 264}))
    tok, rows = check_run_inputs("sft", train_data=str(data), kind="lm", init_from=str(ckpt))
    assert len(tok) == 261 and len(rows) == 1
    with pytest.raises(UserError, match=r"no model: set sft.init_from .* or sft.model \(a ModelConfig"):
        check_run_inputs("sft", train_data=str(data), kind="lm", tokenizer=str(tok_dir))


@pytest.mark.parametrize("run", ["sft", "dpo", "reward_model", "grpo", "ppo", "online_dpo", "distill"])
def test_every_run_checks_its_inputs_before_the_run_dir(run, tmp_path):
    import importlib

    import gin
    gin.clear_config()  # bindings another test left (e.g. of ModelConfig) would change which check comes first
    module = {"reward_model": "reward"}.get(run, run)
    fn = getattr(importlib.import_module(f"jaxpost.recipes.{module}"), run)
    kwargs = {"teacher_from": "teacher"} if run == "distill" else {}
    with pytest.raises(UserError, match=rf"{run}: no tokenizer: set {run}.tokenizer"):
        fn(run_dir=str(tmp_path / "run"), train_data=str(tmp_path / "train.jsonl"), **kwargs)
    assert not (tmp_path / "run").exists()


def test_synthesize_takes_its_tokenizer_from_the_model_dir(tmp_path):
    from jaxpost.recipes.synthetic import synthesize
    with pytest.raises(UserError, match=r"synthesize.model_dir \(used as the tokenizer\)='.*nope' does not exist"):
        synthesize(model_dir=str(tmp_path / "nope"), prompts=str(tmp_path / "p.jsonl"), out_dir=str(tmp_path / "o"),
                   scorer=lambda prompts, completions, **kw: [0.0] * len(completions))


@pytest.mark.parametrize("layout", ["uniform", "ragged", "list"])
def test_unknown_chat_role_is_named_with_file_row_and_allowed_roles(tmp_path, layout):
    bot = {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]}
    if layout == "ragged":   # messages whose keys differ are stored as JSON, not Arrow structs
        bot["messages"][0]["name"] = "ann"
    rows = [CHAT, CHAT, bot]
    if layout == "list":
        with pytest.raises(UserError, match=r"row 3: messages\[1\] has unknown role 'bot'; allowed roles: "
                                            r"system, user, assistant, tool"):
            check_rows(rows)
        return
    path = write_jsonl(tmp_path / "chat.jsonl", rows, blank_after=1)
    with pytest.raises(UserError, match=rf"row 3 of {path} \(line 4\): messages\[1\] has unknown role 'bot'; "
                                        r"allowed roles: system, user, assistant, tool"):
        load_rows(path)


def test_conversational_data_needs_a_chat_template(tmp_path):
    plain_tok = build_tokenizer(None)
    plain_tok.chat_template = None
    plain_tok.save_pretrained(tmp_path / "plain_tok")
    chat = write_jsonl(tmp_path / "chat.jsonl", [CHAT])
    with pytest.raises(UserError, match=rf"sft.train_data='{chat}' is conversational \(messages: lists of messages\), "
                                        rf"but the tokenizer {tmp_path}/plain_tok has no chat template"):
        check_run_inputs("sft", train_data=str(chat), kind="lm", tokenizer=str(tmp_path / "plain_tok"), model=MODEL)
    user = [{"role": "user", "content": "sky?"}]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": user, "chosen": [{"role": "assistant", "content": "blue"}],
                                                    "rejected": [{"role": "assistant", "content": "red"}]}])
    with pytest.raises(UserError, match=r"dpo.train_data=.*pairs.jsonl' is conversational \(preference"):
        check_run_inputs("dpo", train_data=str(pairs), kind="preference", tokenizer=str(tmp_path / "plain_tok"),
                         model=MODEL)
    # Plain text needs no template.
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "hello"}])
    tok, _ = check_run_inputs("sft", train_data=str(text), kind="lm", tokenizer=str(tmp_path / "plain_tok"),
                              model=MODEL)
    assert tok.chat_template is None


def test_data_of_the_wrong_format_for_the_method_is_named(tok_dir, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    with pytest.raises(UserError, match=r"sft.train_data=.*pairs.jsonl' is 'preference' data, but sft takes text "
                                        r"or messages or prompt_completion rows"):
        check_run_inputs("sft", train_data=str(pairs), kind="lm", tokenizer=str(tok_dir), model=MODEL)
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "a"}])
    with pytest.raises(UserError, match=r"dpo.eval_data=.*text.jsonl' is 'text' data"):
        check_run_inputs("dpo", train_data=str(pairs), eval_data=str(text), kind="preference", tokenizer=str(tok_dir),
                         model=MODEL)


def test_a_data_file_that_cannot_be_read_is_named_with_the_key_that_gave_it(tok_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a"}])
    with pytest.raises(UserError) as raised:
        check_run_inputs("grpo", train_data=str(prompts), eval_data="data/held_out.jsonl", kind="prompt",
                         tokenizer=str(tok_dir), model=MODEL)
    assert str(raised.value) == (f"grpo.eval_data: Data file or directory data/held_out.jsonl does not exist (looked "
                                 f"in {tmp_path}/data/held_out.jsonl); check the path, or give a Hub dataset name "
                                 f"'org/name'")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(UserError, match=r"^sft.train_data: bad.jsonl:2: "):
        check_run_inputs("sft", train_data="bad.jsonl", kind="lm", tokenizer=str(tok_dir), model=MODEL)


def test_row_and_line_numbers_are_one_based(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": null}\n')
    with pytest.raises(UserError, match=rf"row 2 of {path} \(line 3\): required field 'completion' is missing"):
        load_rows(path)
    path.write_text('{"text": "a"}\n{"text": "b"\n')
    with pytest.raises(UserError, match=rf"{path}:2: malformed JSON line"):
        load_rows(path)
    array = tmp_path / "bad.json"
    array.write_text('[{"text": "a"}, [1]]')
    with pytest.raises(UserError, match=r"element 2 of the top-level array is a list"):
        load_rows(array)
    pairs = tmp_path / "same.jsonl"
    pairs.write_text('{"chosen": "x y", "rejected": "x z"}\n{"chosen": "same", "rejected": "same"}\n')
    with pytest.raises(UserError, match=rf"row 2 of {pairs} \(line 2\): 'chosen' and 'rejected' are identical"):
        load_rows(pairs)  # implicit prompts are extracted while validating


@pytest.mark.parametrize("name,text", [("empty.jsonl", ""), ("blank.jsonl", "\n  \n"), ("empty.json", "")])
def test_an_empty_data_file_is_named_as_empty(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UserError) as raised:
        load_rows(path)
    # (datasets' own error for an empty file has an empty message: "Could not read empty.jsonl: ")
    assert str(raised.value).splitlines()[0] == f"data file {path} is empty: it holds no rows (looked in {path})"


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """A tiny HF model, a copy whose config has too small a vocabulary, and data of each kind."""
    import shutil

    from pipeline_utils import make_task, tiny_model_dir

    root = tmp_path_factory.mktemp("user")
    model = tiny_model_dir(root / "model")
    small = root / "small"
    shutil.copytree(model, small)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "vocab_size": 100}))
    task = make_task(root / "task", n_sft=4, n_pref=4, n_prompts=4, n_eval=2)
    unpaired = write_jsonl(root / "unpaired.jsonl", [{"prompt": "a", "completion": "b", "label": i % 2 == 0}
                                                     for i in range(4)])
    return dict(model=model, small=small, sft=task["sft"], preference=task["preference"], prompts=task["prompts"],
                unpaired=unpaired)


@pytest.mark.parametrize("run,key,data", [("dpo", "reference_from", "preference"), ("kto", "reference_from", "unpaired"),
                                          ("ppo", "value_from", "prompts"), ("distill", "teacher_from", "sft")])
def test_a_runs_other_models_are_found_before_its_run_dir(run, key, data, user_files, tmp_path, monkeypatch):
    import gin

    from jaxpost import recipes
    monkeypatch.chdir(tmp_path)
    gin.clear_config()
    fn, run_dir = getattr(recipes, run), tmp_path / "run"
    common = dict(run_dir=str(run_dir), train_data=str(user_files[data]), init_from=str(user_files["model"]))
    with pytest.raises(UserError) as raised:
        fn(**common, **{key: "./missing"})
    assert str(raised.value).splitlines()[0] == (f"{run}.{key}='./missing' does not exist: no directory "
                                                 f"{tmp_path / 'missing'}; give an existing directory or a Hugging "
                                                 "Face Hub name such as 'org/name'")
    with pytest.raises(UserError) as raised:
        fn(**common, **{key: str(user_files["small"])})
    assert str(raised.value).splitlines()[0].startswith(
        f"{run}: the tokenizer {user_files['model']} has 261 tokens but the model's vocab_size is 100 "
        f"({run}.{key}: {user_files['small'] / 'config.json'}): ids >= 100 have no embedding")
    assert not run_dir.exists()


@pytest.mark.parametrize("run", ["grpo", "ppo", "online_dpo"])
def test_an_online_runs_reward_source_is_checked_before_its_run_dir(run, user_files, tmp_path, monkeypatch):
    import gin

    from jaxpost import recipes
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    common = dict(run_dir=str(run_dir), train_data=str(user_files["prompts"]), init_from=str(user_files["model"]))
    need = ("give a reward source: make_scorer.reward_model (a reward model directory), make_scorer.reward_functions "
            "(Python reward functions; the grpo and rloo run files take their names in make_reward.names), or both "
            "(their scores are summed)")
    cases = [({}, f"{run} scores its samples, so {need}; got neither"),
             # What configs/runs/grpo.gin binds when no reward is named: a make_reward() with no names adds nothing.
             ({"make_scorer.reward_functions": "[@make_reward()]", "make_reward.names": "[]"},
              f"{run} scores its samples, so {need}; got neither"),
             ({"make_scorer.reward_model": "'./rm'", "make_scorer.reward_functions": "['exact_match']"},
              f"make_scorer.reward_model='./rm' does not exist: no directory {tmp_path / 'rm'}; give an existing "
              "directory or a Hugging Face Hub name such as 'org/name'"),
             ({"make_scorer.reward_functions": "['no_such_module_xyz:f']"},  # a spec is imported now, not at rollout 1
              "reward 'no_such_module_xyz:f': module 'no_such_module_xyz': no module named 'no_such_module_xyz' on "
              f"the import path (the current directory {tmp_path} and sys.path); give a module name or a "
              "path/to/file.py")]
    extra = [{}] * len(cases)
    if run != "online_dpo":  # the others may score with an environment instead; the class is not one
        from jaxpost.generate.environments import CalculatorEnv
        cases.append(({}, f"{run}.environment must be an Environment instance (jaxpost.generate.environments), got "
                          f"ABCMeta {str(CalculatorEnv)!r} (bind it with parentheses: @CalculatorEnv(), not "
                          "@CalculatorEnv)"))
        extra.append({"environment": CalculatorEnv})
    try:
        for (bindings, message), kwargs in zip(cases, extra):
            gin.clear_config()
            gin.parse_config([f"{key} = {value}" for key, value in bindings.items()])
            with pytest.raises(UserError) as raised:
                getattr(recipes, run)(**common, **kwargs)
            assert str(raised.value).splitlines()[0] == message
            assert not run_dir.exists()
    finally:
        gin.clear_config()


def test_the_grpo_run_file_scores_with_a_reward_model_alone_or_added_to_its_named_rewards(user_files):
    """configs/runs/grpo.gin needs no reward names when a reward model scores (one flag, as ppo.gin takes it)."""
    from pathlib import Path

    from jaxpost import config
    from jaxpost.generate.scorers import check_bound_scorer

    run_gin = str(Path(__file__).parents[1] / "configs/runs/grpo.gin")
    required = ["grpo.run_dir = 'r'", "grpo.train_data = 'd'", "grpo.init_from = 'm'"]
    rm = f"make_scorer.reward_model = '{user_files['model']}'"
    try:
        for extra in ([rm], [rm, "make_reward.names = ['exact_match']"], ["make_reward.names = ['exact_match']"]):
            config.parse([run_gin], [*required, *extra])
            check_bound_scorer("grpo")  # passes
        config.parse([run_gin], required)
        with pytest.raises(UserError, match="^grpo scores its samples, so give a reward source: .*; got neither$"):
            check_bound_scorer("grpo")
    finally:
        import gin
        gin.clear_config()


def test_a_reward_model_that_is_not_there_names_the_key_that_gave_it(tmp_path, monkeypatch):
    from jaxpost.generate.scorers import RewardModelScorer
    from jaxpost.sharding import Partitioner

    monkeypatch.chdir(tmp_path)
    for key in ("make_scorer.reward_model", "synthesize.scorer"):
        with pytest.raises(UserError, match=rf"^{re.escape(key)}='./rm' does not exist: no directory {tmp_path / 'rm'};"):
            RewardModelScorer("./rm", Partitioner(), key=key)


def test_a_run_directory_given_for_a_model_points_at_its_export(user_files, tmp_path, monkeypatch, capsys):
    import shutil

    from jaxpost import cli
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "sft").mkdir(parents=True)
    shutil.copytree(user_files["model"], tmp_path / "runs" / "sft" / "final")
    (tmp_path / "runs" / "sft" / "metrics.jsonl").write_text("")
    with pytest.raises(UserError) as raised:
        check_run_inputs("dpo", train_data=str(user_files["preference"]), kind="preference", init_from="runs/sft")
    assert str(raised.value) == ("dpo.init_from (used as the tokenizer)='runs/sft' is a jaxpost run directory, not a "
                                 "tokenizer directory: the run exported its model to runs/sft/final; pass that")
    assert cli.main(["generate", "--model", "runs/sft", "--prompts", "p.jsonl", "--out", "s.jsonl"]) == 2
    assert capsys.readouterr().err == ("jaxpost: error: --model='runs/sft' is a jaxpost run directory, not a model "
                                       "directory: the run exported its model to runs/sft/final; pass that\n")
    check_run_inputs("dpo", train_data=str(user_files["preference"]), kind="preference", init_from="runs/sft/final")
    assert cli.main(["synthesize", "--model", "runs/sft/final", "--prompts", "p.jsonl", "--out", "syn",
                     "--reward_model", "./rm"]) == 2
    assert capsys.readouterr().err == ("jaxpost: error: --reward_model='./rm' does not exist: no directory "
                                       f"{tmp_path / 'rm'}; give an existing directory or a Hugging Face "
                                       "Hub name such as 'org/name'\n")
