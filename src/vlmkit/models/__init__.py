"""Models: ViT and text towers, the CLIP/SigLIP dual encoder, the registry and saving/loading."""

from vlmkit.models.clip import CLIP, CLIPConfig, CLIPOutput
from vlmkit.models.registry import SIZES, create_model, get_model_config, list_models
from vlmkit.models.text import TextConfig, TextTransformer
from vlmkit.models.vit import VisionConfig, VisionTransformer

__all__ = [
    "CLIP",
    "CLIPConfig",
    "CLIPOutput",
    "SIZES",
    "TextConfig",
    "TextTransformer",
    "VisionConfig",
    "VisionTransformer",
    "create_model",
    "get_model_config",
    "list_models",
]
