"""Data: the synthetic dataset store (``store``), image files (``images``), scikit-image's photos
(``photos``), Fashion-MNIST (``fashion_mnist``), and the calibration / evaluation sources by name
(``calibration``), and our data for other toolkits (``interop``: a torch Dataset, forward loops, an
onnxruntime calibration reader)."""

from .calibration import (
    DEFAULT_CALIBRATION_IMAGES,
    calibration_images,
    evaluation_images,
    gaussian_noise,
    real_fashion_mnist,
    synthetic_calibration,
)
from .images import IMAGE_EXTENSIONS, load_image, load_image_folder
from .interop import SyntheticDataset, calibration_batches, forward_loop, ort_calibration_reader
from .photos import SKIMAGE_PHOTOS, photo_crops, skimage_photo_dir

__all__ = ["DEFAULT_CALIBRATION_IMAGES", "calibration_images", "evaluation_images", "gaussian_noise",
           "real_fashion_mnist", "synthetic_calibration", "IMAGE_EXTENSIONS", "load_image", "load_image_folder",
           "SKIMAGE_PHOTOS", "photo_crops", "skimage_photo_dir", "SyntheticDataset", "calibration_batches",
           "forward_loop", "ort_calibration_reader"]
