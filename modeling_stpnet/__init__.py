"""STPNet (Scale-aware Text Prompt Network) as a Hugging Face transformers model package."""

from .configuration_stpnet import STPNetConfig
from .image_processing_stpnet import STPNetImageProcessor
from .modeling_stpnet import STPNetForSemanticSegmentation, STPNetPreTrainedModel, STPNetSegmentationOutput
from .text_repository import ScaleAwareTextRepository

__all__ = [
    "STPNetConfig",
    "STPNetForSemanticSegmentation",
    "STPNetImageProcessor",
    "STPNetPreTrainedModel",
    "STPNetSegmentationOutput",
    "ScaleAwareTextRepository",
]
__version__ = "0.1.0"
