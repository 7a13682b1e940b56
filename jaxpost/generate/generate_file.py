"""Prompt file in, completions file out: the body of ``jaxpost generate``.

Input: JSON lines, one object per line, with a ``prompt`` that is either a
string or a conversation (a list of ``{"role", "content"}`` messages).
Prompts are encoded as training encodes them
(:func:`jaxpost.data.encode.encode_prompt`): plain ``[bos] + tok(prompt)``;
conversational through the tokenizer's chat template with
``add_generation_prompt=True``.

Output: one JSON line per completion, ``n_samples_per_prompt`` lines per
prompt in input order: every field of the input row, plus ``prompt`` (as
given), ``completion`` (decoded text, without the stop token and without
special tokens) and ``sample_index`` (0..n-1); these three override input
fields of the same name.

Every prompt is read and encoded before the model loads and before the
output is opened, and the output is written atomically
(:func:`jaxpost.paths.atomic_open`): a bad prompt file, an interrupted or a
failed run leaves an existing output as it was. Local paths (relative to
the working directory) and ``gs://`` URLs both work.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

import gin
import jax
import numpy as np

from jaxpost import paths
from jaxpost.config import build
from jaxpost.data.encode import encode_prompt
from jaxpost.data.tokenizer import load_tokenizer, stop_token_ids
from jaxpost.errors import UserError
from jaxpost.generate.sampler import Sampler, SamplingConfig, left_pad


def read_prompts(path: str | os.PathLike, prompt_field: str = "prompt") -> Iterator[tuple[int, dict]]:
    """Yields ``(line number, row)`` for each non-blank line of a JSON-lines file (local or ``gs://``).

    Raises :class:`UserError` (``"<path>:<line>: ..."``) for a missing file,
    malformed JSON, a non-object line, or a missing / ill-typed ``prompt_field``.
    """
    src = paths.resolve(path)
    if not src.is_file():
        raise UserError(f"prompts file {os.fspath(path)} does not exist (or is a directory); pass a JSON-lines "
                        f"file with a {prompt_field!r} on each line")
    with src.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: malformed JSON ({e.msg}, column {e.colno}); fix that line") \
                    from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            if prompt_field not in row:
                raise UserError(f"{path}:{lineno}: no {prompt_field!r} field (fields: {sorted(row)})")
            prompt = row[prompt_field]
            conversational = isinstance(prompt, list) and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in prompt)
            if not (isinstance(prompt, str) or (conversational and prompt)):
                raise UserError(f"{path}:{lineno}: {prompt_field!r} must be a string or a non-empty list of "
                                f"{{'role': str, 'content': str}} messages, got {str(prompt)[:80]!r}")
            yield lineno, row


def encode_prompts(tokenizer: Any, path: str | os.PathLike, prompt_field: str = "prompt",
                   max_prompt_length: int | None = None) -> list[tuple[dict, np.ndarray]]:
    """Every ``(row, prompt ids)`` of a prompt file, read and checked in full.

    Raises :class:`UserError` naming the line for a prompt that does not
    encode, encodes to nothing, or is longer than ``max_prompt_length`` tokens.
    """
    out = []
    for lineno, row in read_prompts(path, prompt_field):
        try:
            ids = encode_prompt(tokenizer, row[prompt_field])
        except Exception as e:  # noqa: BLE001 - a chat template's own error, reported with the line
            raise UserError(f"{path}:{lineno}: cannot encode the prompt: {e}") from e
        if len(ids) == 0:
            raise UserError(f"{path}:{lineno}: the prompt encodes to no tokens")
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            raise UserError(f"{path}:{lineno}: prompt has {len(ids)} tokens, more than "
                            f"max_prompt_length={max_prompt_length}; shorten it or raise the limit")
        out.append((row, ids))
    return out


def _load_model(model: Any, partitioner):
    if isinstance(model, (str, os.PathLike)):
        from jaxpost.models.hf import load_hf
        return load_hf(model, partitioner=partitioner)
    if isinstance(model, tuple) and len(model) == 3:
        return model
    raise TypeError(f"model must be a Hugging Face checkpoint directory or a (config, graphdef, params) "
                    f"tuple, got {type(model).__name__}")


def _decode(tokenizer, ids: np.ndarray, length: int, finished: bool) -> str:
    n = int(length) - (1 if finished else 0)  # a finished row's last token is its stop token
    return tokenizer.decode([int(t) for t in ids[:n]], skip_special_tokens=True)


@gin.configurable
def generate_to_jsonl(model: Any, tokenizer: Any, prompts_path: str | os.PathLike, out_path: str | os.PathLike,
                      sampling: SamplingConfig | None = None, n_samples_per_prompt: int = 1,
                      batch_size: int = 8, seed: int = 0, partitioner=None, prompt_field: str = "prompt",
                      max_prompt_length: int | None = None) -> int:
    """Samples ``n_samples_per_prompt`` completions per prompt of a JSON-lines file; returns rows written.

    ``model``: a local Hugging Face checkpoint directory (read with
    :func:`jaxpost.models.hf.load_hf`) or a ``(config, graphdef, params)``
    tuple. ``tokenizer``: a tokenizer object or a directory. With
    ``sampling.stop_token_ids`` empty the tokenizer's stop ids (eos and
    end-of-turn) are used. Prompts go ``batch_size`` at a time through one
    bucketed :class:`Sampler` (``group_size = n_samples_per_prompt``); batch
    ``k`` uses the key ``fold_in(PRNGKey(seed), k)``, so a file and a seed
    give the same output every time.

    All prompts are read and encoded first; a bad line (see
    :func:`encode_prompts`), an ``out_path`` that is the prompts file or a
    directory, or a tokenizer larger than the model's vocabulary raises
    :class:`UserError` before anything is written. ``out_path`` is replaced
    atomically when every completion is written: a failed or interrupted
    run leaves an existing file as it was. ``sampling`` defaults to ``SamplingConfig()`` built at call
    time, so gin's ``SamplingConfig.*`` bindings apply.
    """
    sampling = build(SamplingConfig, sampling)  # at call time: a default built at import ignores gin
    if n_samples_per_prompt < 1 or batch_size < 1:
        raise UserError(f"n_samples_per_prompt ({n_samples_per_prompt}) and batch_size ({batch_size}) must be >= 1")
    if paths.same_file(out_path, prompts_path):
        raise UserError(f"the output {os.fspath(out_path)} is the prompts file; writing it would destroy the "
                        "prompts: pass another output path")
    if paths.resolve(out_path).is_dir():
        raise UserError(f"the output {os.fspath(out_path)} is a directory; pass a file path (e.g. samples.jsonl)")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    # All prompts before the model: a bad line costs no model load, and nothing is written until all are good.
    prompts = encode_prompts(tokenizer, prompts_path, prompt_field, max_prompt_length)
    config, graphdef, params = _load_model(model, partitioner)
    if len(tokenizer) > config.vocab_size:
        raise UserError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size}; "
                        "pass the tokenizer the model was trained with")
    stops = sampling.stop_token_ids or tuple(stop_token_ids(tokenizer))
    sampling = sampling.replace(group_size=n_samples_per_prompt, stop_token_ids=stops)
    sampler = Sampler(graphdef, config, sampling, partitioner=partitioner)
    key = jax.random.PRNGKey(seed)
    written = 0
    with paths.atomic_open(out_path, "w") as out:
        for index, start in enumerate(range(0, len(prompts), batch_size)):
            batch = prompts[start:start + batch_size]
            tokens, mask = left_pad([ids for _, ids in batch], pad_token_id=sampling.pad_token_id)
            res = jax.device_get(sampler(params, tokens, mask, jax.random.fold_in(key, index)))
            for b, (row, _) in enumerate(batch):
                for g in range(n_samples_per_prompt):
                    r = b * n_samples_per_prompt + g
                    text = _decode(tokenizer, res.tokens[r], res.lengths[r], bool(res.finished[r]))
                    record = {**row, "prompt": row[prompt_field], "completion": text, "sample_index": g}
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                    written += 1
    return written
