"""Best-trial selection and the results table for both optimisation directions."""

from __future__ import annotations

import pandas as pd
import pytest

from tuning.report import best_row

FRAME = pd.DataFrame({
    "trial_id": ["a", "b", "c", "d"],
    "best_val_loss": [0.3, 0.1, float("nan"), 0.05],
    "best_val_accuracy": [0.90, 0.97, 0.99, 0.99],
    "status": ["TERMINATED", "TERMINATED", "TERMINATED", "ERROR"],
})


@pytest.mark.parametrize(
    ("metric", "mode", "expected"),
    [("val_loss", "min", "b"), ("val_accuracy", "max", "c"), ("val_loss", "max", "a"), ("val_accuracy", "min", "a")],
)
def test_best_row_follows_mode(metric, mode, expected):
    # Failed trials never win, even with the best value (trial d).
    assert best_row(FRAME, metric, mode)["trial_id"] == expected


def test_no_completed_trial_raises():
    with pytest.raises(ValueError, match="no trial completed"):
        best_row(FRAME[FRAME["status"] == "ERROR"], "val_loss", "min")
