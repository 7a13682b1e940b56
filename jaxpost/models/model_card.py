"""The ``README.md`` model card of an exported model directory (``RUN_DIR/final``).

A card says what the weights are and how they came to be, for whoever finds
the directory without its run: the base model (``init_from``) or a random
init, the method, the training data, the number of steps, the final metrics
of the run's summary, the jaxpost version, the tokens generation stops at,
how to load it with ``transformers`` and, when the run was configured by gin,
the operative config (every value the run read).
"""

from __future__ import annotations

import importlib.metadata
import math
import os
from typing import Any, Mapping, Sequence

import gin
import jax

from jaxpost import paths
from jaxpost.models.config import ModelConfig
from jaxpost.models.hf import model_config_to_hf_config

__all__ = ["model_card", "jaxpost_version"]


def jaxpost_version() -> str:
    """The installed jaxpost version (``"unknown"`` when running from an uninstalled source tree)."""
    try:
        return importlib.metadata.version("jaxpost")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _value(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return f"`{v}`"
    if isinstance(v, int):
        return str(v)
    return f"{v:.6g}" if math.isfinite(v) else str(v)


def _code(text: str) -> str:
    return f"`{text}`"


def model_card(model_dir: str | os.PathLike, config: ModelConfig, params: Any, *, tokenizer: Any = None,
               method: str | None = None, init_from: str | None = None, data: Mapping[str, Any] | None = None,
               summary: Mapping[str, Any] | None = None, stop_ids: Sequence[int] = (), lora: Any = None) -> str:
    """Markdown (with Hugging Face YAML front matter) describing the exported model at ``model_dir``.

    ``config``/``params``: the exported (LoRA-merged) model; ``lora``: the
    run's ``LoraConfig`` if adapters were merged. ``method``: the run's
    method (``"sft"``, ``"dpo"``...). ``init_from``: the model it started
    from, None for a random init. ``data``: named data paths (``{"train":
    ..., "eval": ...}``; None values are skipped). ``summary``: the run's
    final summary; ``step`` (and ``rollout``) give the length of training,
    the other scalar entries are listed as final metrics. ``stop_ids``: the
    ids generation stops at (``generation_config.json``'s ``eos_token_id``).
    Pure: reads only its arguments, gin's operative config and the
    installed version.
    """
    summary = dict(summary or {})
    hf = model_config_to_hf_config(config)
    arch = hf["architectures"][0]
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    where = os.fspath(model_dir)
    score = config.head == "score"
    title = f"{'Reward/value' if score else 'Language'} model trained with jaxpost" + (f" ({method})" if method else "")

    lines = ["---", "library_name: transformers", "tags:", "- jaxpost"]
    lines += [f"- {method}"] if method else []
    lines += [f"pipeline_tag: {'text-classification' if score else 'text-generation'}", "---", "",
              f"# {title}", "",
              f"Exported by jaxpost {jaxpost_version()} at the end of a"
              + (f" `{method}` run." if method else " run."), "",
              "| | |", "|---|---|"]
    rows = [("method", method or "not recorded"),
            ("base model", _code(str(init_from)) if init_from else "random init"),
            ("architecture", f"{arch}: {config.num_layers} layers, hidden {config.hidden_size}, "
                             f"{config.num_heads} heads ({config.num_kv_heads} KV), vocab {config.vocab_size}, "
                             f"{n_params:,} parameters, {hf.get('dtype', config.param_dtype)}")]
    if lora is not None:
        rows.append(("LoRA", f"rank {lora.rank}, alpha {lora.alpha}, merged into these weights"))
    for name, path in (data or {}).items():
        if path is not None:
            rows.append((f"{name} data", _code(os.fspath(path))))
    if "step" in summary:
        rows.append(("optimizer steps", str(summary["step"])))
    if "rollout" in summary:
        rows.append(("rollouts", str(summary["rollout"])))
    if stop_ids and tokenizer is not None:
        rows.append(("generation stops at", ", ".join(
            f"{_code(tokenizer.convert_ids_to_tokens(int(i)))} ({int(i)})" for i in stop_ids)))
    lines += [f"| {k} | {v} |" for k, v in rows]

    metrics = {k: v for k, v in summary.items() if k not in ("step", "rollout")
               and (isinstance(v, (int, float, str)) or v is None)}
    if metrics:
        lines += ["", "## Final metrics", "", "From the run's `summary.json`.", "", "| metric | value |", "|---|---|"]
        lines += [f"| `{k}` | {_value(v)} |" for k, v in sorted(metrics.items())]

    lines += ["", "## Use it", ""]
    if paths.is_remote(where):
        lines += [f"Copy the directory locally first (`gcloud storage cp -r {where} .`), then load it from there.",
                  ""]
        where = os.path.basename(where.rstrip("/"))
    chat = tokenizer is not None and getattr(tokenizer, "chat_template", None)
    lines += ["```python", "from transformers import AutoTokenizer, "
              + ("AutoModelForSequenceClassification" if score else "AutoModelForCausalLM"), "",
              f"path = {where!r}", "tokenizer = AutoTokenizer.from_pretrained(path)"]
    if score:
        lines += ["model = AutoModelForSequenceClassification.from_pretrained(path)"]
        if chat:
            lines += ['text = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}, '
                      '{"role": "assistant", "content": "Hi!"}], tokenize=False)']
        else:
            lines += ['text = "Hello"']
        lines += ['reward = model(**tokenizer(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0]']
    else:
        lines += ["model = AutoModelForCausalLM.from_pretrained(path)"]
        if chat:
            lines += ['inputs = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], '
                      'add_generation_prompt=True, return_tensors="pt", return_dict=True)']
        else:
            lines += ['inputs = tokenizer("Hello", return_tensors="pt")']
        lines += ["out = model.generate(**inputs, max_new_tokens=64)  # stops at the end of the turn",
                  'print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))']
    lines += ["```", ""]
    if not score:
        lines += ["With jaxpost: `jaxpost generate --model " + where
                  + " --prompts prompts.jsonl --out samples.jsonl`, or `jaxpost.models.hf.load_hf(path)`.", ""]

    # Only for gin-configured runs: without bindings the operative config lists library defaults, not this run.
    operative = gin.operative_config_str().strip() if gin.config_str().strip() else ""
    if operative:
        lines += ["## Configuration", "", "<details><summary>operative gin config (every value the run read)"
                  "</summary>", "", "```", operative, "```", "", "</details>", ""]
    return "\n".join(lines)
