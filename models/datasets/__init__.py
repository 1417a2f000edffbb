"""Image classification datasets with a seeded, stratified train/validation split and an optional test split.

Sources: scikit-learn's bundled digits, Fashion-MNIST, CIFAR-10, a folder of
image files with one sub-folder per class, and arrays saved with numpy.savez.

Example:
    >>> from models.datasets import load_dataset
    >>> dataset = load_dataset("digits", classes=[5, 6, 7, 8, 9], seed=0)
    >>> dataset.class_names
    ['5', '6', '7', '8', '9']
    >>> dataset.x_train.shape[1:]
    (8, 8)
    >>> fashion = load_dataset("fashion_mnist", classes=["Sandal", "Bag"], path="/usr/share/datasets/fashion-mnist")
    >>> fashion.x_test.shape
    (2000, 28, 28)
"""

from models.datasets.dataset import Dataset, DatasetError
from models.datasets.image_folder import COLOR_MODES, DEFAULT_IMAGE_SIZE, IMAGE_EXTENSIONS, read_image
from models.datasets.loading import DATASETS, PATH_ACCEPTED, PATH_REQUIRED, load_dataset

__all__ = [
    "COLOR_MODES",
    "DATASETS",
    "DEFAULT_IMAGE_SIZE",
    "IMAGE_EXTENSIONS",
    "PATH_ACCEPTED",
    "PATH_REQUIRED",
    "Dataset",
    "DatasetError",
    "load_dataset",
    "read_image",
]
