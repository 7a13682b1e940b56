"""Runs: one readable script per algorithm, configured by gin (``jaxpost train``)."""

from jaxpost.pipelines.common import LoopConfig, load_model
from jaxpost.pipelines.sft import sft

__all__ = ["LoopConfig", "load_model", "sft"]
