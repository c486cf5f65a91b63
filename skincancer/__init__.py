"""skincancer: fine-tune an ImageNet-pretrained network on HAM10000 dermoscopy with fastai. A research tool, not a
diagnosis."""

import warnings

__version__ = "0.2.0"
DISCLAIMER = "Research tool, not a medical device: never use it to diagnose or to decide on treatment."

from .errors import SkinCancerError  # noqa: E402

# fastai's import-time use of the deprecated torch.jit.script is not ours to fix, and only confuses users
warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning)

__all__ = ["DISCLAIMER", "SkinCancerError", "__version__"]
