"""Runs: one readable script per algorithm, configured by gin (``jaxpost train``)."""

from jaxpost.pipelines.common import LoopConfig, load_model
from jaxpost.pipelines.dpo import dpo
from jaxpost.pipelines.reward import reward_model
from jaxpost.pipelines.sft import sft

__all__ = ["LoopConfig", "dpo", "load_model", "reward_model", "sft"]

from jaxpost.pipelines.grpo import grpo  # noqa: E402  (online runs, registered with gin)
from jaxpost.pipelines.online import OnlineConfig  # noqa: E402
from jaxpost.pipelines.online_dpo import online_dpo  # noqa: E402
from jaxpost.pipelines.ppo import ppo  # noqa: E402
from jaxpost.pipelines.rollout import RolloutConfig  # noqa: E402

__all__ += ["OnlineConfig", "RolloutConfig", "grpo", "online_dpo", "ppo"]

from jaxpost.pipelines.distill import distill  # noqa: E402  (distillation and synthetic data)
from jaxpost.pipelines.synthetic import synthesize, synthesize_main  # noqa: E402
from jaxpost.pipelines.teacher_cache import TeacherCache, build_teacher_cache  # noqa: E402

__all__ += ["TeacherCache", "build_teacher_cache", "distill", "synthesize", "synthesize_main"]
