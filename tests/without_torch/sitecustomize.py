"""Runs at the start of every subprocess of the suite (tests/cli_env.py puts this directory on PYTHONPATH).

The path finder then finds no ``torch`` package: ``import torch`` raises
``ModuleNotFoundError`` and ``importlib.util.find_spec("torch")`` is None,
as in an install without torch, so transformers and datasets take their
torch-free paths.
"""

import sys
from importlib.machinery import PathFinder


class _PathFinderWithoutTorch(PathFinder):
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname == "torch" or fullname.startswith("torch."):
            return None
        return super().find_spec(fullname, path, target)


sys.meta_path[:] = [_PathFinderWithoutTorch if finder is PathFinder else finder for finder in sys.meta_path]
