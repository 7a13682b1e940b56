"""The README's research-code example runs as written, and its commands name real things."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_research_code_example_runs():
    text = README.read_text()
    code = re.search(r"## Research code.*?```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    assert float(scope["metrics"]["loss"]) > 0          # the compiled DPO step ran
    assert abs(float(scope["loss"]) - 0.5981389) < 1e-5  # -log sigmoid(0.1 * 2), the sigmoid_loss line


def test_research_helpers_example_runs_and_its_comments_are_true():
    text = README.read_text()
    section = re.search(r"## Research code(.*?)\n## ", text, re.S).group(1)
    first, helpers = re.findall(r"```python\n(.*?)```", section, re.S)[:2]
    scope: dict = {}
    exec(compile(first.split("B, L = 8, 32")[0], str(README), "exec"), scope)  # imports and `config`
    exec(compile(helpers, str(README), "exec"), scope)
    assert scope["segment_ids"].tolist() == [[1, 1, 1, 2, 2]]
    assert scope["shared"]["prompt_tokens"].shape == (1, 8) and scope["shared"]["chosen_tokens"].shape == (1, 24)
    assert (scope["hf_name"], scope["path"], scope["transpose"]) == (
        "model.layers.0.self_attn.q_proj.weight", ("layers", 0, "attn", "q_proj", "kernel"), True)


def test_quickstart_and_config_paths_exist():
    text = README.read_text()
    assert "pip install -e . && jaxpost demo" in text
    assert 'pip install torch==2.13.0 -e ".[test]" && python -m pytest -q -n 2 --dist loadfile' in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert 'pip install torch==2.13.0 -e ".[test]" && python -m pytest -q -n 2 --dist loadfile' in ci
    for path in set(re.findall(r"`?(configs/[\w/.]+\.gin)", text)):
        assert (README.parent / path).exists(), path
