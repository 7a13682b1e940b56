"""The environment of the suite's subprocesses (``jaxpost`` commands, multi-host workers): an install without torch.

The README's first command, ``pip install -e .``, installs no torch; the
test extra adds it for the reference comparisons that run inside pytest.
Where torch can be imported, transformers imports it whenever a tokenizer or
a model config loads: 5-7 s of every ``jaxpost`` process on this suite's 2
cores (an SFT run of 2 steps took 10.6-12.2 s with torch importable, 4.6-5.0 s
without). The subprocesses therefore run as that README user does, with
torch hidden by ``without_torch/sitecustomize.py``; the in-process CLI tests
(``jaxpost.cli.main`` called by pytest) run with torch importable, so both
installs are covered. (jaxpost now keeps torch out of a run itself when its
tokenizer loads as the generic class, and out of TensorBoard:
``tests/test_tokenizer_loading.py`` runs a command with torch importable.
Other tokenizers still go through ``AutoTokenizer``, which imports it.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

WITHOUT_TORCH = Path(__file__).resolve().with_name("without_torch")


def subprocess_env(base: Mapping[str, str] | None = None, **updates: str) -> dict[str, str]:
    """``base`` (default ``os.environ``) with ``updates``, and ``without_torch`` first on its ``PYTHONPATH``."""
    env = dict(os.environ if base is None else base)
    env.update(updates)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(WITHOUT_TORCH)]
    env["PYTHONPATH"] = os.pathsep.join([str(WITHOUT_TORCH), *paths])
    return env
