"""The offline demo: a checkable toy task and every post-training stage on it.

Beside it (``jaxpost demo --feedback``, ``jaxpost demo --tools``): learning from simulated user feedback
(:mod:`jaxpost.demo.feedback`) and learning to call a calculator tool by multi-turn GRPO (:mod:`jaxpost.demo.tools`).
"""

from jaxpost.demo.run import run_demo

__all__ = ["run_demo"]
