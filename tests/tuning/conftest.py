"""Fixtures of the tuning tests: one short real run of the tiny experiment, shared by every module that reads its outputs."""

from __future__ import annotations

import pytest
import yaml
from cli_support import TINY_EXPERIMENT, run_cli


@pytest.fixture(scope="session")
def first_run(tmp_path_factory):
    """Run `frozen-tune run` on the tiny experiment once; return (folder, experiment file, completed process)."""
    folder = tmp_path_factory.mktemp("end_to_end")
    experiment = folder / "tiny.yaml"
    experiment.write_text(yaml.safe_dump(TINY_EXPERIMENT))
    completed = run_cli(experiment, folder / "runs", folder / "cache")
    return folder, experiment, completed
