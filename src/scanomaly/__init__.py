"""scanomaly: unsupervised anomaly detection in medical images (HealthyGAN and its baselines)."""

# before anything imports torch: OpenMP reads its wait policy once, when torch loads it (threads.py)
from .threads import set_wait_policy as _set_wait_policy

_set_wait_policy()

from .data import ImageRecord, ImageSet, discover, load_images  # noqa: E402
from .detector import Detector, available_methods, get_method  # noqa: E402
from .errors import ScanomalyError  # noqa: E402
from .preprocess import Preprocessing  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "Detector",
    "ImageRecord",
    "ImageSet",
    "Preprocessing",
    "ScanomalyError",
    "available_methods",
    "discover",
    "get_method",
    "load_images",
]
