"""The offline demo: a checkable toy task and every post-training stage on it."""

from jaxpost.demo.run import run_demo

__all__ = ["run_demo"]
