"""One Step per model (training/steps/<model>.py), registered against the model class it trains.

Importing this package registers every Step; see base.py for the protocol.
"""

from medgen.training.steps import alpha_gan, classifier, gan, parallel_vae, vae  # noqa: F401  (register the steps)
from medgen.training.steps.base import (
    Batch,
    Step,
    StepContext,
    check_step_kwargs,
    create_step,
    register_step,
    step_class,
)

__all__ = ["Batch", "Step", "StepContext", "check_step_kwargs", "create_step", "register_step", "step_class"]
