"""The `frozen-tune submit` and `frozen-tune jobs` commands: experiments as Ray jobs on a remote cluster."""

from __future__ import annotations

import datetime
import sys

import click

from tuning.config import ConfigError, check_cluster_paths, check_datasets, load_experiment, load_warm_start
from tuning.exit_codes import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_INVALID_INPUT

# Ray's own `ray job` commands read the dashboard address from this variable too.
JOBS_ADDRESS_VARIABLE = "RAY_API_SERVER_ADDRESS"


def _address_option(function):
    return click.option(
        "--address", required=True, envvar=JOBS_ADDRESS_VARIABLE, show_envvar=True,
        help="The cluster's Jobs API: the head node's dashboard URL, e.g. http://HEAD:8265.",
    )(function)


@click.command()
@click.argument("experiment", type=click.Path(dir_okay=False, path_type=str))
@_address_option
@click.option("--num-trials", type=int, default=None, help="Override search.num_trials.")
@click.option("--storage", default=None, help="Override storage: a folder every node can reach, or a URI such as s3://bucket/runs.")
@click.option("--name", default=None, help="Override the experiment name (the run folder's name).")
@click.option("--resume", is_flag=True, default=False,
              help="Continue the interrupted experiment in the run folder on the cluster, as `frozen-tune run --resume` does.")
@click.option("--wait/--no-wait", default=False, show_default=True,
              help="Stream the job's output until it ends; exit 0 only when the job succeeded.")
@click.pass_context
def submit(context: click.Context, experiment: str, address: str, num_trials: int | None, storage: str | None, name: str | None,
           resume: bool, wait: bool) -> None:
    """Submit EXPERIMENT to a Ray cluster as a Ray job that runs `frozen-tune run` there.

    The job's working directory contains the experiment file and the local
    files it names (such as search.warm_start), never run folders or caches. The
    cluster token comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.
    """
    overrides = {"num_trials": num_trials, "storage": storage, "name": name, "resume": resume}
    try:
        config = load_experiment(
            experiment,
            {"search.num_trials": num_trials, "storage": storage, "name": name},
            option_names={"search.num_trials": "--num-trials", "storage": "--storage", "name": "--name"},
        )
        check_cluster_paths(config)
        check_datasets(config)
        load_warm_start(config)
    except ConfigError as error:
        _fail(error, EXIT_INVALID_INPUT)

    from tuning import jobs

    log_level = context.parent.params["log_level"] if context.parent else "info"
    try:
        client = jobs.connect(address)
        job_id = jobs.submit_experiment(client, experiment, config, overrides, log_level)
    except ConfigError as error:
        _fail(error, EXIT_INVALID_INPUT)
    except jobs.JobError as error:
        _fail(error, EXIT_FAILED)

    click.echo(f"Submitted job {job_id} to {client.get_address()}")
    if not wait:
        click.echo(f"Follow it with: frozen-tune jobs logs {job_id} --follow --address {address}")
        return
    _wait_and_exit(client, job_id, address)


def _wait_and_exit(client, job_id: str, address: str) -> None:
    from tuning import jobs

    try:
        status = jobs.wait_for_job(client, job_id, lambda chunk: click.echo(chunk, nl=False))
    except KeyboardInterrupt:
        click.echo(f"\nStopped following job {job_id}; it goes on running. Stop it with: frozen-tune jobs stop {job_id} --address {address}", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except jobs.JobError as error:
        _fail(error, EXIT_FAILED)
    if status != "SUCCEEDED":
        # Ray appends the job's last logs to the message, and they were printed above already.
        message = (jobs.job_info(client, job_id).message or "").split(", last available logs", 1)[0]
        _fail(f"job {job_id} ended with status {status}: {message}", EXIT_FAILED)
    click.echo(f"Job {job_id} succeeded.")


@click.group(name="jobs")
def jobs_group() -> None:
    """List, inspect, follow and stop jobs on a Ray cluster."""


@jobs_group.command(name="list")
@_address_option
def jobs_list(address: str) -> None:
    """List the cluster's jobs, oldest first."""
    from tuning import jobs

    client = _connect(address)
    try:
        found = jobs.list_jobs(client)
    except jobs.JobError as error:
        _fail(error, EXIT_FAILED)
    if not found:
        click.echo(f"No jobs at {client.get_address()}.")
        return
    click.echo(f"{'JOB ID':<44} {'STATUS':<10} {'STARTED':<19} EXPERIMENT")
    for job in found:
        experiment = (job.metadata or {}).get(jobs.METADATA_EXPERIMENT, "")
        click.echo(f"{job.submission_id or job.job_id:<44} {str(job.status):<10} {_format_time(job.start_time):<19} {experiment}")


@jobs_group.command(name="status")
@click.argument("job_id")
@_address_option
def jobs_status(job_id: str, address: str) -> None:
    """Print the status of JOB_ID."""
    from tuning import jobs

    client = _connect(address)
    try:
        info = jobs.job_info(client, job_id)
    except jobs.JobError as error:
        _fail(error, EXIT_FAILED)
    click.echo(f"job:        {job_id}")
    click.echo(f"status:     {info.status}")
    click.echo(f"message:    {info.message or ''}")
    click.echo(f"experiment: {(info.metadata or {}).get(jobs.METADATA_EXPERIMENT, '')}")
    click.echo(f"started:    {_format_time(info.start_time)}")
    click.echo(f"ended:      {_format_time(info.end_time)}")
    click.echo(f"entrypoint: {info.entrypoint}")


@jobs_group.command(name="logs")
@click.argument("job_id")
@_address_option
@click.option("--follow/--no-follow", "-f", default=False, show_default=True, help="Keep printing new output until the job ends.")
def jobs_logs(job_id: str, address: str, follow: bool) -> None:
    """Print the output of JOB_ID (its driver's stdout and stderr)."""
    from tuning import jobs

    client = _connect(address)
    try:
        if follow:
            jobs.follow_logs(client, job_id, lambda chunk: click.echo(chunk, nl=False))
        else:
            click.echo(jobs.job_logs(client, job_id), nl=False)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    except jobs.JobError as error:
        _fail(error, EXIT_FAILED)


@jobs_group.command(name="stop")
@click.argument("job_id")
@_address_option
def jobs_stop(job_id: str, address: str) -> None:
    """Stop JOB_ID; its finished trials stay in storage."""
    from tuning import jobs

    client = _connect(address)
    try:
        stopped = jobs.stop_job(client, job_id)
        status = jobs.job_info(client, job_id).status
    except jobs.JobError as error:
        _fail(error, EXIT_FAILED)
    if stopped:
        click.echo(f"Stop requested for job {job_id} (status {status}).")
    else:
        click.echo(f"Job {job_id} had already ended (status {status}).")


def _connect(address: str):
    from tuning import jobs

    try:
        return jobs.connect(address)
    except ConfigError as error:
        _fail(error, EXIT_INVALID_INPUT)
    except jobs.JobError as error:
        _fail(error, EXIT_FAILED)


def _fail(error: Exception | str, exit_code: int) -> None:
    click.echo(f"error: {error}", err=True)
    sys.exit(exit_code)


def _format_time(milliseconds: int | None) -> str:
    if not milliseconds:
        return ""
    return datetime.datetime.fromtimestamp(milliseconds / 1000).strftime("%Y-%m-%d %H:%M:%S")
