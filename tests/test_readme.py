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


def test_quickstart_and_config_paths_exist():
    text = README.read_text()
    assert "pip install -e . && jaxpost demo" in text
    assert 'pip install torch==2.13.0 -e ".[test]" && python -m pytest -q -n 2 --dist loadfile' in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert 'pip install torch==2.13.0 -e ".[test]" && python -m pytest -q -n 2 --dist loadfile' in ci
    for path in set(re.findall(r"`?(configs/[\w/.]+\.gin)", text)):
        assert (README.parent / path).exists(), path
