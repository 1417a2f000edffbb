"""Measure embedding extraction throughput and peak memory on full-size Fashion-MNIST.

Reads the 60,000 training and 10,000 test images from the gzip IDX files of
Debian's dataset-fashion-mnist package. The backbone is a registry network with
random weights, which cost the same arithmetic as ImageNet weights and need no
download. models.features.extract_embeddings then runs into an empty cache
folder in this process. A thread samples /proc/self/status every 0.1 s, so the peak resident
memory is split into anonymous memory (heap, TensorFlow, the images) and
file-backed pages (the memory-mapped embedding files being written).

    python bench/extraction.py [--backbone MobileNetV2] [--image-size 96] [--precision float32] [--limit N]

--precision mixed_float16 computes in float16 on float32 weights, as runs with a
GPU do by default; on a CPU it is slower and serves only to check the script.

--limit embeds only the first N images of each part, to check the script itself.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import platform
import resource
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

DEFAULT_DATA = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
SAMPLE_SECONDS = 0.1


def read_idx(path: Path) -> np.ndarray:
    """Read a gzip IDX file of unsigned bytes (magic 0x0801 for labels, 0x0803 for images)."""
    with gzip.open(path, "rb") as file:
        magic, = struct.unpack(">I", file.read(4))
        dimensions = magic & 0xFF
        if magic >> 8 != 0x08:
            raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {magic:#x}).")
        shape = struct.unpack(f">{dimensions}I", file.read(4 * dimensions))
        return np.frombuffer(file.read(), dtype=np.uint8).reshape(shape)


class MemorySampler(threading.Thread):
    """Record the largest VmRSS, RssAnon and RssFile of this process, in kB."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
        self._stop_event = threading.Event()

    def sample(self) -> dict[str, int]:
        values = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in self.peaks:
                values[name] = int(rest.split()[0])
        for name, value in values.items():
            self.peaks[name] = max(self.peaks[name], value)
        return values

    def run(self) -> None:
        while not self._stop_event.wait(SAMPLE_SECONDS):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.sample()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Folder with the four gzip IDX files.")
    parser.add_argument("--backbone", default="MobileNetV2", help="Registry backbone name.")
    parser.add_argument("--image-size", type=int, default=96, help="Side in pixels the images are resized to.")
    parser.add_argument("--batch-size", type=int, default=256, help="Images per forward pass.")
    parser.add_argument(
        "--precision", choices=("float32", "mixed_float16"), default="float32", help="Precision the backbone computes in.",
    )
    parser.add_argument("--limit", type=int, default=None, help="Embed only the first N images of each part.")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    from models.backbones import PREPROCESSING_VERSION, build_feature_extractor, half_precision_copy, load_backbone
    from models.datasets import Dataset
    from models.features import cache_entry_size, embedding_cache_key, embeddings_path, extract_embeddings

    sampler = MemorySampler()
    started_at_process = sampler.sample()

    arrays = {name: read_idx(arguments.data / file_name) for name, file_name in FILES.items()}
    limit = arguments.limit
    # uint8 images as stored in the IDX files; extraction converts one batch at a time to float32.
    dataset = Dataset(
        x_train=np.ascontiguousarray(arrays["x_train"][:limit]),
        y_train=arrays["y_train"][:limit].astype(np.int64),
        x_val=np.ascontiguousarray(arrays["x_test"][:limit]),
        y_val=arrays["y_test"][:limit].astype(np.int64),
        class_names=CLASS_NAMES,
        value_range=(0.0, 255.0),
    )
    del arrays

    backbone = load_backbone(arguments.backbone, weights="none", image_size=arguments.image_size, seed=0)
    cnn = half_precision_copy(backbone.cnn) if arguments.precision == "mixed_float16" else backbone.cnn
    extractor = build_feature_extractor(dataset.raw_shape, dataset.value_range, arguments.image_size, cnn)
    key = embedding_cache_key(backbone.weights_key, dataset, arguments.image_size, PREPROCESSING_VERSION, arguments.precision)
    before_extraction = sampler.sample()

    with tempfile.TemporaryDirectory(prefix="frozen-tune-bench-cache-") as cache_dir:
        sampler.start()
        started = time.monotonic()
        embeddings = extract_embeddings(extractor, dataset, Path(cache_dir), key, batch_size=arguments.batch_size)
        seconds = time.monotonic() - started
        sampler.stop()
        entry_bytes = cache_entry_size(embeddings_path(Path(cache_dir), key))
        images = len(embeddings.train) + len(embeddings.val)
        dimension = embeddings.dimension
        del embeddings

    kilobyte = 1024
    summary = {
        "backbone": backbone.description,
        "precision": arguments.precision,
        "devices": _devices(),
        "images": images,
        "embedding_size": dimension,
        "batch_size": arguments.batch_size,
        "seconds": round(seconds, 1),
        "images_per_second": round(images / seconds, 1),
        "rss_mb_after_imports": round(started_at_process["VmRSS"] / kilobyte),
        "rss_mb_before_extraction": round(before_extraction["VmRSS"] / kilobyte),
        "peak_rss_mb_during_extraction": round(sampler.peaks["VmRSS"] / kilobyte),
        # File-backed pages include TensorFlow's shared libraries, so the
        # increases over the moment before extraction are reported too.
        "peak_anonymous_mb": round(sampler.peaks["RssAnon"] / kilobyte),
        "anonymous_increase_mb": round((sampler.peaks["RssAnon"] - before_extraction["RssAnon"]) / kilobyte),
        "peak_file_backed_mb": round(sampler.peaks["RssFile"] / kilobyte),
        "file_backed_increase_mb": round((sampler.peaks["RssFile"] - before_extraction["RssFile"]) / kilobyte),
        "process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kilobyte),
        "dataset_images_mb": round((dataset.x_train.nbytes + dataset.x_val.nbytes) / 2**20),
        "cache_entry_mb": round(entry_bytes / 2**20),
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }
    print(json.dumps(summary, indent=2))


def _devices() -> list[str]:
    """Names of the devices TensorFlow places work on, GPUs first."""
    import tensorflow as tf

    return [device.name for device in tf.config.list_logical_devices("GPU") + tf.config.list_logical_devices("CPU")]


if __name__ == "__main__":
    main()
