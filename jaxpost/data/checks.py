"""The checks every run makes on its tokenizer and data before a model loads or a step compiles.

:func:`check_run_inputs` is the first thing each run function calls. It
resolves and loads the tokenizer (defaulting to the model directory), reads
the model's vocabulary size without loading weights, reads and validates
the data, and checks that they fit together. Every failure is one
:class:`jaxpost.errors.UserError` naming what, where and how to fix: a
mistake costs seconds, not a model load, a compile and a NaN at step 1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from jaxpost.data import formats
from jaxpost.data.sources import load_rows
from jaxpost.data.tokenizer import load_tokenizer, stop_token_ids
from jaxpost.errors import UserError

__all__ = ["check_run_inputs", "model_vocab_size", "KIND_FORMATS"]

KIND_FORMATS = {
    "lm": (formats.TEXT, formats.MESSAGES, formats.PROMPT_COMPLETION),
    "preference": (formats.PREFERENCE,),
    "prompt": (formats.PROMPT_ONLY, formats.PROMPT_COMPLETION, formats.PREFERENCE),
    "unpaired": (formats.UNPAIRED,),
}
"""The data formats each kind of input pipeline takes (LM/SFT, preference pairs, prompts for sampling)."""

_PLAIN_NEEDS_EOS = (formats.TEXT, formats.PROMPT_COMPLETION, formats.PREFERENCE, formats.UNPAIRED)


def model_vocab_size(model: Any = None, init_from: str | os.PathLike | None = None, *,
                     init_key: str = "init_from", model_key: str = "model") -> tuple[int, str]:
    """``(vocab_size, where it came from)`` of the model a run will train, without loading weights.

    From ``init_from``'s ``config.json`` (a directory or Hub name, resolved
    as :func:`jaxpost.hub.resolve_model_dir` does; the checkpoint's shapes win
    over ``model``, as when the run loads it), else from ``model.vocab_size``
    (a ``ModelConfig``). Raises :class:`UserError` when neither is given or
    the config is unreadable.
    """
    from jaxpost.hub import resolve_model_dir

    if init_from is not None:
        cfg = Path(resolve_model_dir(init_from, key=init_key)) / "config.json"
        try:
            vocab = json.loads(cfg.read_text(encoding="utf-8")).get("vocab_size")
        except (OSError, ValueError) as e:
            raise UserError(f"{cfg} ({init_key}={str(init_from)!r}) is not readable JSON ({e}); "
                            "point it at a Hugging Face model directory") from e
        if not isinstance(vocab, int):
            raise UserError(f"{cfg} ({init_key}={str(init_from)!r}) has no integer vocab_size; "
                            "it is not a causal language model config")
        return vocab, str(cfg)
    if model is None:
        raise UserError(f"no model: set {init_key} (a Hugging Face model directory or Hub name) or {model_key} "
                        "(a ModelConfig for a fresh initialisation)")
    return int(model.vocab_size), "ModelConfig.vocab_size"


def check_run_inputs(what: str, *, train_data: Any, kind: str, tokenizer: str | os.PathLike | None = None,
                     init_from: str | os.PathLike | None = None, model: Any = None, eval_data: Any = None,
                     init_key: str = "init_from", data_key: str = "train_data",
                     other_models: dict[str, str | os.PathLike | None] | None = None) -> tuple[Any, Any]:
    """Loads and checks a run's tokenizer and data; returns ``(tokenizer, train_rows)``.

    ``what`` is the run's gin name (``"sft"``, ``"dpo"``...), used in the
    messages as ``what.key``. ``tokenizer`` defaults to ``init_from`` (a
    model directory holds its tokenizer); with neither it is an error.
    ``kind`` is the input pipeline: ``"lm"``, ``"preference"`` or
    ``"prompt"`` (:data:`KIND_FORMATS`). ``train_data`` is a path or Hub name
    (read with :func:`jaxpost.data.load_rows`) or rows already loaded;
    ``eval_data``, when a path, is read and validated too and dropped (the
    run reads it again, from the ``datasets`` cache). ``other_models``: the
    run's other model directories by key (``{"reference_from": ...}``; None
    values skipped), each found and its vocabulary checked like ``init_from``'s.

    Raises :class:`jaxpost.errors.UserError`, before any model loads, when:
    the tokenizer or model cannot be found; a fresh ``model``'s config has
    no Hugging Face class to export to
    (:func:`jaxpost.models.hf.check_exportable`); ``len(tokenizer)`` exceeds the
    model's ``vocab_size`` (ids past the embedding would give NaNs); a data
    file is missing, malformed, of a format the method does not take, or has
    a bad row (field, message role or content, 1-based row and line);
    conversational data meets a tokenizer without a chat template; plain-text
    data (which ends each sequence with eos) or sampling (which stops on eos)
    meets a tokenizer without an eos token.
    """
    if kind not in KIND_FORMATS:
        raise ValueError(f"kind must be one of {sorted(KIND_FORMATS)}, got {kind!r}")
    from jaxpost.hub import resolve_tokenizer_dir

    if tokenizer is None and init_from is None:
        raise UserError(f"{what}: no tokenizer: set {what}.tokenizer (a tokenizer directory or Hub name), or "
                        f"{what}.{init_key} to a model directory that holds its tokenizer")
    tok_key = f"{what}.tokenizer" if tokenizer is not None else f"{what}.{init_key} (used as the tokenizer)"
    tok_dir = resolve_tokenizer_dir(tokenizer if tokenizer is not None else init_from, key=tok_key)
    tok = load_tokenizer(tok_dir)
    vocabs = [model_vocab_size(model, init_from, init_key=f"{what}.{init_key}", model_key=f"{what}.model")]
    if init_from is None:  # a fresh model: its final/ export must not fail after the last step
        from jaxpost.models.hf import check_exportable
        check_exportable(model)
    # The run's other models (reference, value, teacher) are found now, not after the policy has loaded.
    for key, path in (other_models or {}).items():
        if path is not None:
            vocab, config_path = model_vocab_size(None, path, init_key=f"{what}.{key}")
            vocabs.append((vocab, f"{what}.{key}: {config_path}"))
    for vocab, vocab_from in vocabs:
        if len(tok) > vocab:
            raise UserError(f"{what}: the tokenizer {tok_dir} has {len(tok)} tokens but the model's vocab_size is "
                            f"{vocab} ({vocab_from}): ids >= {vocab} have no embedding; use the model's own "
                            f"tokenizer or a model with vocab_size >= {len(tok)}")

    datasets_to_check = [(data_key, train_data)]
    if eval_data is not None:
        datasets_to_check.append(("eval_data", eval_data))
    train_rows = None
    for key, data in datasets_to_check:
        if isinstance(data, (str, os.PathLike)):
            source = str(data)
            try:
                rows = load_rows(data)  # validates every row (formats.check_rows)
            except UserError as e:  # the file names itself; the key says which of the run's inputs it is
                own = [ln for ln in str(e).splitlines() if not ln.strip().startswith("In call to configurable")]
                raise UserError(f"{what}.{key}: " + "\n".join(own)) from e
            fmt = formats.detect_format(formats.columns(rows), source)
        else:
            source, rows = None, data
            fmt = formats.check_rows(rows)
        name = f"{what}.{key}" + (f"={source!r}" if source else "")
        if fmt not in KIND_FORMATS[kind]:
            raise UserError(f"{name} is {fmt!r} data, but {what} takes {' or '.join(KIND_FORMATS[kind])} rows; "
                            "give a dataset with those columns (see the data formats in the README)")
        conversational = formats.is_conversational_data(rows, fmt)
        if conversational and getattr(tok, "chat_template", None) is None:
            raise UserError(f"{name} is conversational ({fmt}: lists of messages), but the tokenizer {tok_dir} has no "
                            "chat template (chat_template in tokenizer_config.json or chat_template.jinja); use a "
                            "tokenizer with one, or plain-text data")
        if kind != "prompt" and tok.eos_token_id is None and fmt in _PLAIN_NEEDS_EOS and not conversational:
            raise UserError(f"{name} is plain-text {fmt} data, whose sequences end with the eos token, but the "
                            f"tokenizer {tok_dir} has no eos_token; set eos_token in its tokenizer_config.json")
        if train_rows is None:
            train_rows = rows
    if kind == "prompt" and not stop_token_ids(tok):
        raise UserError(f"{what}: the tokenizer {tok_dir} has no eos or end-of-turn token, so sampling would never "
                        "stop; set eos_token in its tokenizer_config.json")
    return tok, train_rows
