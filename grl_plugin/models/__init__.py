"""BasicSR models (registered by ``import grl_plugin``)."""
from .grl_model import DEFAULT_NAN_TOLERANCE, GRLModel, NonFiniteLossError
from .realesrgan_model import GRLRealESRGANModel, GRLRealESRNetModel

#: Model classes registered in BasicSR's MODEL_REGISTRY.
MODELS = [GRLModel]
MODELS += [GRLRealESRNetModel, GRLRealESRGANModel]

__all__ = ["MODELS", "GRLModel", "GRLRealESRNetModel", "GRLRealESRGANModel", "NonFiniteLossError",
           "DEFAULT_NAN_TOLERANCE"]
