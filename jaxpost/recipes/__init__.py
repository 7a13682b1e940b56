"""Recipes: one readable run script per method, configured by gin and launched by ``jaxpost train``.

Each module here reads top to bottom: load a model
(:mod:`jaxpost.models.load`), build a loss (:mod:`jaxpost.algorithms`) and
batches (:mod:`jaxpost.data`), train (:mod:`jaxpost.train.fit`, or
:mod:`jaxpost.train.online` for runs that sample), export. The machinery
they share lives in those library packages, not here.

Importing this package registers every recipe with gin (``run.task = @sft``).
"""

import gin

from jaxpost.recipes.continual import continual
from jaxpost.recipes.distill import distill
from jaxpost.recipes.dpo import dpo
from jaxpost.recipes.grpo import grpo
from jaxpost.recipes.kto import kto
from jaxpost.recipes.online_dpo import online_dpo
from jaxpost.recipes.ppo import ppo
from jaxpost.recipes.reward import reward_model
from jaxpost.recipes.sft import sft
from jaxpost.recipes.synthetic import synthesize
from jaxpost.recipes import values  # noqa: F401  (registers the checks of the recipes' own keys)


@gin.configurable
def run(task=gin.REQUIRED):
    """The entry a ``train`` gin file binds: ``run.task = @sft`` (or @dpo, @reward_model...); returns its result.

    Lives with the recipes (not in :mod:`jaxpost.cli`) so that both the CLI
    and :mod:`jaxpost.demo` call it without importing each other.
    """
    return task()


__all__ = ["continual", "distill", "dpo", "grpo", "kto", "online_dpo", "ppo", "reward_model", "run", "sft", "synthesize"]
