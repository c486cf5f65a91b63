"""skincancer: fine-tune ResNet50 on HAM10000 dermoscopy with fastai. A research tool, not a diagnosis."""

__version__ = "0.1.0"

from .errors import SkinCancerError  # noqa: E402

__all__ = ["SkinCancerError", "__version__"]
