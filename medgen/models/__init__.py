"""Model zoo. Importing this package registers every model with the registry."""

from medgen.models.registry import create_model, list_models, register_model
from medgen.models import classifier  # noqa: F401,E402  (registers "classifier")

__all__ = ["create_model", "list_models", "register_model"]
