"""Build and run a tuning experiment on Ray, then write its outputs."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import ray
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from tuning import report
from models.backbone_specs import FLOAT32, MIXED_FLOAT16, SMALL_CNN, BackboneError
from tuning.config import ConfigError, ExperimentConfig, check_storage_writable, distinct_points, load_warm_start
from tuning.evaluation import score_on_test
from tuning.run_folder import check_run_folder, hold_run_folder, write_snapshot
from tuning.space import Parameter, SearchSpace
from tuning.storage import check_storage_shared, output_folder
from tuning.trainable import FAILURE_KEY, HEAD_WEIGHTS_FILE, EmbeddingData, TrialSettings, train_head

logger = logging.getLogger(__name__)

# Seconds to wait for a TCP connection to a cluster address before giving up.
CONNECT_TIMEOUT_SECONDS = 5

# Maximum length of a trial folder name; most file systems allow 255 bytes.
MAX_TRIAL_DIRNAME = 180


# TensorFlow's C++ start-up lines (oneDNN notes, a failed CUDA probe on CPU-only machines) and
# Ray Tune's per-checkpoint notices would bury the progress lines.
QUIET_ENVIRONMENT = {"TF_CPP_MIN_LOG_LEVEL": "3", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}


class ExperimentError(RuntimeError):
    """A run that cannot start or finish; the message names the fix."""


@dataclass(frozen=True)
class PreparedData:
    """Summary of the feature-preparation task that the driver keeps: shapes, statistics and cache facts.

    The embeddings themselves stay in the object store (see prepare_data).
    """

    class_names: list[str]
    raw_shape: tuple[int, ...]
    value_range: tuple[float, float]
    train_size: int
    validation_size: int
    embedding_size: int
    num_classes: int
    mean: np.ndarray
    variance: np.ndarray
    backbone_description: str
    backbone_cache_hit: bool
    embedding_cache_hit: bool
    embedding_cache_path: str
    embedding_cache_bytes: int
    embedding_precision: str


@dataclass(frozen=True)
class ExperimentOutcome:
    """Location of a finished run's outputs and the best trial's values."""

    run_dir: str  # a local folder or a URI such as s3://bucket/runs/quickstart
    best_trial_id: str
    best_trial_number: str
    best_config: dict[str, Any]
    best_metrics: dict[str, Any]
    num_trials: int
    num_failed: int
    wall_seconds: float  # from this command's start, so after --resume from the resume
    data: PreparedData
    test_scores: dict[str, Any] | None = None
    resumed: bool = False


def search_space(config: ExperimentConfig) -> SearchSpace:
    """Translate the experiment file's `search.space` into a SearchSpace."""
    parameters = []
    for name, spec in config.search.space.items():
        if spec.type == "choice":
            parameters.append(Parameter(name=name, kind="choice", values=tuple(spec.values)))
        elif spec.type == "int":
            parameters.append(Parameter(name=name, kind="int", low=spec.low, high=spec.high, log=spec.log))
        else:
            parameters.append(Parameter(name=name, kind=spec.type, low=spec.low, high=spec.high))
    return SearchSpace(tuple(parameters))


def prepare_data(config: ExperimentConfig) -> tuple[PreparedData, EmbeddingData]:
    """Load the dataset and backbone and return the embeddings, from the cache when possible.

    A small_cnn backbone whose weights file and embeddings are both cached is
    not built, so a repeated quickstart never imports TensorFlow here. A cache
    miss extracts the embeddings batch by batch straight into the cache's
    memory-mapped files (models.features.extract_embeddings). The returned
    EmbeddingData contains those memory maps, so returning it from a Ray task
    copies the pages into the object store without another copy in memory.
    The backbone computes in the precision that `extraction_precision` picks,
    and each precision has its own cache entry. Runs wherever it is called;
    `run_experiment` calls it as a Ray task.

    Raises:
        BackboneError: If the backbone cannot be built from the experiment's
            backbone section, for example a weights file that does not fit.
    """
    from models.cache_keys import PREPROCESSING_VERSION
    from models.features import cache_entry_size, embedding_cache_key, embeddings_path, load_cached_embeddings

    cache_dir = config.cache_path()
    dataset = config.dataset.load()
    image_size = config.backbone.image_size
    precision = extraction_precision(config.backbone.precision)
    source = _pretraining_source(config)
    known = _cached_small_cnn_weights(config, source)
    key, embeddings = None, None
    if known is not None:
        key = embedding_cache_key(known.key, dataset, image_size, PREPROCESSING_VERSION, precision)
        embeddings = load_cached_embeddings(cache_dir, key)
    if embeddings is not None:
        backbone_description, backbone_cache_hit, cache_hit = known.description, known.cached, True
    else:
        from models.backbones import build_feature_extractor
        from models.features import extract_embeddings

        backbone = _load_backbone(config, source)
        backbone_description, backbone_cache_hit = backbone.description, backbone.cache_hit
        cnn = backbone.cnn
        if precision == MIXED_FLOAT16:
            cnn, precision = _half_precision_backbone(config, backbone.cnn, dataset)
        backbone_key = embedding_cache_key(backbone.weights_key, dataset, image_size, PREPROCESSING_VERSION, precision)
        if backbone_key != key:
            key = backbone_key
            embeddings = load_cached_embeddings(cache_dir, key)
        cache_hit = embeddings is not None
        if embeddings is None:
            started = time.monotonic()
            extractor = build_feature_extractor(dataset.raw_shape, dataset.value_range, image_size, cnn)
            embeddings = extract_embeddings(
                extractor, dataset, cache_dir, key,
                description={
                    "backbone": backbone.description, "dataset": config.dataset.name, "image_size": image_size,
                    "precision": precision,
                },
            )
            logger.info(
                "computed embeddings for %d images in %.1f s (%s)",
                len(dataset.x_train) + len(dataset.x_val), time.monotonic() - started, precision,
            )

    data = EmbeddingData.from_arrays(embeddings.train, dataset.y_train, embeddings.val, dataset.y_val, len(dataset.class_names))
    entry = embeddings_path(cache_dir, key)
    prepared = PreparedData(
        class_names=list(dataset.class_names),
        raw_shape=tuple(dataset.raw_shape),
        value_range=tuple(dataset.value_range),
        train_size=len(data.train),
        validation_size=len(data.val),
        embedding_size=int(data.train.shape[1]),
        num_classes=data.num_classes,
        mean=data.mean,
        variance=data.variance,
        backbone_description=backbone_description,
        backbone_cache_hit=backbone_cache_hit,
        embedding_cache_hit=cache_hit,
        embedding_cache_path=str(entry),
        embedding_cache_bytes=cache_entry_size(entry),
        embedding_precision=precision,
    )
    return prepared, data


# Images embedded in both precisions before a float16 extraction, and the largest
# difference allowed between the two, as a share of the largest float32 value.
PRECISION_PROBE_IMAGES = 64
PRECISION_TOLERANCE = 0.02


def _half_precision_backbone(config: ExperimentConfig, cnn: Any, dataset: Any) -> tuple[Any, str]:
    """Return the backbone to extract with and its precision: a float16 copy of `cnn` when it is usable.

    The copy is unusable when Keras cannot rebuild the backbone. It is also
    unusable when its embeddings of the first training images are not finite,
    or differ from the float32 ones by more than PRECISION_TOLERANCE of their
    largest value. The copy computes every layer in float16, also layers saved
    with float32, so large activations can overflow and tiny ones round to 0.
    Under "auto", an unusable copy, or a GPU that Ray assigned but TensorFlow
    does not see, leaves the backbone in float32 with a log line. Under
    "mixed_float16" an unusable copy raises.

    Raises:
        BackboneError: when backbone.precision is mixed_float16 and the copy is unusable.
    """
    import tensorflow as tf

    from models.backbones import build_feature_extractor, half_precision_copy
    from models.features import compute_embeddings

    requested = config.backbone.precision == MIXED_FLOAT16
    if not requested and not tf.config.list_physical_devices("GPU"):
        logger.info("Ray gave the embedding task a GPU that TensorFlow does not see, so the embeddings are computed in %s", FLOAT32)
        return cnn, FLOAT32

    problem = None
    try:
        half = half_precision_copy(cnn)
    except BackboneError as error:
        problem = str(error)
    else:
        probe = dataset.x_train[:PRECISION_PROBE_IMAGES]
        size = config.backbone.image_size
        full = compute_embeddings(build_feature_extractor(dataset.raw_shape, dataset.value_range, size, cnn), probe)
        halved = compute_embeddings(build_feature_extractor(dataset.raw_shape, dataset.value_range, size, half), probe)
        scale = float(np.abs(full).max())
        largest_difference = float(np.abs(halved - full).max())
        if not np.isfinite(halved).all():
            problem = f"In {MIXED_FLOAT16}, the backbone's embeddings of {len(probe)} training images are not finite (float16 overflows above 65504)."
        elif largest_difference > PRECISION_TOLERANCE * scale:
            difference = largest_difference / scale if scale > 0 else math.inf
            problem = (
                f"In {MIXED_FLOAT16}, the backbone's embeddings of {len(probe)} training images differ from the {FLOAT32} "
                f"ones by {difference:.1%} of the largest value (more than {PRECISION_TOLERANCE:.0%}), for example because "
                f"small values round to 0 in float16."
            )
    if problem is None:
        return half, MIXED_FLOAT16
    if requested:
        raise BackboneError(f"{problem} Set backbone.precision to {FLOAT32} or auto.")
    logger.warning("%s Computing the embeddings in %s instead.", problem, FLOAT32)
    return cnn, FLOAT32


def extraction_precision(setting: str) -> str:
    """Resolve backbone.precision: "auto" is mixed_float16 when Ray gave the calling task a GPU, else float32."""
    if setting != "auto":
        return setting
    has_gpu = ray.is_initialized() and bool(ray.get_gpu_ids())
    return MIXED_FLOAT16 if has_gpu else FLOAT32


class _KnownWeights(NamedTuple):
    """Backbone weights identified without building the backbone."""

    key: str
    description: str
    cached: bool


def _pretraining_source(config: ExperimentConfig) -> Any:
    """Load the dataset that small_cnn is pretrained on, or return None when the backbone is not pretrained here."""
    backbone = config.backbone
    if backbone.path is not None or backbone.name != SMALL_CNN or backbone.weights != "pretrained":
        return None
    return config.pretrain_dataset().load()


def _cached_small_cnn_weights(config: ExperimentConfig, source: Any) -> _KnownWeights | None:
    """Identify small_cnn weights from their cache key alone, without TensorFlow.

    Building a backbone imports TensorFlow, and finding cached embeddings needs
    only the key of its weights: on two idle cores the quickstart's data
    preparation took 1.9-2.0 s this way against 5.2-5.4 s with the backbone
    built. Pretrained weights count only when their file opens as HDF5,
    because the export builds the backbone from it.

    Args:
        config: The experiment.
        source: The pretraining dataset from _pretraining_source.

    Returns:
        The weights' key, description and whether they come from the cache,
        or None for other backbones and for pretrained weights that are not
        cached or do not open.
    """
    from models.cache_keys import (
        pretrained_small_cnn_description,
        random_small_cnn_cache_key,
        random_small_cnn_description,
        small_cnn_cache_key,
        small_cnn_weights_path,
    )

    backbone = config.backbone
    if backbone.path is not None or backbone.name != SMALL_CNN:
        return None
    pretrain = backbone.pretrain
    if backbone.weights == "none":
        key = random_small_cnn_cache_key(backbone.image_size, pretrain.seed)
        return _KnownWeights(key, random_small_cnn_description(pretrain.seed), cached=False)

    key = small_cnn_cache_key(backbone.image_size, source, pretrain.epochs, pretrain.seed)
    if not _opens_as_hdf5(small_cnn_weights_path(config.cache_path(), key)):
        return None
    description = pretrained_small_cnn_description(pretrain.epochs, source.num_classes, from_cache=True)
    return _KnownWeights(key, description, cached=True)


def _opens_as_hdf5(path: Path) -> bool:
    """Return whether `path` exists and opens with h5py. A truncated file does not open."""
    import h5py

    try:
        with h5py.File(path, "r"):
            return True
    except OSError:
        return False


# Seed of the random weights of a Keras Application with weights: none. The
# experiment file has no seed for it because such weights serve only to test plumbing.
APPLICATION_RANDOM_SEED = 0


def _load_backbone(config: ExperimentConfig, source: Any = None) -> Any:
    """Build the experiment's backbone: a saved model, a Keras Application, or small_cnn pretrained on the source task.

    `source` is the pretraining dataset when the caller has loaded it already; None loads it here when needed.
    """
    from models.backbones import load_backbone, load_saved_model_backbone

    backbone_config = config.backbone
    if backbone_config.path is not None:
        return load_saved_model_backbone(
            Path(backbone_config.path), layer=backbone_config.layer, image_size=backbone_config.image_size,
            input_range=tuple(backbone_config.input_range),
        )
    if backbone_config.name != SMALL_CNN:
        return load_backbone(
            backbone_config.name, weights=backbone_config.weights, image_size=backbone_config.image_size,
            seed=APPLICATION_RANDOM_SEED,
        )
    if backbone_config.weights == "none":
        return load_backbone(backbone_config.name, weights="none", image_size=backbone_config.image_size, seed=backbone_config.pretrain.seed)
    pretrain = backbone_config.pretrain
    if source is None:
        source = config.pretrain_dataset().load()
    return load_backbone(
        backbone_config.name, weights="pretrained", image_size=backbone_config.image_size, seed=pretrain.seed,
        source=source, epochs=pretrain.epochs, cache_dir=config.cache_path(),
    )


class Terminated(KeyboardInterrupt):
    """A SIGTERM, which stops the run the way Ctrl-C does, with its state saved."""


# Set when SIGTERM arrives. Inside Ray's own waits the handler's exception reaches the
# caller as a plain KeyboardInterrupt, so callers check this flag instead of the type.
TERMINATION = threading.Event()


def _raise_terminated(signal_number: int, frame: Any) -> None:
    TERMINATION.set()
    raise Terminated()


def start_ray(address: str | None, *, dashboard: bool = False) -> bool:
    """Connect to the cluster at `address`, or start an embedded local Ray when it is None.

    Returns True when this call started Ray (so the caller shuts it down).
    A stale /tmp/ray/ray_current_cluster file can point a plain `ray.init()`
    at a dead cluster, so the embedded Ray is always started as a new local instance.
    """
    if ray.is_initialized():
        return False
    for variable, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(variable, value)
    runtime_env = {"env_vars": QUIET_ENVIRONMENT, "worker_process_setup_hook": "tuning.worker_setup.configure_worker_logging"}
    if address is None:
        # The embedded Ray serves this machine only, so its servers listen on loopback
        # instead of the machine's network address.
        context = ray.init(
            address="local", include_dashboard=dashboard, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
            runtime_env=runtime_env, log_to_driver=True, configure_logging=False,
        )
        if dashboard:
            logger.info("Ray dashboard: http://%s", context.dashboard_url)
    else:
        _check_reachable(address)
        try:
            ray.init(address=address, runtime_env=runtime_env, configure_logging=False)
        except ray.exceptions.AuthenticationError:
            from tuning.jobs import TOKEN_HELP

            raise ExperimentError(f"the Ray cluster at {address!r} requires an authentication token and none was found; {TOKEN_HELP}") from None
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise ExperimentError(
                f"cannot connect to Ray at {address!r}: {str(error).rstrip('.')}; check the address (auto, ray://HOST:10001 or HOST:6379), "
                f"that the cluster is running{_token_hint()}"
            ) from None
    # Ray's core worker installs a handler that prints a stack dump and ends the process on
    # SIGTERM. This one unwinds like Ctrl-C, so Ray shuts down and the saved state can resume.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
    return True


def check_trial_resources(config: ExperimentConfig, *, local: bool) -> None:
    """Fail when no node of the Ray cluster has the CPUs and GPUs that one trial requests.

    Ray Tune would otherwise wait for such a node forever. An autoscaling
    cluster can still add one, so on a cluster this only logs a warning.

    Raises:
        ConfigError: on the embedded local Ray, naming both resources fields.
    """
    cpus, gpus = config.resources.cpus_per_trial, config.resources.gpus_per_trial
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    if any(node.get("CPU", 0) >= cpus and node.get("GPU", 0) >= gpus for node in nodes):
        return
    largest_cpus = max((node.get("CPU", 0) for node in nodes), default=0)
    largest_gpus = max((node.get("GPU", 0) for node in nodes), default=0)
    problem = (
        f"a trial requests {cpus:g} CPUs and {gpus:g} GPUs (resources.cpus_per_trial and resources.gpus_per_trial), "
        f"but no node has both; the most any node has is {largest_cpus:g} CPUs and {largest_gpus:g} GPUs"
    )
    if local:
        raise ConfigError(f"resources: {problem} on this machine; lower them, or run on a cluster with --address")
    logger.warning("%s; the trials wait until the cluster adds such a node", problem)


def _token_hint() -> str:
    """Return the end of a connection error: the source of the token this client sent, or that it found none.

    A cluster with token authentication rejects a wrong token with the same
    connection error as a dead cluster, after Ray's retries.
    """
    from tuning.jobs import JobError, TOKEN_HELP, read_token

    try:
        token = read_token()
    except JobError as error:
        return f", and that the token can be read: {error}"
    if token is None:
        return f", and, if the cluster checks tokens, that this machine has its token: {TOKEN_HELP}"
    return f", and, if the cluster checks tokens, that the token from {token.source} is the cluster's ({TOKEN_HELP})"


def _check_reachable(address: str) -> None:
    """Fail within seconds when nothing listens at a HOST:PORT or ray://HOST:PORT address.

    `ray.init` retries an unreachable address for minutes before it gives up.
    """
    if address == "auto":
        return
    if address.lower().startswith(("http://", "https://")):
        raise ConfigError(
            f"{address!r} is a dashboard address, which `frozen-tune submit` and `frozen-tune jobs` take; "
            "`run --address` takes auto, HOST:PORT (e.g. 10.0.0.5:6379) or ray://HOST:10001"
        )
    host_port = address.split("://", 1)[-1].rsplit("/", 1)[0]
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"invalid Ray address {address!r}; use auto, HOST:PORT (e.g. 10.0.0.5:6379) or ray://HOST:10001")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_SECONDS):
            pass
    except OSError as error:
        raise ExperimentError(
            f"cannot reach Ray at {address!r}: {error.strerror or error}; check that the cluster is running "
            "and that this machine can reach that host and port"
        ) from None


def run_experiment(config: ExperimentConfig, *, address: str | None = None, dashboard: bool = False, resume: bool = False) -> ExperimentOutcome:
    """Run the whole experiment: prepare the embeddings, tune the head, write the outputs.

    With `resume`, continue the interrupted experiment in the run folder:
    finished trials are kept, trials that were running restart from their
    last checkpoint, and the searcher continues from its saved state.

    Raises:
        ConfigError: when the run folder does not allow this run (see
            tuning.run_folder), the storage is not writable, or some node of
            the cluster at `address` cannot reach it.
        ExperimentError: when Ray cannot be reached or every trial failed.
    """
    started = time.monotonic()
    check_run_folder(config, resume=resume)
    check_storage_writable(config)

    started_ray = start_ray(address, dashboard=dashboard)
    try:
        check_trial_resources(config, local=address is None)
        if address is not None:
            check_storage_shared(config)
        logger.info("experiment %s: preparing embeddings (backbone %s, dataset %s)", config.name, config.backbone.label, config.dataset.name)
        data, embeddings = _prepare_on_cluster(config)
        logger.info(
            "embeddings: %d train and %d validation vectors of %d floats from %s; embeddings %s (%s), cache entry %s (%.1f MB)",
            data.train_size, data.validation_size, data.embedding_size, data.backbone_description,
            "reused from cache" if data.embedding_cache_hit else "computed", data.embedding_precision, data.embedding_cache_path,
            data.embedding_cache_bytes / 1e6,
        )
        with hold_run_folder(config):
            if not resume:
                write_snapshot(config)
            results = _run_tuner(config, embeddings, resume=resume)
            return _write_outputs(config, data, results, time.monotonic() - started, resumed=resume)
    finally:
        if started_ray:
            ray.shutdown()


def _prepare_on_cluster(config: ExperimentConfig) -> tuple[PreparedData, ray.ObjectRef]:
    """Run prepare_data as a Ray task; return its summary and a reference to the embeddings.

    The embeddings come back as a separate return value that the driver never
    fetches: Tune's with_parameters keeps an ObjectRef as it is, so the trials
    read the one copy in the object store.

    Raises:
        ConfigError: If the backbone section cannot be built (for example a
            weights file that does not fit the network).
    """
    # Ask for a GPU only when the cluster has one, so CPU-only clusters can schedule the task.
    # Ray (2.60) sets max_calls=1 for GPU tasks, so the worker exits afterwards and
    # TensorFlow's GPU memory is free for the trials.
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=1, num_returns=2)(prepare_data)
    if gpus == 0:
        # Prefer the driver's node: the export at the end loads the backbone from this node's
        # cache, so it finds the weights the embeddings came from.
        # NOTE: a GPU task may run on another node; then the export pretrains the backbone
        # again unless cache_dir is on storage every node can reach.
        task = task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True))
    summary_ref, embeddings_ref = task.remote(config)
    try:
        summary = ray.get(summary_ref)
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, BackboneError):
            raise ConfigError(f"backbone: {error.cause}") from None
        raise
    return summary, embeddings_ref


def _run_tuner(config: ExperimentConfig, embeddings: Any, *, resume: bool) -> tune.ResultGrid:
    space = search_space(config)
    search = config.search
    # Save the experiment state (trials and searcher) every few seconds. Ray Tune also saves it
    # after each trial checkpoint (CheckpointConfig(num_to_keep=1)), and every trial checkpoints
    # its last epoch, marked as finished, so a trial that finished is never trained again after
    # a crash. Saving at every step of Ray Tune's loop took about two thirds of the driver's CPU.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")
    # Ctrl-C raises KeyboardInterrupt out of fit() instead of Ray Tune's own handling, which
    # returned partial results as if the run had finished. The state saved at the last
    # step is what `--resume` continues from.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    # Ray Tune adds a TensorBoard logger by default, and with PyTorch installed its import
    # alone cost the driver 3-5 s of CPU at every start (measured with py-spy). The CSV and
    # JSON loggers (progress.csv and result.json in each trial folder) are passed explicitly.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    settings = TrialSettings(
        metric=search.metric, mode=search.mode, max_epochs=config.training.max_epochs, patience=config.training.patience,
        fixed_hyperparameters=dict(config.head), cpus_per_trial=config.resources.cpus_per_trial,
        gpus_per_trial=config.resources.gpus_per_trial, seed=search.seed or 0,
        # ASHA may stop a trial at any epoch, so each improvement is checkpointed at once.
        checkpoint_interval_seconds=0.0 if config.scheduler.name == "asha" else config.training.checkpoint_seconds,
    )
    trainable = tune.with_resources(
        tune.with_parameters(train_head, data=embeddings, settings=settings),
        {"cpu": config.resources.cpus_per_trial, "gpu": config.resources.gpus_per_trial},
    )
    if config.scheduler.name == "asha":
        scheduler = ASHAScheduler(
            time_attr="training_iteration", max_t=config.training.max_epochs,
            grace_period=min(config.scheduler.grace_period, config.training.max_epochs),
            reduction_factor=config.scheduler.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()

    if resume:
        logger.info("experiment %s: resuming the interrupted run in %s", config.name, config.run_dir())
        try:
            tuner = tune.Tuner.restore(config.run_dir(), trainable=trainable, resume_unfinished=True, resume_errored=False, restart_errored=False)
        except (RuntimeError, ValueError, FileNotFoundError) as error:
            raise ExperimentError(f"cannot resume the experiment in {config.run_dir()}: {error}") from None
        return tuner.fit()

    # Imported here because the feature task's worker imports this module too and needs no searcher.
    from tuning.searcher import GaussianProcessSearcher

    searcher = GaussianProcessSearcher(
        space, metric=search.metric, mode=search.mode, initial_points=search.initial_points,
        acquisition_function=search.acquisition, seed=search.seed, points_to_evaluate=search.points_to_evaluate,
    )
    warm_start = load_warm_start(config)
    for point, value in warm_start:
        searcher.add_evaluated_point(point, value)
    finished = sum(math.isfinite(value) for _, value in warm_start)
    if finished:
        logger.info(
            "warm start: registered %d finished and %d failed trials from %s", finished, len(warm_start) - finished, search.warm_start,
        )
    elif search.warm_start is not None:
        logger.warning(
            "warm start: %s has no completed trial with a finite best_%s; the search starts without earlier results",
            search.warm_start, search.metric,
        )
    if not finished and search.num_trials <= search.initial_points:
        logger.warning(
            "search.num_trials (%d) is not above search.initial_points (%d): every trial is a random point and the "
            "Gaussian process chooses none; raise num_trials or lower initial_points",
            search.num_trials, search.initial_points,
        )
    # The searcher ends once every configuration of a discrete space has been used, warm-start ones included.
    expected_trials = search.num_trials
    if search.distinct_configurations is not None:
        tried = distinct_points(warm_start)
        untried = search.distinct_configurations - tried
        if untried < search.num_trials:
            expected_trials = untried
            logger.warning(
                "the search space has %d distinct configurations%s, fewer than search.num_trials (%d): the run ends "
                "once each has been tried, because a repeated configuration trains the same head again",
                search.distinct_configurations, f" and the warm start tried {tried}, which leaves {untried}" if tried else "",
                search.num_trials,
            )
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=search.metric, mode=search.mode, search_alg=ConcurrencyLimiter(searcher, max_concurrent=search.max_concurrent),
            scheduler=scheduler, num_samples=search.num_trials, trial_dirname_creator=trial_dirname,
            # A reused worker keeps TensorFlow imported and initialised: the next trial
            # starts in well under a second instead of importing TensorFlow again.
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=config.name, storage_path=config.storage_path(), verbose=0,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=f"best_{search.metric}", checkpoint_score_order=search.mode),
            # Retries are for trials whose worker or node died. A trial that fails by
            # itself ends with a `failure` report instead of raising (see train_head).
            failure_config=tune.FailureConfig(max_failures=config.training.max_failures),
            callbacks=[
                ProgressLogger(expected_trials, search.metric, search.mode), ExportPreloader(expected_trials),
                CSVLoggerCallback(), JsonLoggerCallback(),
            ],
        ),
    )
    logger.info(
        "experiment %s: %d %s, at most %d at a time, %s search on %s",
        config.name, expected_trials, "trial" if expected_trials == 1 else "trials", search.max_concurrent,
        search.acquisition, ", ".join(space.names),
    )
    return tuner.fit()


def trial_dirname(trial: Any) -> str:
    """Name a trial's folder by its number and hyperparameter values, e.g. `00003_learning_rate=0.0012_units_1=128`.

    The number is Ray's trial counter, which starts at 1 in the order trials are created.
    """
    parts = [f"{name}={_format_value(value)}" for name, value in sorted(trial.config.items())]
    name = "_".join([trial_number(trial), *parts])
    return name[:MAX_TRIAL_DIRNAME].replace("/", "-")


def trial_number(trial: Any) -> str:
    """Return Ray's trial counter as five digits, the number used in folder names and results.csv."""
    counter = str(trial.experiment_tag).split("_", 1)[0]
    return f"{int(counter):05d}" if counter.isdigit() else counter


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


class ProgressLogger(tune.Callback):
    """Log one line per finished or failed trial with the best value so far.

    Lines wait for the end of Ray Tune's step. The experiment state is saved
    only every few seconds, but a trial logged as finished keeps its result
    after a crash of the driver, because its last checkpoint marks it as
    finished and `--resume` then trains nothing for it.
    """

    def __init__(self, num_trials: int, metric: str, mode: str) -> None:
        self._num_trials = num_trials
        self._metric = metric
        self._sign = -1.0 if mode == "min" else 1.0
        self._lines: list[tuple[int, str]] = []

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result
        done = _count_done(trials, trial)
        if result.get(FAILURE_KEY):
            self._lines.append((logging.WARNING, (
                f"trial {trial_number(trial)} ({trial.trial_id}) failed, {done} of {self._num_trials} done: {result[FAILURE_KEY]}"
            )))
            return
        value = result.get(f"best_{self._metric}")
        # Scanning every trial, rather than keeping a running best, stays right after a resume.
        finished = [other.last_result.get(f"best_{self._metric}") for other in trials if other is trial or other.status == Trial.TERMINATED]
        finished = [other for other in finished if other is not None and math.isfinite(other)]
        best = max(finished, key=lambda other: self._sign * other) if finished else None
        self._lines.append((logging.INFO, (
            f"trial {trial_number(trial)} ({trial.trial_id}) finished, {done} of {self._num_trials} done: "
            f"{self._metric} {_number(value)} at best epoch {result.get('best_epoch')} of {result.get('epoch')}, "
            f"val_accuracy {_number(result.get('best_val_accuracy'))}; best so far {_number(best)}"
        )))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._lines.append((logging.WARNING, (
            f"trial {trial_number(trial)} ({trial.trial_id}) failed, {_count_done(trials, trial)} of {self._num_trials} done: "
            f"{_first_line(trial)}"
        )))

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._lines.append((logging.WARNING, (
            f"trial {trial_number(trial)} ({trial.trial_id}) lost its worker ({_first_line(trial)}); "
            f"retrying it from its last checkpoint (at most {trial.max_failures} retries per trial)"
        )))

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        for level, line in self._lines:
            logger.log(level, line)
        self._lines.clear()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.on_step_end(0, trials)


class ExportPreloader(tune.Callback):
    """A Ray Tune callback that starts importing the export's modules once at most one trial is left to run.

    The export after the last trial needs TensorFlow in the driver, and the
    import took 3-4 s there with the cores idle. Started while the last trial
    runs, it overlaps that trial, usually on a core the trial leaves free.
    """

    def __init__(self, num_trials: int) -> None:
        self._num_trials = num_trials

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._start_when_last(trials, ending=None)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._start_when_last(trials, ending=trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._start_when_last(trials, ending=trial)

    def _start_when_last(self, trials: list, ending: Any) -> None:
        unfinished = len(trials) - _count_done(trials, ending)
        if len(trials) >= self._num_trials and unfinished <= 1:
            start_export_imports()


# The thread that imports the export's modules. Ray Tune calls the callbacks from the
# driver's one control loop, so the check in start_export_imports starts it once per process.
_export_imports: threading.Thread | None = None


def start_export_imports() -> None:
    """Import TensorFlow, the model modules and matplotlib in a daemon thread, unless a call has started that already."""
    global _export_imports
    if _export_imports is None:
        _export_imports = threading.Thread(target=_import_export_modules, name="export-imports", daemon=True)
        _export_imports.start()


def wait_for_export_imports() -> None:
    """Wait until the thread of start_export_imports, if one started, has finished its imports.

    The outputs import the same modules. A module that one thread imports while
    another waits for it can reach the waiting thread half initialized (for
    example matplotlib.pyplot without switch_backend), so the outputs wait here.
    """
    if _export_imports is not None:
        _export_imports.join()


def _import_export_modules() -> None:
    import matplotlib

    import models.backbones  # noqa: F401 - imported for its side effect of loading TensorFlow
    import models.classifier  # noqa: F401

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401


def _count_done(trials: list, ending: Any) -> int:
    """Count finished and failed trials, `ending` included (its status changes after the callback)."""
    return sum(1 for trial in trials if trial is ending or trial.status in (Trial.TERMINATED, Trial.ERROR))


def _number(value: Any) -> str:
    return "nan" if value is None else f"{value:.4f}"


def _first_line(trial: Any) -> str:
    error_file = getattr(trial, "error_file", None)
    if error_file and os.path.exists(error_file):
        lines = [line for line in Path(error_file).read_text().splitlines() if line.strip()]
        return lines[-1] if lines else "unknown error"
    return "unknown error"


def _write_outputs(
    config: ExperimentConfig, data: PreparedData, results: tune.ResultGrid, elapsed: float, *, resumed: bool,
) -> ExperimentOutcome:
    """Write the convergence plot, the best model, best_config.json, report.md and, last, results.csv.

    `elapsed` counts from this command's start, so after `--resume` it leaves
    out the time before the interruption, and the log and report state it.
    """
    wait_for_export_imports()
    parameter_names = search_space(config).names
    frame = report.results_frame(results, parameter_names, config.search.metric)
    if frame.empty:
        # load_warm_start rejects a warm start that leaves no configuration untried, so only a searcher that
        # returned FINISHED at its first suggestion gets here.
        raise ExperimentError(f"no trial ran in {config.run_dir()}; the searcher suggested no configuration")
    finished = frame[frame["status"] == report.STATUS_COMPLETED]
    if finished.empty:
        # results.csv still records each trial's reason, so the user can see what to change.
        with output_folder(config) as run_dir:
            report.write_csv(frame, run_dir / "results.csv")
        raise ExperimentError(
            f"all {len(frame)} trials failed; their reasons are in the error column of {config.run_dir()}/results.csv; "
            "fix the search space and start a new run with --name"
        )

    best_row = report.best_row(frame, config.search.metric, config.search.mode)
    best_trial_id = str(best_row["trial_id"])
    best_trial_number = f"{int(best_row['trial_number']):05d}"
    best_result = next(result for result in results if result.path == best_row["path"])
    best_tuned = {name: _python_value(best_row[name]) for name in parameter_names}
    best_hyperparameters = config.head_hyperparameters(best_tuned)
    best_metrics = {name: _python_value(best_row[name]) for name in report.best_metric_columns(frame)}

    try:
        with output_folder(config) as run_dir:
            report.plot_convergence(frame, config.search.metric, config.search.mode, run_dir / "convergence.png")
            model_path = _export_best_model(config, data, best_result, best_hyperparameters, run_dir / "best_model.keras")
            test_scores = score_on_test(config, model_path)
            _write_json(run_dir / "best_config.json", {
                "trial_number": best_trial_number, "trial_id": best_trial_id, "hyperparameters": best_hyperparameters,
                "metrics": best_metrics,
                "metric": config.search.metric, "mode": config.search.mode,
                "test": test_scores,
            })
            report.write_report(
                frame, config, run_dir / "report.md", best_trial=f"{best_trial_number} ({best_trial_id})", wall_seconds=elapsed, model_path=model_path,
                data_summary=_data_summary(data), test_scores=test_scores, resumed=resumed,
            )
            # results.csv marks the run as finished, so it comes last: if an earlier output
            # fails, the run stays interrupted and --resume writes the outputs again.
            report.write_csv(frame, run_dir / "results.csv")
    except OSError as error:
        raise ExperimentError(
            f"writing the outputs in {config.run_dir()} failed ({error}); every trial is saved, so fix the cause "
            "(disk space, permissions) and run the same command with --resume to write them"
        ) from None
    since = " since the resume" if resumed else ""
    logger.info("experiment %s finished in %.0f s%s; outputs in %s", config.name, elapsed, since, config.run_dir())
    return ExperimentOutcome(
        run_dir=config.run_dir(), best_trial_id=best_trial_id, best_trial_number=best_trial_number, best_config=best_hyperparameters, best_metrics=best_metrics,
        num_trials=len(frame), num_failed=int((frame["status"] != report.STATUS_COMPLETED).sum()), wall_seconds=elapsed, data=data,
        test_scores=test_scores, resumed=resumed,
    )


def _export_best_model(config: ExperimentConfig, data: PreparedData, best_result: Any, hyperparameters: dict[str, Any], path: Path) -> Path:
    """Join the frozen backbone and the best trial's head into one model file."""
    from models.backbones import build_feature_extractor
    from models.classifier import build_head, export_model

    checkpoint = best_result.checkpoint
    if checkpoint is None:
        raise ExperimentError(f"the best trial {best_result.metrics.get('trial_id')} kept no checkpoint; nothing to export")
    steps_per_epoch = max(1, math.ceil(data.train_size / int(hyperparameters["batch_size"])))
    head = build_head(data.embedding_size, data.num_classes, data.mean, data.variance, hyperparameters, steps_per_epoch)
    # The checkpoint contains the optimizer's variables too. Creating them here lets it load
    # whole, without Keras' warning that it skips them. The exported file has no optimizer.
    head.optimizer.build(head.trainable_variables)
    with checkpoint.as_directory() as folder:
        head.load_weights(str(Path(folder) / HEAD_WEIGHTS_FILE))

    backbone = _load_backbone(config)
    extractor = build_feature_extractor(data.raw_shape, data.value_range, config.backbone.image_size, backbone.cnn)
    metadata = {
        "experiment": config.name, "backbone": config.backbone.label, "backbone_description": backbone.description,
        "image_size": config.backbone.image_size,
        "raw_shape": list(data.raw_shape), "value_range": list(data.value_range), "hyperparameters": hyperparameters,
    }
    return export_model(extractor, head, data.class_names, path, metadata=metadata)


def _data_summary(data: PreparedData) -> dict[str, Any]:
    return {
        "train_images": data.train_size, "validation_images": data.validation_size,
        "embedding_size": data.embedding_size, "classes": data.class_names, "backbone_description": data.backbone_description,
        "backbone_cache_hit": data.backbone_cache_hit, "embedding_cache_hit": data.embedding_cache_hit,
        "embedding_precision": data.embedding_precision,
    }


def _write_json(path: Path, content: dict[str, Any]) -> None:
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(content, indent=2, default=_python_value) + "\n")
    os.replace(temporary, path)


def _python_value(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return value
