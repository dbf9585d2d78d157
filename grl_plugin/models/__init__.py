"""BasicSR models (registered by ``import grl_plugin``)."""
from .grl_model import GRLModel

#: Model classes registered in BasicSR's MODEL_REGISTRY.
MODELS = [GRLModel]

__all__ = ["MODELS", "GRLModel"]
