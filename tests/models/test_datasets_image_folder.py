"""Image folders of real PNG, JPEG, BMP and GIF files written by the tests, and every way such a folder can be wrong."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.datasets import DEFAULT_IMAGE_SIZE, DatasetError, load_dataset, read_image

# One colour and one file format per class, so every decoded image shows which class it came from.
CLASS_FORMATS = {
    "apple": ("PNG", (200, 30, 40)),
    "banana": ("JPEG", (230, 210, 60)),
    "cherry": ("BMP", (120, 0, 60)),
    "date": ("GIF", (90, 60, 20)),
}
HEIGHT, WIDTH = 10, 12
PER_CLASS = 4


def _save(image: Image.Image, path: Path, image_format: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, image_format or path.suffix.lstrip(".").upper().replace("JPG", "JPEG"))
    return path


def write_class_folders(root: Path, *, per_class: int = PER_CLASS, size: tuple[int, int] = (HEIGHT, WIDTH)) -> Path:
    for name, (image_format, colour) in CLASS_FORMATS.items():
        for index in range(per_class):
            image = Image.new("RGB", (size[1], size[0]), colour)
            if image_format == "GIF":
                image = image.convert("P", palette=Image.Palette.ADAPTIVE)
            _save(image, root / name / f"{index}.{image_format.lower()}", image_format)
    return root


def _class_colours(images: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict[str, np.ndarray]:
    return {name: images[labels == label].reshape(-1, images.shape[-1]) for label, name in enumerate(class_names)}


def test_formats_decode_with_their_labels(tmp_path: Path) -> None:
    root = write_class_folders(tmp_path / "fruit")

    dataset = load_dataset("image_folder", path=root, validation_split=0.5, seed=0)

    assert dataset.class_names == ["apple", "banana", "cherry", "date"]
    assert dataset.raw_shape == (HEIGHT, WIDTH, 3)
    assert dataset.x_train.dtype == np.uint8
    assert dataset.value_range == (0.0, 255.0)
    assert dataset.x_test is None
    assert np.bincount(dataset.y_train).tolist() == [2, 2, 2, 2]
    assert np.bincount(dataset.y_val).tolist() == [2, 2, 2, 2]
    for images, labels in ((dataset.x_train, dataset.y_train), (dataset.x_val, dataset.y_val)):
        for name, pixels in _class_colours(images, labels, dataset.class_names).items():
            expected = np.array(CLASS_FORMATS[name][1])
            # JPEG is lossy; the other formats store the colour exactly.
            tolerance = 4 if CLASS_FORMATS[name][0] == "JPEG" else 0
            assert np.abs(pixels.astype(int) - expected).max() <= tolerance, name


def test_classes_by_name_and_label(tmp_path: Path) -> None:
    root = write_class_folders(tmp_path / "fruit")

    by_name = load_dataset("image_folder", path=root, classes=["date", "apple"], validation_split=0.5)
    by_label = load_dataset("image_folder", path=root, classes=[3, 0], validation_split=0.5)

    assert by_name.class_names == ["date", "apple"]
    assert by_name.fingerprint() == by_label.fingerprint()
    colours = _class_colours(by_name.x_train, by_name.y_train, by_name.class_names)
    assert np.array_equal(np.unique(colours["date"], axis=0), [CLASS_FORMATS["date"][1]])


def test_differing_sizes_resized_to_default(tmp_path: Path) -> None:
    root = write_class_folders(tmp_path / "fruit")
    _save(Image.new("RGB", (40, 30), (200, 30, 40)), root / "apple" / "large.png")

    dataset = load_dataset("image_folder", path=root, validation_split=0.5)

    assert dataset.raw_shape == (*DEFAULT_IMAGE_SIZE, 3)
    assert DEFAULT_IMAGE_SIZE == (256, 256)
    apple = dataset.x_train[dataset.y_train == 0]
    assert np.array_equal(np.unique(apple.reshape(-1, 3), axis=0), [[200, 30, 40]])


def test_image_size_and_grayscale(tmp_path: Path) -> None:
    root = write_class_folders(tmp_path / "fruit")

    square = load_dataset("image_folder", path=root, image_size=6, validation_split=0.5)
    gray = load_dataset("image_folder", path=root, image_size=(5, 7), color_mode="grayscale", validation_split=0.5)

    assert square.raw_shape == (6, 6, 3)
    assert gray.raw_shape == (5, 7, 1)
    apple = gray.x_train[gray.y_train == 0]
    # Pillow's RGB to L conversion is the ITU-R 601-2 luma: 0.299 R + 0.587 G + 0.114 B.
    assert np.unique(apple).tolist() == [round(0.299 * 200 + 0.587 * 30 + 0.114 * 40)]


def test_nested_hidden_and_other_files(tmp_path: Path) -> None:
    root = write_class_folders(tmp_path / "fruit", per_class=2)
    _save(Image.new("RGB", (WIDTH, HEIGHT), (200, 30, 40)), root / "apple" / "more" / "deep.PNG", "PNG")
    _save(Image.new("RGB", (WIDTH, HEIGHT), (0, 0, 0)), root / "apple" / ".hidden.png")
    _save(Image.new("RGB", (WIDTH, HEIGHT), (0, 0, 0)), root / "apple" / ".cache" / "thumb.png")
    _save(Image.new("RGB", (WIDTH, HEIGHT), (0, 0, 0)), root / ".ipynb_checkpoints" / "x.png")
    (root / "banana" / "notes.txt").write_text("not an image")
    _save(Image.new("RGB", (WIDTH, HEIGHT), (0, 0, 0)), root / "banana" / "photo.tiff", "TIFF")

    dataset = load_dataset("image_folder", path=root, validation_split=0.4)

    assert dataset.class_names == ["apple", "banana", "cherry", "date"]
    counts = np.bincount(np.concatenate([dataset.y_train, dataset.y_val]))
    assert counts.tolist() == [3, 2, 2, 2]
    # No black image from the hidden files or the TIFF got in.
    assert dataset.x_train.reshape(len(dataset.x_train), -1).max(axis=1).min() > 0


def test_test_folder_becomes_test_split(tmp_path: Path) -> None:
    root = write_class_folders(tmp_path / "train")
    test_root = tmp_path / "test"
    _save(Image.new("RGB", (WIDTH, HEIGHT), CLASS_FORMATS["cherry"][1]), test_root / "cherry" / "a.bmp")
    _save(Image.new("RGB", (WIDTH + 3, HEIGHT), CLASS_FORMATS["apple"][1]), test_root / "apple" / "b.png")
    _save(Image.new("RGB", (WIDTH, HEIGHT), CLASS_FORMATS["banana"][1]), test_root / "banana" / "c.png")

    dataset = load_dataset("image_folder", path=root, test_path=test_root, classes=["cherry", "apple"], validation_split=0.5)

    assert dataset.class_names == ["cherry", "apple"]
    assert dataset.x_test.shape == (2, HEIGHT, WIDTH, 3)
    # Sub-folders are read in sorted order (apple, then cherry); banana is not selected.
    assert dataset.y_test.tolist() == [1, 0]
    assert dataset.x_test[0, 0, 0].tolist() == list(CLASS_FORMATS["apple"][1])
    assert dataset.x_test[1, 0, 0].tolist() == list(CLASS_FORMATS["cherry"][1])


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("gray", [77, 77, 77]),
        ("rgba", [10, 20, 30]),
        ("palette with transparency", [0, 200, 0]),
        ("16-bit gray", [100, 100, 100]),
        ("animated gif", [250, 0, 0]),
        ("one-bit", [255, 255, 255]),
    ],
)
def test_read_image_converts_modes(tmp_path: Path, mode: str, expected: list[int]) -> None:
    size = (WIDTH, HEIGHT)
    if mode == "gray":
        path = _save(Image.new("L", size, 77), tmp_path / "gray.png")
    elif mode == "rgba":
        path = _save(Image.new("RGBA", size, (10, 20, 30, 0)), tmp_path / "rgba.png")
    elif mode == "palette with transparency":
        image = Image.new("RGB", size, (0, 200, 0)).convert("P", palette=Image.Palette.ADAPTIVE)
        image.info["transparency"] = 0
        path = tmp_path / "palette.png"
        image.save(path, "PNG", transparency=0)
    elif mode == "16-bit gray":
        path = _save(Image.fromarray(np.full((HEIGHT, WIDTH), 100 * 257, dtype=np.uint16)), tmp_path / "deep.png")
    elif mode == "animated gif":
        frames = [Image.new("RGB", size, colour).convert("P", palette=Image.Palette.ADAPTIVE) for colour in ((250, 0, 0), (0, 0, 250))]
        path = tmp_path / "animated.gif"
        frames[0].save(path, "GIF", save_all=True, append_images=frames[1:], duration=100)
    else:
        path = _save(Image.new("1", size, 1), tmp_path / "bits.bmp")

    pixels = read_image(path)

    assert pixels.shape == (HEIGHT, WIDTH, 3)
    assert pixels.dtype == np.uint8
    assert pixels[HEIGHT // 2, WIDTH // 2].tolist() == expected


def test_read_image_resizes_and_grays(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (WIDTH, HEIGHT), (200, 30, 40)), tmp_path / "a.png")

    pixels = read_image(path, size=(4, 5), color_mode="grayscale")

    assert pixels.shape == (4, 5, 1)
    assert np.unique(pixels).tolist() == [round(0.299 * 200 + 0.587 * 30 + 0.114 * 40)]


def test_read_image_shrinks_repeated_pixels_exactly(tmp_path: Path) -> None:
    pattern = np.random.default_rng(0).integers(0, 256, size=(8, 8), dtype=np.uint8)
    enlarged = np.repeat(np.repeat(pattern, 8, axis=0), 8, axis=1)
    path = _save(Image.fromarray(enlarged), tmp_path / "digit.png")

    pixels = read_image(path, size=(8, 8), color_mode="grayscale")

    assert np.array_equal(pixels[:, :, 0], pattern)


def test_read_image_enlarges_bilinearly(tmp_path: Path) -> None:
    path = _save(Image.fromarray(np.array([[0, 200]], dtype=np.uint8)), tmp_path / "edge.png")

    pixels = read_image(path, size=(1, 4), color_mode="grayscale")

    # Bilinear interpolation puts values between the two ends; a box filter would repeat them.
    assert pixels[0, :, 0].tolist()[0] == 0
    assert pixels[0, :, 0].tolist()[-1] == 200
    assert 0 < pixels[0, 1, 0] < 200


def _break(root: Path, damage: str) -> Path:
    """Damage a good folder in one way; return the path to load."""
    if damage == "missing path":
        return root.parent / "no-such-folder"
    if damage == "path is a file":
        return root / "apple" / "0.png"
    if damage == "empty folder":
        empty = root.parent / "empty"
        empty.mkdir()
        return empty
    if damage == "images without class folders":
        loose = root.parent / "loose"
        _save(Image.new("RGB", (4, 4)), loose / "a.png")
        return loose
    if damage == "class with no images":
        (root / "elderberry").mkdir()
        (root / "elderberry" / "readme.txt").write_text("no images yet")
        return root
    if damage == "single class":
        single = root.parent / "single"
        _save(Image.new("RGB", (4, 4)), single / "only" / "a.png")
        return single
    if damage == "corrupt image":
        (root / "banana" / "2.jpeg").write_bytes(b"\xff\xd8\xff\xe0 this is no JPEG")
        return root
    if damage == "truncated image":
        good = (root / "cherry" / "1.bmp").read_bytes()
        (root / "cherry" / "1.bmp").write_bytes(good[: len(good) // 2])
        return root
    if damage == "empty file":
        (root / "date" / "3.gif").write_bytes(b"")
        return root
    if damage == "dangling link":
        (root / "apple" / "gone.png").symlink_to(root / "apple" / "deleted.png")
        return root
    raise AssertionError(damage)


@pytest.mark.parametrize(
    ("damage", "message_parts"),
    [
        ("missing path", ["image_folder path", "no-such-folder", "not found"]),
        ("path is a file", ["is not a folder"]),
        ("empty folder", ["'", "empty'", "is empty", "one sub-folder of images per class"]),
        ("images without class folders", ["contains 1 images but no class sub-folders", "loose/cat/a.png"]),
        ("class with no images", ["class folder", "elderberry", "contains no images"]),
        ("single class", ["single class sub-folder 'only'", "at least 2 classes"]),
        ("corrupt image", ["cannot read image", "banana/2.jpeg", "unreadable or corrupt"]),
        ("truncated image", ["cannot read image", "cherry/1.bmp"]),
        ("empty file", ["cannot read image", "date/3.gif"]),
        ("dangling link", ["cannot read image", "apple/gone.png"]),
    ],
)
def test_bad_folders_name_the_problem(tmp_path: Path, damage: str, message_parts: list[str]) -> None:
    path = _break(write_class_folders(tmp_path / "fruit"), damage)

    with pytest.raises(DatasetError) as error:
        load_dataset("image_folder", path=path, validation_split=0.5)

    for part in message_parts:
        assert part in str(error.value), str(error.value)


def test_corrupt_image_of_unselected_class_is_not_read(tmp_path: Path) -> None:
    root = _break(write_class_folders(tmp_path / "fruit"), "corrupt image")

    dataset = load_dataset("image_folder", path=root, classes=["apple", "cherry"], validation_split=0.5)

    assert dataset.class_names == ["apple", "cherry"]


def test_unknown_class_in_test_folder(tmp_path: Path) -> None:
    root = write_class_folders(tmp_path / "train")
    _save(Image.new("RGB", (WIDTH, HEIGHT)), tmp_path / "test" / "fig" / "a.png")

    with pytest.raises(DatasetError) as error:
        load_dataset("image_folder", path=root, test_path=tmp_path / "test", validation_split=0.5)

    assert "has class folders ['fig']" in str(error.value)
    assert "'apple', 'banana', 'cherry', 'date'" in str(error.value)


def test_unknown_class_name(tmp_path: Path) -> None:
    root = write_class_folders(tmp_path / "fruit")

    with pytest.raises(ValueError) as error:
        load_dataset("image_folder", path=root, classes=["apple", "kiwi"])

    assert "'kiwi', which is not a class name" in str(error.value)
    assert "['apple', 'banana', 'cherry', 'date']" in str(error.value)
