"""A folder of image files with one sub-folder per class, read the way Keras' image_dataset_from_directory reads it.

Layout::

    flowers/
      daisy/   001.jpg 002.png ...
      roses/   a.jpg nested/b.bmp ...

The sorted sub-folder names are the class names, and label i is the i-th
name. Files inside a class folder count at any depth when their extension is
.jpg, .jpeg, .png, .bmp or .gif (any letter case). Other files, and names
that start with a dot, are skipped. Every image is decoded with Pillow and
converted to RGB (or to gray with color_mode "grayscale"): grayscale and
palette images are expanded, an alpha channel is dropped as Keras drops it,
and a GIF contributes its first frame. Images of another size are resized
bilinearly to a common size without keeping the aspect ratio, as Keras does
by default (see `choose_image_size`).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from models.datasets.dataset import DatasetError
from models.datasets.source import UINT8_VALUE_RANGE, Source

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
COLOR_MODES = ("rgb", "grayscale")

# (height, width) that images of differing sizes are resized to when no
# image_size is given: the default of keras.utils.image_dataset_from_directory.
DEFAULT_IMAGE_SIZE = (256, 256)

# Pillow modes of 16-bit or 32-bit integer gray images, e.g. 16-bit PNGs.
_WIDE_INTEGER_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


@dataclass(frozen=True)
class ImageFolderIndex:
    """The classes of an image folder and the image files of each, before any image is decoded.

    Attributes:
        root: The folder.
        class_names: Sorted names of the class sub-folders; label i is class_names[i].
        files: files[i] lists the image files of class i in sorted order.
    """

    root: Path
    class_names: list[str]
    files: list[list[Path]]


def index_image_folder(path: Path, *, role: str = "path") -> ImageFolderIndex:
    """List the class sub-folders of `path` and the image files in each.

    Args:
        path: The folder.
        role: The setting `path` came from, named in messages ("path" or "test_path").

    Raises:
        DatasetError: when the folder is missing or has no class sub-folders.
    """
    if not path.exists():
        raise DatasetError(f"image_folder {role} {str(path)!r} not found; set {role} to a folder with one sub-folder per class.")
    if not path.is_dir():
        raise DatasetError(f"image_folder {role} {str(path)!r} is not a folder; set {role} to a folder with one sub-folder per class.")

    class_folders = sorted(entry for entry in path.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not class_folders:
        loose = [entry for entry in path.iterdir() if entry.is_file() and _is_image_name(entry.name)]
        if loose:
            raise DatasetError(
                f"image_folder {role} {str(path)!r} contains {len(loose)} images but no class sub-folders; "
                f"put the images of each class in a sub-folder named after the class, e.g. {path / 'cat' / loose[0].name}."
            )
        raise DatasetError(f"image_folder {role} {str(path)!r} is empty; it needs one sub-folder of images per class.")

    if role == "path" and len(class_folders) == 1:
        raise DatasetError(
            f"image_folder {role} {str(path)!r} has a single class sub-folder {class_folders[0].name!r}; "
            f"a classifier needs at least 2 classes, so add a sub-folder of images for each other class."
        )

    files, skipped = [], 0
    for folder in class_folders:
        class_files, class_skipped = _image_files(folder)
        files.append(class_files)
        skipped += class_skipped
    if skipped:
        logger.info(
            "Skipped %d %s in %s whose extension is not one of %s.",
            skipped, "file" if skipped == 1 else "files", path, ", ".join(IMAGE_EXTENSIONS),
        )
    return ImageFolderIndex(root=path, class_names=[folder.name for folder in class_folders], files=files)


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _image_files(folder: Path) -> tuple[list[Path], int]:
    found, skipped = [], 0
    for directory, subdirectories, names in os.walk(folder):
        # Sorting in place makes os.walk visit sub-folders in a fixed order.
        subdirectories[:] = sorted(name for name in subdirectories if not name.startswith("."))
        for name in sorted(names):
            if _is_image_name(name):
                found.append(Path(directory) / name)
            elif not name.startswith("."):
                skipped += 1
    return found, skipped


def read_image_folder(
    index: ImageFolderIndex,
    labels: list[int],
    *,
    image_size: tuple[int, int] | None,
    color_mode: str,
    test_index: ImageFolderIndex | None = None,
) -> Source:
    """Decode the images of the classes `labels` and, if given, of the same classes in a test folder.

    Args:
        index: The training folder, from index_image_folder.
        labels: Labels (indexes into index.class_names) whose images are read.
        image_size: (height, width) every image is resized to, or None for
            the rule of choose_image_size.
        color_mode: "rgb" for (h, w, 3) images or "grayscale" for (h, w, 1).
        test_index: A folder of held-out test images whose sub-folders are
            named like the training classes, or None.

    Returns:
        A Source with uint8 images and the test split when test_index is given.

    Raises:
        DatasetError: when a selected class has no images, a test class is
            unknown, or an image cannot be decoded (the message names the file).
    """
    for label in labels:
        if not index.files[label]:
            raise DatasetError(
                f"class folder {str(index.root / index.class_names[label])!r} contains no images "
                f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder."
            )
    train_files = [(file, label) for label in labels for file in index.files[label]]
    test_files = _test_files(index, labels, test_index) if test_index is not None else []

    size = image_size or choose_image_size([file for file, _ in train_files])
    x_train, resized = _read_images([file for file, _ in train_files], size, color_mode)
    y_train = np.array([label for _, label in train_files], dtype=np.int64)

    x_test = y_test = None
    if test_index is not None:
        x_test, test_resized = _read_images([file for file, _ in test_files], size, color_mode)
        y_test = np.array([label for _, label in test_files], dtype=np.int64)
        resized += test_resized

    logger.info(
        "Read %d images of %d classes from %s%s at %dx%d pixels (%s), %d of them resized.",
        len(x_train) + (len(x_test) if x_test is not None else 0), len(labels), index.root,
        f" and {test_index.root}" if test_index is not None else "", size[0], size[1], color_mode, resized,
    )
    return Source(
        x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
        class_names=list(index.class_names), value_range=UINT8_VALUE_RANGE, location=str(index.root),
    )


def _test_files(index: ImageFolderIndex, labels: list[int], test_index: ImageFolderIndex) -> list[tuple[Path, int]]:
    unknown = [name for name in test_index.class_names if name not in index.class_names]
    if unknown:
        raise DatasetError(
            f"image_folder test_path {str(test_index.root)!r} has class folders {unknown} that {str(index.root)!r} "
            f"does not have; the test folder may only use the training classes {index.class_names}."
        )
    files = []
    for name, class_files in zip(test_index.class_names, test_index.files):
        label = index.class_names.index(name)
        if label in labels:
            files.extend((file, label) for file in class_files)
    return files


def choose_image_size(files: list[Path]) -> tuple[int, int]:
    """Choose the (height, width) of the images in memory when no image_size is given.

    When every file has the same size, that size is kept and nothing is
    resized. Otherwise every image is resized to DEFAULT_IMAGE_SIZE, the
    default of Keras' image_dataset_from_directory. Only the file headers are read.

    Raises:
        DatasetError: naming the first file that cannot be opened as an image.
    """
    sizes = Counter()
    for file in files:
        try:
            with Image.open(file) as image:
                width, height = image.size
        except _DECODE_ERRORS as error:
            raise _unreadable(file, error) from error
        sizes[(height, width)] += 1

    if len(sizes) == 1:
        return next(iter(sizes))
    common, count = sizes.most_common(1)[0]
    logger.info(
        "Images have %d different sizes (the most common, %dx%d, in %d of %d files); resizing all to %dx%d. "
        "Set the dataset's image_size to choose another size.",
        len(sizes), common[0], common[1], count, len(files), *DEFAULT_IMAGE_SIZE,
    )
    return DEFAULT_IMAGE_SIZE


def _read_images(files: list[Path], size: tuple[int, int], color_mode: str) -> tuple[np.ndarray, int]:
    channels = 3 if color_mode == "rgb" else 1
    images = np.empty((len(files), size[0], size[1], channels), dtype=np.uint8)
    resized = 0
    for position, file in enumerate(files):
        images[position], was_resized = _decode(file, size, color_mode)
        resized += was_resized
    return images, resized


def read_image(path: Path, *, size: tuple[int, int] | None = None, color_mode: str = "rgb") -> np.ndarray:
    """Decode one image file the way image_folder datasets decode theirs.

    Use it to feed a model trained on an image folder with new files: pass
    the model's raw (height, width) as size.

    Args:
        path: A .jpg, .jpeg, .png, .bmp or .gif file.
        size: (height, width) to resize to (bilinear), or None to keep the file's size.
        color_mode: "rgb" or "grayscale".

    Returns:
        uint8 array (height, width, 3) for rgb, (height, width, 1) for grayscale.

    Raises:
        DatasetError: naming the file when it cannot be read or decoded.
        ValueError: for an unknown color_mode.
    """
    if color_mode not in COLOR_MODES:
        raise ValueError(f"color_mode={color_mode!r} is invalid; use one of {', '.join(COLOR_MODES)}.")
    image, _ = _decode(Path(path), size, color_mode)
    return image


def _decode(file: Path, size: tuple[int, int] | None, color_mode: str) -> tuple[np.ndarray, bool]:
    try:
        with Image.open(file) as image:
            image.load()
            image = _convert(image, color_mode)
            resized = size is not None and (image.height, image.width) != tuple(size)
            if resized:
                image = image.resize((size[1], size[0]), _resampling(image, size))
            pixels = np.asarray(image, dtype=np.uint8)
    except _DECODE_ERRORS as error:
        raise _unreadable(file, error) from error

    if pixels.ndim == 2:
        pixels = pixels[:, :, np.newaxis]
    return pixels, resized


def _resampling(image: Image.Image, size: tuple[int, int]) -> Image.Resampling:
    """Choose the filter that resizes `image` to `size` (height, width).

    A shrink averages the pixels each output pixel covers (a box filter), so an
    8x8 digit saved at 64x64 by repeating pixels decodes back to the same 8x8.
    Pillow's bilinear filter spreads each pixel into its neighbours when it
    shrinks: a quickstart model classified 101 of the 180 validation digits
    saved that way correctly with it, and 176 with the box filter. Any
    enlargement is bilinear.
    """
    shrinks = size[0] <= image.height and size[1] <= image.width
    return Image.Resampling.BOX if shrinks else Image.Resampling.BILINEAR


def _convert(image: Image.Image, color_mode: str) -> Image.Image:
    target = "RGB" if color_mode == "rgb" else "L"
    if image.mode in _WIDE_INTEGER_MODES:
        # Pillow clips wide integers to 255 when it converts them to 8 bits,
        # so 16-bit gray values are scaled down here instead.
        gray = np.clip(np.round(np.asarray(image, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(gray)
    elif image.mode == "P" and "transparency" in image.info:
        # A palette with a transparent colour converts through RGBA, which
        # Pillow requires, and then drops alpha like any other RGBA image.
        image = image.convert("RGBA")
    return image.convert(target)


def _unreadable(file: Path, error: BaseException) -> DatasetError:
    return DatasetError(f"cannot read image {str(file)!r}: {error}. The file is unreadable or corrupt; replace or delete it.")
