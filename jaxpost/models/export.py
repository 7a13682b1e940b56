"""A trained model out of a run: a Hugging Face directory with tokenizer, generation config and model card."""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
from etils import epath

from jaxpost import paths
from jaxpost.data.tokenizer import stop_token_ids
from jaxpost.distributed import is_main_process
from jaxpost.models.config import ModelConfig
from jaxpost.models.hf import save_hf
from jaxpost.models.lora import merge_lora, save_adapters
from jaxpost.models.model_card import model_card

__all__ = ["export"]


def export(run_dir: str | os.PathLike, config: ModelConfig, params: dict, tokenizer: Any = None,
           name: str = "final", *, method: str | None = None, init_from: str | None = None,
           data: Mapping[str, Any] | None = None, summary: Mapping[str, Any] | None = None) -> epath.Path:
    """Writes the trained weights, tokenizer and model card as a Hugging Face directory ``run_dir/name``.

    The directory is built locally and swapped in whole
    (:func:`jaxpost.paths.staged_dir`; uploaded when ``run_dir`` is a
    ``gs://`` URL): an interrupted export leaves the previous one intact.
    With a tokenizer, ``generation_config.json``'s ``eos_token_id`` lists
    every id jaxpost's sampler stops at (:func:`jaxpost.data.tokenizer.stop_token_ids`:
    eos and the chat template's end-of-turn token), so ``transformers``'
    ``generate`` stops at the end of an assistant turn too. ``README.md`` is
    the model card of :func:`jaxpost.models.model_card.model_card`, from
    ``method``, ``init_from``, ``data`` (named data paths) and ``summary``
    (final metrics). With LoRA (``config.lora``) the adapters alone also go
    to ``run_dir/<name>_adapters`` and ``run_dir/name`` holds the merged model.
    Returns ``run_dir/name``.
    """
    root = paths.resolve(run_dir)
    out = root / name
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        params = multihost_utils.process_allgather(params, tiled=True)
    lora = config.lora
    if lora is not None:
        if is_main_process():
            with paths.staged_dir(root / f"{name}_adapters") as local:
                save_adapters(local, params, lora)
        config, params = merge_lora(config, params)
    if is_main_process():
        extra, generation, stops = {}, {}, []
        if tokenizer is not None:
            extra = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                     if getattr(tokenizer, k, None) is not None}
            stops = stop_token_ids(tokenizer)
            if len(stops) > 1:  # one id stays an int, as config.json has it
                generation = {"eos_token_id": stops}
        card = model_card(out, config, params, tokenizer=tokenizer, method=method, init_from=init_from, data=data,
                          summary=summary, stop_ids=stops, lora=lora)
        with paths.staged_dir(out) as local:
            save_hf(local, config, params, extra_config=extra, generation_config=generation)
            if tokenizer is not None:
                tokenizer.save_pretrained(local)
            paths.atomic_write_text(os.path.join(local, "README.md"), card)
    return out
