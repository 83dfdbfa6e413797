"""scanomaly: unsupervised anomaly detection in medical images (HealthyGAN and its baselines)."""

from .data import ImageRecord, ImageSet, discover, load_images
from .detector import Detector, available_methods, get_method
from .errors import ScanomalyError
from .preprocess import Preprocessing

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
