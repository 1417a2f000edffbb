"""Set-up that Ray runs in every worker process of a run before its first task.

This module imports nothing beyond the standard library, because every worker,
idle ones included, imports it when it starts.
"""

from __future__ import annotations

import logging


def configure_worker_logging() -> None:
    """Log this project's INFO lines from Ray workers and only warnings from Ray and TensorFlow."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name in ("ray", "tensorflow", "absl", "h5py"):
        logging.getLogger(name).setLevel(logging.WARNING)
