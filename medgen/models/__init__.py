"""Model zoo. Importing this package registers every model with the registry."""

from medgen.models import (
    alpha_gan,  # noqa: F401  (registers "alpha-gan")
    classifier,  # noqa: F401  (registers "classifier")
    gan,  # noqa: F401  (registers "gan")
    parallel_vae,  # noqa: F401  (registers "parallel-vae")
    vae,  # noqa: F401  (registers "vae")
)
from medgen.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
