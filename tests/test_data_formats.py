"""Sources and TRL formats: loading files, detection, validation, implicit prompts, splits."""

import json

import datasets
import pytest

from jaxpost.data import formats, sources
from jaxpost.errors import UserError

datasets.disable_progress_bars()

CONV_PROMPT = [{"role": "user", "content": "What color is the sky?"}]
ROWS_BY_FORMAT = {
    "text": [{"text": "hello world"}, {"text": "the sky is blue"}],
    "messages": [{"messages": CONV_PROMPT + [{"role": "assistant", "content": "Blue."}]}] * 2,
    "prompt_completion": [{"prompt": "Sky?", "completion": " Blue."}] * 2,
    "preference": [{"prompt": "Sky?", "chosen": " Blue.", "rejected": " Green."}] * 2,
    "prompt_only": [{"prompt": "Sky?"}, {"prompt": "Grass?"}],
}


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("fmt", sorted(ROWS_BY_FORMAT))
@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_every_format_loads_from_jsonl_and_parquet(tmp_path, fmt, ext):
    rows = ROWS_BY_FORMAT[fmt]
    path = tmp_path / f"{fmt}.{ext}"
    if ext == "jsonl":
        _write_jsonl(path, rows)
    else:
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    ds = sources.load_rows(path)
    assert len(ds) == len(rows)
    assert formats.check_rows(ds) == fmt
    assert sources.source_name(ds) == str(path)
    assert [formats.normalize_row(r, fmt)["format"] for r in ds] == [fmt] * len(rows)


def test_save_to_disk_dir_and_arrow_file(tmp_path):
    rows = ROWS_BY_FORMAT["preference"]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert sources.load_rows(tmp_path / "saved")[:] == datasets.Dataset.from_list(rows)[:]
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    assert sources.load_rows(arrow)["chosen"] == [" Blue.", " Blue."]
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    assert len(sources.load_rows(tmp_path / "dd", split="test")) == 2
    with pytest.raises(UserError, match="no split 'train'.*test"):
        sources.load_rows(tmp_path / "dd")
    assert len(sources.load_rows(f"{tmp_path / 'dd'}@test")) == 2  # the split in the name


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": "c"\n{"text": "d"}\n')
    with pytest.raises(ValueError, match=rf"{path}:4: malformed JSON line"):
        sources.load_rows(path)
    path.write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=rf"{path}:2: expected a JSON object"):
        sources.load_rows(path)


def test_missing_file_is_not_mistaken_for_hub_name(tmp_path):
    with pytest.raises(UserError, match="nope.jsonl does not exist"):
        sources.load_rows(tmp_path / "nope.jsonl")


def test_missing_field_error_names_field_row_and_file(tmp_path):
    path = _write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c"},
                                                {"prompt": "d", "completion": "e"}])
    with pytest.raises(UserError, match=rf"row 2 of {path} \(line 2\): required field 'completion'"):
        sources.load_rows(path)
    path = _write_jsonl(tmp_path / "pref.jsonl", [{"prompt": "a", "chosen": "b"}])
    with pytest.raises(ValueError, match=rf"missing required field 'rejected'.*{path}|{path}.*'rejected'"):
        sources.load_rows(path)
    with pytest.raises(UserError, match="row 2: required field 'text'"):
        formats.check_rows([{"text": "a"}, {"text": None}])
    with pytest.raises(UserError, match=r"row 8 of f.jsonl: messages\[1\] is missing required field 'content'"):
        formats.normalize_row({"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]},
                              "messages", 7, "f.jsonl")
    with pytest.raises(ValueError, match="Cannot tell the data format.*'foo'"):
        formats.detect_format(["foo"])


def test_detection_rules():
    assert formats.detect_format(["chosen", "rejected"]) == "preference"
    assert formats.detect_format(["prompt", "chosen", "rejected", "margin"]) == "preference"
    assert formats.detect_format(["prompt", "completion"]) == "prompt_completion"
    assert formats.detect_format(["prompt", "answer"]) == "prompt_only"
    with pytest.raises(ValueError, match="missing required field 'prompt'"):
        formats.detect_format(["completion"])


def test_implicit_prompt_strings():
    # The common prefix "Sky? It is b" is cut back to its last space, which
    # goes to the completions, so "blue"/"black" keep their shared "b".
    assert formats.extract_prompt("Sky? It is blue", "Sky? It is black") == ("Sky? It is", " blue", " black")
    assert formats.extract_prompt("abc", "xyz") == ("", "abc", "xyz")
    with pytest.raises(ValueError, match="identical"):
        formats.extract_prompt("same", "same")


def test_implicit_prompt_conversational():
    user = {"role": "user", "content": "Sky?"}
    chosen = [user, {"role": "assistant", "content": "Blue."}]
    rejected = [user, {"role": "assistant", "content": "Green."}]
    ex = formats.normalize_row({"chosen": chosen, "rejected": rejected, "margin": 2}, "preference", 0)
    assert ex["prompt"] == [user]
    assert ex["chosen"] == [chosen[1]] and ex["rejected"] == [rejected[1]]
    assert ex["conversational"] and ex["margin"] == 2.0
    with pytest.raises(ValueError, match="prefix of the other"):
        formats.extract_prompt(chosen, chosen + [user])


def test_mixed_string_and_conversation_is_an_error():
    with pytest.raises(UserError, match="row 4: 'prompt' and 'completion' must both be"):
        formats.normalize_row({"prompt": "x", "completion": [{"role": "assistant", "content": "y"}]},
                              "prompt_completion", 3)


def test_train_eval_split_fraction_and_path(tmp_path):
    rows = [{"text": str(i)} for i in range(10)]
    train, held = sources.train_eval_split(rows, eval_fraction=0.25, seed=3)
    assert len(held) == 3 and len(train) == 7   # ceil(10 * 0.25)
    assert sorted(r["text"] for r in train + held) == sorted(r["text"] for r in rows)
    assert train == sorted(train, key=lambda r: int(r["text"]))  # original order kept
    assert sources.train_eval_split(rows, eval_fraction=0.25, seed=3) == (train, held)
    assert sources.train_eval_split(rows, eval_fraction=0.25, seed=4)[1] != held
    ds_train, ds_held = sources.train_eval_split(datasets.Dataset.from_list(rows), eval_fraction=0.25, seed=3)
    assert ds_held["text"] == [r["text"] for r in held]
    path = _write_jsonl(tmp_path / "eval.jsonl", rows[:2])
    same, ev = sources.train_eval_split(rows, eval_path=path)
    assert same is rows and ev["text"] == ["0", "1"]
    with pytest.raises(ValueError, match="exactly one"):
        sources.train_eval_split(rows)


def test_jsonl_lines_split_at_newline_alone_and_a_bad_line_is_found_past_unicode_separators(tmp_path):
    from jaxpost.paths import jsonl_lines

    # U+0085, U+2028 and U+2029 are line breaks to str.splitlines, and JSON leaves them unescaped inside a
    # string when written with ensure_ascii=False: a sampled completion can hold one.
    record = json.dumps({"text": "a\x85b\u2028c\u2029d"}, ensure_ascii=False)
    assert jsonl_lines(f"{record}\r\n\n{record}\n") == [f"{record}\r", "", record]
    assert [json.loads(x) for x in jsonl_lines(f"{record}\n{record}")] == [{"text": "a\x85b\u2028c\u2029d"}] * 2
    assert jsonl_lines("") == []
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{record}\n{record}\n{{\"text\": \"c\"\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{path}:3: malformed JSON line"):
        sources.load_rows(path)
