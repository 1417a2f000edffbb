"""The `frozen-tune` command line."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click
import yaml

from tuning.cli_jobs import jobs_group, submit
from tuning.config import ConfigError, check_datasets, check_storage_writable, load_experiment, load_warm_start
from tuning.exit_codes import EXIT_INTERRUPTED, EXIT_INVALID_INPUT, EXIT_TERMINATED
from tuning.run_folder import check_run_folder

logger = logging.getLogger(__name__)


class TerminatedBeforeRay(KeyboardInterrupt):
    """A SIGTERM that arrived before the run installed its own handler, which saves Ray Tune's state."""


def _raise_terminated_before_ray(signal_number: int, frame: Any) -> None:
    raise TerminatedBeforeRay()


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # Ray and TensorFlow are verbose at INFO; keep their warnings only.
    for noisy in ("ray", "tensorflow", "absl", "h5py", "matplotlib"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info", show_default=True,
              help="How much the command logs to stderr.")
def main(log_level: str) -> None:
    """Tune a classifier head on a frozen pretrained backbone with Ray Tune and Gaussian-process search."""
    _configure_logging(log_level)


@main.command()
@click.argument("experiment", type=click.Path(dir_okay=False, path_type=str))
@click.option("--address", default=None, help="Ray cluster to connect to (auto, ray://HOST:10001, HOST:6379). Default: start a local Ray.")
@click.option("--num-trials", type=int, default=None, help="Override search.num_trials.")
@click.option("--storage", default=None, help="Override storage: a folder, or a URI such as s3://bucket/runs.")
@click.option("--name", default=None, help="Override the experiment name (the run folder's name).")
@click.option("--dashboard/--no-dashboard", default=False, show_default=True,
              help="Start Ray's dashboard on 127.0.0.1 with the local Ray.")
@click.option("--resume", is_flag=True, default=False,
              help="Continue the interrupted experiment in the run folder: finished trials are kept, running ones restart "
                   "from their last checkpoint. Use the same file and options as the interrupted run.")
def run(experiment: str, address: str | None, num_trials: int | None, storage: str | None, name: str | None, dashboard: bool,
        resume: bool) -> None:
    """Run the tuning experiment described by the YAML file EXPERIMENT."""
    # Without a handler, a SIGTERM during the checks and imports would end the command
    # without a message and skip the clean-up of the storage probe.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated_before_ray)
    try:
        config = load_experiment(
            experiment,
            {"search.num_trials": num_trials, "storage": storage, "name": name},
            option_names={"search.num_trials": "--num-trials", "storage": "--storage", "name": "--name"},
        )
        check_run_folder(config, resume=resume)
        check_datasets(config)
        load_warm_start(config)
        check_storage_writable(config)
        # Ray and TensorFlow load only after the experiment file is known to be valid.
        from tuning.experiment import TERMINATION, ExperimentError, run_experiment
    except ConfigError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(EXIT_INVALID_INPUT)
    except KeyboardInterrupt as error:
        stopped = "terminated" if isinstance(error, TerminatedBeforeRay) else "interrupted"
        click.echo(f"{stopped} before Ray started; nothing to resume. Run the command again to start over.", err=True)
        sys.exit(EXIT_TERMINATED if isinstance(error, TerminatedBeforeRay) else EXIT_INTERRUPTED)

    try:
        outcome = run_experiment(config, address=address, dashboard=dashboard, resume=resume)
    except KeyboardInterrupt as error:
        _report_interrupted(config)
        terminated = TERMINATION.is_set() or isinstance(error, TerminatedBeforeRay)
        sys.exit(EXIT_TERMINATED if terminated else EXIT_INTERRUPTED)
    except ConfigError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(EXIT_INVALID_INPUT)
    except ExperimentError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(1)

    click.echo("")
    duration = f"{outcome.wall_seconds:.0f} s since the resume" if outcome.resumed else f"{outcome.wall_seconds:.0f} s in all"
    click.echo(f"Best trial {outcome.best_trial_number} ({outcome.best_trial_id}) of {outcome.num_trials} ({outcome.num_failed} failed), "
               f"{duration}:")
    for key, value in outcome.best_config.items():
        click.echo(f"  {key:<14} {value}")
    for key in ("best_epoch", "best_val_loss", "best_val_accuracy"):
        click.echo(f"  {key:<18} {outcome.best_metrics.get(key)}")
    if outcome.test_scores is not None:
        click.echo(f"  {'test_accuracy':<18} {outcome.test_scores['accuracy']:.4f} on {outcome.test_scores['images']} held-out test images")
    click.echo(f"Outputs in {outcome.run_dir}:")
    for file_name in ("results.csv", "best_config.json", "convergence.png", "report.md", "best_model.keras"):
        click.echo(f"  {outcome.run_dir}/{file_name}")


def _report_interrupted(config: Any) -> None:
    """Tell how to continue a run stopped by Ctrl-C or SIGTERM, or that there is nothing to continue."""
    from tuning.run_folder import has_experiment_state

    if config.is_remote_storage or has_experiment_state(Path(config.run_dir())):
        click.echo(f"interrupted: the run's state is saved in {config.run_dir()}; finished trials are kept. "
                   "Continue it with the same command and --resume.", err=True)
    else:
        click.echo("interrupted before the first trial started; nothing to resume. Run the command again to start over.", err=True)


@main.command()
@click.argument("experiment", type=click.Path(dir_okay=False, path_type=str))
def check(experiment: str) -> None:
    """Validate EXPERIMENT, including its datasets, warm start and storage, and print it as YAML with every default filled in."""
    try:
        config = load_experiment(experiment)
        check_datasets(config)
        load_warm_start(config)
        check_storage_writable(config)
    except ConfigError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(EXIT_INVALID_INPUT)
    resolved = config.model_dump()
    resolved["head"] = {name: value for name, value in config.head_hyperparameters({}).items() if name not in config.search.space}
    resolved["cache_dir"] = str(config.cache_path())
    resolved["storage"] = config.storage_path()
    click.echo(yaml.safe_dump(resolved, sort_keys=False), nl=False)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top", type=int, default=3, show_default=True, help="How many of the most probable classes to print per image.")
@click.option("--json", "as_json", is_flag=True, default=False,
              help='Print a JSON list, one object per image: {"path", "top": [{"class", "index", "probability"}]}.')
def predict(model: Path, images: tuple[Path, ...], top: int, as_json: bool) -> None:
    """Classify IMAGES (files or folders of PNG, JPEG, BMP or GIF) with MODEL, a run's best_model.keras."""
    from tuning.predict import PredictError, classify, collect_images, format_prediction

    try:
        predictions = classify(model, collect_images(list(images)), top)
    except PredictError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(EXIT_INVALID_INPUT)
    if as_json:
        click.echo(json.dumps(predictions, indent=2))
        return
    for prediction in predictions:
        click.echo(format_prediction(prediction))


main.add_command(submit)
main.add_command(jobs_group)


if __name__ == "__main__":
    main()
