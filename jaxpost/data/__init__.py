"""Data: sources, TRL formats, tokenizers, chat-template masking, packing, grain pipelines.

Typical use::

    rows = load_rows("train.jsonl")                    # or "org/dataset:config@split" (Hub)
    tok = load_tokenizer("path/to/tokenizer")          # or "org/model", or build_tokenizer(texts)
    it = make_lm_pipeline(rows, tok, seq_len=512, batch_size=8, seed=0)
    batch = next(it)            # tokens, positions, segment_ids, targets, loss_mask
    state = it.get_state()      # JSON; it.set_state(state) resumes exactly
    it.stats.as_metrics()       # {"data/truncated": ..., "data/dropped_empty": ...}
"""

from jaxpost.data.encode import chat_encode, encode_lm, encode_preference, encode_prompt, lm_arrays
from jaxpost.data.formats import check_rows, detect_format, extract_prompt, normalize_row
from jaxpost.data.packing import pack_lm, pad_lm
from jaxpost.data.pipeline import (PipelineIterator, array_entries, make_lm_pipeline,
                                   make_preference_pipeline, make_prompt_pipeline)
from jaxpost.data.prepare import prepare_lm, prepare_preference, prepare_preference_shared, prepare_prompt
from jaxpost.data.sources import load_rows, train_eval_split
from jaxpost.data.stats import DataStats, report_data_stats
from jaxpost.data.tokenizer import build_tokenizer, load_tokenizer, stop_token_ids
from jaxpost.data.checks import check_run_inputs  # last: it uses the modules above

__all__ = [
    "DataStats", "report_data_stats", "PipelineIterator", "array_entries", "build_tokenizer", "chat_encode", "check_rows",
    "check_run_inputs",
    "detect_format", "encode_lm", "encode_preference", "encode_prompt", "extract_prompt", "lm_arrays",
    "load_rows", "load_tokenizer", "make_lm_pipeline", "make_preference_pipeline", "make_prompt_pipeline",
    "normalize_row", "pack_lm", "pad_lm", "prepare_lm", "prepare_preference", "prepare_preference_shared",
    "prepare_prompt", "stop_token_ids", "train_eval_split",
]
