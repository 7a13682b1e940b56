"""A model's completions of a dataset's prompts as prompt/completion rows: the data of sequence-level distillation."""

from __future__ import annotations

import json
from typing import Any

from etils import epath

from jaxpost import paths
from jaxpost.data.encode import pad_id
from jaxpost.generate.generate_file import generate_to_jsonl
from jaxpost.generate.sampler import SamplingConfig
from jaxpost.sharding import Partitioner

__all__ = ["prompt_of", "teacher_samples"]


def prompt_of(row: dict) -> Any:
    """The prompt of an LM/prompt row: ``prompt``, or a ``messages`` conversation up to its last assistant turn.

    Raises ``ValueError`` naming the fields when a row has neither.
    """
    if row.get("prompt") is not None:
        return row["prompt"]
    messages = row.get("messages")
    if messages:
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=len(messages))
        if last == 0:
            raise ValueError(f"a messages row starts with an assistant turn; no prompt: {messages!r}")
        return list(messages[:last])
    raise ValueError(f"cannot find a prompt in a row with fields {sorted(row)} (need 'prompt' or 'messages')")


def teacher_samples(run: epath.Path, rows: Any, tok: Any, teacher: tuple, sampling: SamplingConfig, n: int,
                    part: Partitioner, seed: int, batch_size: int = 8) -> list[dict]:
    """``n`` completions by ``teacher`` (``(config, graphdef, params)``) of each row's prompt, as prompt/completion rows.

    Generated once per run directory into ``run/teacher_samples.jsonl``
    (written atomically); a resumed run reads them back, so it trains on the
    samples its checkpoints were trained on. A conversation prompt gets its
    completion as an assistant turn.
    """
    out = run / "teacher_samples.jsonl"
    if not out.exists():
        prompts = run / "teacher_prompts.jsonl"
        paths.atomic_write_text(prompts, "".join(json.dumps({"prompt": prompt_of(row)}, ensure_ascii=False) + "\n"
                                                 for row in rows))
        with part.activate():  # generate_to_jsonl writes atomically: ``out`` exists only once complete
            generate_to_jsonl(teacher, tok, prompts, out, sampling=sampling.replace(pad_token_id=pad_id(tok)),
                              n_samples_per_prompt=n, batch_size=batch_size, seed=seed, partitioner=part)
    samples = []
    for line in paths.jsonl_lines(out.read_text(encoding="utf-8")):
        r = json.loads(line)
        completion = r["completion"]
        if not isinstance(r["prompt"], str):  # a conversation continues with an assistant turn
            completion = [{"role": "assistant", "content": completion}]
        samples.append({"prompt": r["prompt"], "completion": completion})
    return samples
