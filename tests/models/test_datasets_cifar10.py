"""CIFAR-10 from small batches in the real python pickle format, as a folder, a parent folder and a tar.gz archive."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from models.datasets import DatasetError, load_dataset
from models.datasets.cifar10 import CLASS_NAMES

PER_CLASS = 2
TEST_PER_CLASS = 1


def _batch(data: np.ndarray, labels: list[int], label: str) -> dict:
    # The layout of the original files, which Python 2 pickled: bytes keys,
    # uint8 rows of 3072 values (1024 red, 1024 green, 1024 blue), a list of labels.
    return {
        b"batch_label": label.encode(),
        b"labels": labels,
        b"data": data,
        b"filenames": [f"image_{index}.png".encode() for index in range(len(labels))],
    }


def write_small_cifar10(folder: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Write data_batch_1..5, test_batch and batches.meta with a few images per class.

    Returns:
        The rows and labels written: train_rows (n, 3072), train_labels, test_rows, test_labels.
    """
    generator = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    train_labels = np.tile(np.arange(10), PER_CLASS * 5)
    train_rows = generator.integers(0, 256, (len(train_labels), 3072), dtype=np.uint8)
    test_labels = np.tile(np.arange(10), TEST_PER_CLASS)
    test_rows = generator.integers(0, 256, (len(test_labels), 3072), dtype=np.uint8)

    per_batch = len(train_labels) // 5
    for number in range(5):
        rows = slice(number * per_batch, (number + 1) * per_batch)
        batch = _batch(train_rows[rows], train_labels[rows].tolist(), f"training batch {number + 1} of 5")
        with open(folder / f"data_batch_{number + 1}", "wb") as file:
            pickle.dump(batch, file, protocol=2)
    with open(folder / "test_batch", "wb") as file:
        pickle.dump(_batch(test_rows, test_labels.tolist(), "testing batch 1 of 1"), file, protocol=2)
    with open(folder / "batches.meta", "wb") as file:
        meta = {b"num_cases_per_batch": per_batch, b"label_names": [name.encode() for name in CLASS_NAMES], b"num_vis": 3072}
        pickle.dump(meta, file, protocol=2)
    return {"train_rows": train_rows, "train_labels": train_labels, "test_rows": test_rows, "test_labels": test_labels}


def _pixel(rows: np.ndarray, index: int, row: int, column: int, channel: int) -> int:
    return int(rows[index, channel * 1024 + row * 32 + column])


def test_folder_layout_and_pixels(tmp_path: Path) -> None:
    written = write_small_cifar10(tmp_path / "cifar-10-batches-py")

    dataset = load_dataset("cifar10", path=tmp_path / "cifar-10-batches-py", validation_split=0.5, seed=0)

    assert dataset.class_names == CLASS_NAMES
    assert dataset.raw_shape == (32, 32, 3)
    assert dataset.x_train.dtype == np.uint8
    assert dataset.value_range == (0.0, 255.0)
    assert len(dataset.y_train) + len(dataset.y_val) == 100
    assert np.array_equal(dataset.y_test, written["test_labels"])
    # Channels last: pixel (row, column, channel) of image i is row i of the batch
    # at channel * 1024 + row * 32 + column.
    for index, row, column, channel in [(0, 0, 0, 0), (3, 5, 7, 1), (9, 31, 30, 2)]:
        assert int(dataset.x_test[index, row, column, channel]) == _pixel(written["test_rows"], index, row, column, channel)


def test_training_images_keep_their_labels(tmp_path: Path) -> None:
    written = write_small_cifar10(tmp_path / "cifar-10-batches-py")

    dataset = load_dataset("cifar10", classes=["cat", "ship"], path=tmp_path / "cifar-10-batches-py", validation_split=0.5)

    assert dataset.class_names == ["cat", "ship"]
    expected_images = written["train_rows"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    originals = {3: expected_images[written["train_labels"] == 3], 8: expected_images[written["train_labels"] == 8]}
    for images, labels in ((dataset.x_train, dataset.y_train), (dataset.x_val, dataset.y_val)):
        for new_label, original in enumerate([3, 8]):
            known = {image.tobytes() for image in originals[original]}
            assert len(images[labels == new_label]) == PER_CLASS * 5 // 2
            assert all(image.tobytes() in known for image in images[labels == new_label])


def test_parent_folder_and_archive(tmp_path: Path) -> None:
    write_small_cifar10(tmp_path / "download" / "cifar-10-batches-py")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "download" / "cifar-10-batches-py", arcname="cifar-10-batches-py")

    from_folder = load_dataset("cifar10", path=tmp_path / "download" / "cifar-10-batches-py")
    from_parent = load_dataset("cifar10", path=tmp_path / "download")
    from_archive = load_dataset("cifar10", path=archive)

    assert from_parent.fingerprint() == from_folder.fingerprint()
    assert from_archive.fingerprint() == from_folder.fingerprint()


def test_keras_cache_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    write_small_cifar10(tmp_path / "keras" / "datasets" / "cifar-10-batches-py-target" / "cifar-10-batches-py")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))

    dataset = load_dataset("cifar10", classes=[0, 1], validation_split=0.5, download=False)

    assert dataset.class_names == ["airplane", "automobile"]
    assert len(dataset.y_test) == 2 * TEST_PER_CLASS


def test_nothing_found_without_download(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty"))

    with pytest.raises(DatasetError) as error:
        load_dataset("cifar10", download=False)

    assert "cifar10 was not found in" in str(error.value)
    assert str(tmp_path / "empty" / "datasets" / "cifar-10-batches-py-target" / "cifar-10-batches-py") in str(error.value)
    assert "download is off" in str(error.value)


class _Payload:
    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.parametrize(
    ("damage", "message_parts"),
    [
        ("missing path", ["cifar10 path", "not found"]),
        ("missing batch", ["lacks data_batch_3", "cifar-10-batches-py"]),
        ("not a pickle", ["data_batch_2: not a readable CIFAR-10 pickle batch", "corrupt"]),
        ("truncated", ["test_batch: not a readable CIFAR-10 pickle batch"]),
        ("foreign global", ["data_batch_1: not a readable CIFAR-10 pickle batch", "posix.getcwd"]),
        ("labels out of range", ["data_batch_4: labels out of range (10)", "0..9"]),
        ("label count", ["data_batch_5: the batch has 4 images but labels of shape (3,)"]),
        ("row length", ["data_batch_1: data has shape (4, 3000)", "(n, 3072)"]),
        ("missing key", ["test_batch: the batch has keys", "needs 'data' and 'labels'"]),
    ],
)
def test_bad_batches_name_the_file(tmp_path: Path, damage: str, message_parts: list[str]) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    written = write_small_cifar10(folder)
    rows = written["train_rows"][:4]

    def rewrite(name: str, content: object) -> None:
        (folder / name).write_bytes(pickle.dumps(content, protocol=2))

    if damage == "missing path":
        folder = tmp_path / "nowhere"
    elif damage == "missing batch":
        (folder / "data_batch_3").unlink()
    elif damage == "not a pickle":
        (folder / "data_batch_2").write_bytes(b"\x89PNG not a pickle at all")
    elif damage == "truncated":
        content = (folder / "test_batch").read_bytes()
        (folder / "test_batch").write_bytes(content[: len(content) // 2])
    elif damage == "foreign global":
        rewrite("data_batch_1", {b"data": rows, b"labels": [0, 1, 2, 3], b"extra": _Payload()})
    elif damage == "labels out of range":
        rewrite("data_batch_4", _batch(rows, [0, 10, 2, 3], "bad"))
    elif damage == "label count":
        rewrite("data_batch_5", _batch(rows, [0, 1, 2], "bad"))
    elif damage == "row length":
        rewrite("data_batch_1", _batch(rows[:, :3000], [0, 1, 2, 3], "bad"))
    elif damage == "missing key":
        rewrite("test_batch", {b"labels": [0, 1]})

    with pytest.raises(DatasetError) as error:
        load_dataset("cifar10", path=folder)

    for part in message_parts:
        assert part in str(error.value), str(error.value)


def test_archive_without_batches(tmp_path: Path) -> None:
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        content = b"hello"
        member = tarfile.TarInfo("cifar-10-batches-py/readme.html")
        member.size = len(content)
        tar.addfile(member, io.BytesIO(content))

    with pytest.raises(DatasetError) as error:
        load_dataset("cifar10", path=archive)

    assert "lacks data_batch_1" in str(error.value)


def test_corrupt_archive(tmp_path: Path) -> None:
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(b"\x1f\x8b\x08 definitely not a whole archive")

    with pytest.raises(DatasetError) as error:
        load_dataset("cifar10", path=archive)

    assert f"{archive}: cannot read the archive" in str(error.value)


def test_other_file_kind_named(tmp_path: Path) -> None:
    # An .npz file is a zip archive, not a damaged tar.gz.
    archive = tmp_path / "cifar10.npz"
    np.savez(archive, x=np.zeros(3))

    with pytest.raises(DatasetError) as error:
        load_dataset("cifar10", path=archive)

    assert f"cifar10 path {str(archive)!r} is not a tar archive; use cifar-10-python.tar.gz" in str(error.value)
