"""Model zoo. Importing this package registers every model with the registry."""

from medgen.models import alpha_gan  # noqa: F401  (registers "alpha-gan")
from medgen.models import classifier  # noqa: F401  (registers "classifier")
from medgen.models import gan  # noqa: F401  (registers "gan")
from medgen.models import parallel_vae  # noqa: F401  (registers "parallel-vae")
from medgen.models import vae  # noqa: F401  (registers "vae")
from medgen.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
