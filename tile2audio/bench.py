"""Speed benchmark: ``tile2audio bench {features,sampler,train,all}``.

Measures, on the built-in synthetic demo data (or a folder of labelled audio):

``features``
    Log-mel extraction (:func:`tile2audio.features.build_cache`): clips per second and
    real-time factor (seconds of audio per wall-clock second), in one process
    (``per_process``, jobs=1) and with every core (``all_cores``, jobs=os.cpu_count()).
    The top-level ``clips_per_s`` / ``realtime_factor`` are the all-cores figures (what
    ``tile2audio features`` does by default).
``sampler``
    :func:`tile2audio.sampler.measure_sampler`: triplets per second of the tf.data
    sampler, of the reference sampler that decodes audio per triplet in Python (the
    predecessor's design), and their ratio.
``train``
    For each encoder (cnn, crnn, resnet18, default :class:`ModelConfig` widths, batch
    :attr:`TrainConfig.batch_size`): triplets per second and ms per step of the trainer's
    own train step, with the input pipeline (``fit`` on the sampler's dataset) and
    without it (``model_only_*``: the same step on one fixed in-memory batch). The first
    step (graph tracing, pool loading) is timed apart (``first_step_s``) and excluded.
    ``memory_bounded``: peak RSS of a short training run whose ``sampler.memory_gb`` is a
    quarter of the cache's float32 size (so the sampler rotates pools), beside the same
    run with an unbounded budget, and the budget itself.

Every stage (and every encoder) runs in a fresh child process (multiprocessing
``spawn``) and reports that process's peak resident memory (``peak_rss_mb``, from
``getrusage``), so stages do not inherit each other's memory. Training uses a GPU when
TensorFlow sees one; ``device`` says which.

Nothing is printed here (``tile2audio bench`` prints the returned dict as JSON); output of
the libraries in the child processes goes to stderr.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from . import atomic
from .config import ExperimentConfig, FeatureParams, TrainingConfig, to_dict
from .errors import Tile2AudioError

WHAT = ("features", "sampler", "train", "all")
ENCODERS = ("cnn", "crnn", "resnet18")

#: Steps of the memory-bounded run, and pool rotation period (so several pools load).
MEMORY_STEPS = 8
MEMORY_ROTATE_STEPS = 2


def run_bench(
    what: str,
    data: str | os.PathLike | None = None,
    seconds: float = 5.0,
    json_path: str | os.PathLike | None = None,
    *,
    settings: ExperimentConfig | None = None,
    encoders: Sequence[str] = ENCODERS,
) -> dict:
    """Measure feature extraction, sampling and training speed (and peak memory).

    Parameters
    ----------
    what : {"features", "sampler", "train", "all"}
        Which stages to measure.
    data : path, optional
        A folder of labelled audio (one sub-folder per label, see
        :func:`tile2audio.datasets.build_manifest` ``"folder"``). Default: the synthetic
        demo data set (:func:`tile2audio.synth.make_demo_dataset`, 5 x 20 clips of 10 s),
        written to a temporary folder.
    seconds : float
        Measuring time per figure (after warm-up).
    json_path : path, optional
        Also write the result there as JSON (atomically).
    settings : ExperimentConfig, optional
        Feature, tile, sampler, model and batch settings (default
        ``ExperimentConfig()``; the model section's encoder is replaced by each of
        ``encoders`` in turn).
    encoders : sequence of str
        Encoders to time in the ``train`` stage.

    Returns
    -------
    dict
        ``{"what", "data", "cpu_count", "seconds", "settings", "features": {...},
        "sampler": {...}, "train": {"device", "cnn": {...}, "crnn": {...},
        "resnet18": {...}, "peak_rss_mb", "memory_bounded": {...}}}`` (only the stages
        asked for); rates are per second, memory in MiB.

    Raises
    ------
    Tile2AudioError
        Unknown ``what`` or encoder, ``seconds`` <= 0, unusable data, or a stage whose
        child process died.
    """
    stages = _stages(what)
    encoders = _check_encoders(encoders)
    if not seconds > 0:
        raise Tile2AudioError(f"bench: seconds must be > 0, got {seconds!r}")
    settings = settings or ExperimentConfig()
    result: dict[str, Any] = {
        "what": what, "data": str(data) if data is not None else "synthetic",
        "cpu_count": os.cpu_count(), "seconds": float(seconds), "settings": _settings_summary(settings),
    }
    with tempfile.TemporaryDirectory(prefix="tile2audio-bench-") as tmp:
        work = Path(tmp)
        manifest, result["clips"] = _prepare_data(data, work, settings.features.sample_rate)
        if "features" in stages:
            result["features"] = _in_child("features", _features_stage, manifest, work / "features",
                                           settings.features, seconds)
        if "sampler" in stages or "train" in stages:
            cache = _in_child("cache", _cache_stage, manifest, work / "cache", settings.features)["path"]
        if "sampler" in stages:
            result["sampler"] = _in_child("sampler", _sampler_stage, cache, settings.training, manifest, seconds)
        if "train" in stages:
            result["train"] = _train_all(cache, settings.training, encoders, work, seconds)
    if json_path is not None:
        atomic.write_json(json_path, result)
    return result


# --------------------------------------------------------------------------- setup


def _stages(what: str) -> tuple[str, ...]:
    """The stages ``what`` asks for."""
    if what not in WHAT:
        raise Tile2AudioError(f"bench: what must be one of {', '.join(WHAT)}, got {what!r}")
    return ("features", "sampler", "train") if what == "all" else (what,)


def _check_encoders(encoders: Sequence[str]) -> tuple[str, ...]:
    """Validate the encoder names."""
    encoders = tuple(encoders)
    unknown = [e for e in encoders if e not in ENCODERS]
    if unknown or not encoders:
        raise Tile2AudioError(f"bench: encoders must be some of {', '.join(ENCODERS)}, got {list(encoders)}")
    return encoders


def _settings_summary(settings: ExperimentConfig) -> dict:
    """The settings that shape the figures, for the JSON."""
    return {"features": to_dict(settings.features), "tiles": to_dict(settings.tiles),
            "sampler": to_dict(settings.sampler), "model": to_dict(settings.model),
            "batch_size": settings.train.batch_size}


def _prepare_data(data: str | os.PathLike | None, work: Path, sample_rate: int) -> tuple[Path, int]:
    """Write the manifest of the data to measure (synthetic by default); return its path and clip count."""
    from .datasets import build_manifest, read_manifest, write_manifest

    target = work / "manifest.csv"
    if data is None:
        from .synth import make_demo_dataset

        made = make_demo_dataset(work / "data", sample_rate=sample_rate, seed=0, progress=False)
        write_manifest(read_manifest(made), target)
    else:
        write_manifest(build_manifest("folder", data), target)
    n_clips = len(read_manifest(target))
    if n_clips < 2:
        raise Tile2AudioError(f"bench needs at least two audio files, {data} has fewer")
    return target, n_clips


# --------------------------------------------------------------------------- child processes


def _peak_rss_mb(who: str = "self") -> float | None:
    """Peak resident memory (MiB) of this process (or of its finished children)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return None
    usage = resource.getrusage(resource.RUSAGE_SELF if who == "self" else resource.RUSAGE_CHILDREN)
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    return usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


def _current_rss_mb() -> float | None:
    """Current resident memory (MiB) of this process, from /proc (None elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _child_main(fn: Callable[..., dict], args: tuple) -> dict:
    """Run a stage in the child, stdout to stderr, and add the child's peak RSS."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with contextlib.redirect_stdout(sys.stderr):
        out = fn(*args)
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def _in_child(name: str, fn: Callable[..., dict], *args: Any) -> dict:
    """Run ``fn(*args)`` in a fresh spawned process and return its dict."""
    return _in_children({name: (fn, args)})[name]


def _in_children(jobs: dict[str, tuple[Callable[..., dict], tuple]]) -> dict[str, dict]:
    """Run each ``name: (fn, args)`` at the same time, each in its own fresh spawned process."""
    ctx = multiprocessing.get_context("spawn")
    with contextlib.ExitStack() as stack:
        futures = {}
        for name, (fn, args) in jobs.items():
            pool = stack.enter_context(ProcessPoolExecutor(max_workers=1, mp_context=ctx))
            futures[name] = pool.submit(_child_main, fn, args)
        out = {}
        for name, future in futures.items():
            try:
                out[name] = future.result()
            except BrokenProcessPool as exc:
                raise Tile2AudioError(
                    f"bench: the {name} stage's process died (out of memory?); try smaller data") from exc
        return out


# --------------------------------------------------------------------------- features


def _features_stage(manifest: Path, out: Path, params: FeatureParams, seconds: float) -> dict:
    """Time build_cache in one process and with every core."""
    from .datasets import read_manifest, resolve_paths
    from .features import extract_clip

    df = read_manifest(manifest)
    paths = resolve_paths(df)
    extract_clip(paths[0], params)  # warm-up: imports, numba compilation, FFT plans
    started = time.perf_counter()
    extract_clip(paths[1 % len(paths)], params)
    per_clip = max(time.perf_counter() - started, 1e-3)
    jobs = os.cpu_count() or 1
    n1 = min(len(df), max(1, math.ceil(seconds / per_clip)))
    n_all = min(len(df), max(jobs, n1 * jobs))
    per_process = _time_build(df.iloc[:n1], out / "jobs1", params, jobs=1)
    try:
        # Start the worker processes (fresh interpreters importing librosa) first: that
        # one-off cost is reported as startup_s, not mixed into the throughput.
        startup = _time_build(df.iloc[:jobs], out / "warmup", params, jobs=jobs)["wall_seconds"]
        all_cores = _time_build(df.iloc[:n_all], out / f"jobs{jobs}", params, jobs=jobs)
    finally:
        _stop_feature_workers()
    all_cores["startup_s"] = startup
    return {"clips_per_s": all_cores["clips_per_s"], "realtime_factor": all_cores["realtime_factor"],
            "per_process": per_process, "all_cores": all_cores,
            "workers_peak_rss_mb": _peak_rss_mb("children")}


def _stop_feature_workers() -> None:
    """Stop build_cache's idle worker processes (joblib/loky keeps them for minutes)."""
    from joblib.externals.loky import get_reusable_executor

    get_reusable_executor().shutdown(wait=True)


def _time_build(df, out: Path, params: FeatureParams, jobs: int) -> dict:
    """Wall time of one cache build of ``df``'s clips."""
    from .features import build_cache

    # Enough chunks that every worker gets some (build_cache spreads chunks over processes).
    chunk = max(1, min(32, math.ceil(len(df) / (4 * jobs))))
    started = time.perf_counter()
    cache = build_cache(df, out, params, jobs=jobs, chunk_clips=chunk, progress=False)
    wall = time.perf_counter() - started
    audio = float(cache.index["duration_s"].sum())
    return {"jobs": jobs, "clips": len(cache.index), "audio_seconds": round(audio, 3),
            "wall_seconds": round(wall, 3), "clips_per_s": len(cache.index) / wall,
            "realtime_factor": audio / wall}


def _cache_stage(manifest: Path, out: Path, params: FeatureParams) -> dict:
    """Build the cache that the sampler and training stages read."""
    from .features import build_cache

    try:
        cache = build_cache(manifest, out, params, progress=False)
    finally:
        _stop_feature_workers()
    return {"path": str(cache.path), "clips": len(cache.index)}


# --------------------------------------------------------------------------- sampler


def _sampler_stage(cache_dir: str, training: TrainingConfig, manifest: Path, seconds: float) -> dict:
    """measure_sampler on the cache, with the per-triplet-decoding reference."""
    from .datasets import read_manifest, resolve_paths
    from .features import extract_clip, open_cache
    from .sampler import measure_sampler

    paths = resolve_paths(read_manifest(manifest))
    cache = open_cache(cache_dir)
    # Warm up the reference's decoder (imports, numba compilation): measure_sampler
    # times its first triplet too, which would charge it seconds of one-off start-up.
    extract_clip(paths[0], cache.params)
    out = measure_sampler(cache, training.tiles, training.sampler, training.train.batch_size,
                          seconds=seconds, reference_paths=paths, reference_seconds=seconds)
    return dict(out)


# --------------------------------------------------------------------------- training


def _train_all(cache: str, training: TrainingConfig, encoders: tuple[str, ...], work: Path,
               seconds: float) -> dict:
    """Every encoder's speed, each in its own process, then the memory-bounded run."""
    out: dict[str, Any] = {}
    for enc in encoders:
        cfg = replace(training, model=replace(training.model, encoder=enc))
        out[enc] = _in_child(f"train ({enc})", _train_stage, cache, cfg, seconds)
    out["device"] = out[encoders[0]]["device"]
    out["peak_rss_mb"] = max((out[e]["peak_rss_mb"] or 0.0) for e in encoders)
    # Only peak memory is compared here, so the two runs may share the CPU.
    runs = _in_children({
        "memory-bounded training": (_memory_stage, (cache, training, work / "run-bounded", True)),
        "unbounded training": (_memory_stage, (cache, training, work / "run-unbounded", False)),
    })
    bounded, unbounded = runs["memory-bounded training"], runs["unbounded training"]
    bounded["unbounded_peak_rss_mb"] = unbounded["peak_rss_mb"]
    bounded["unbounded_budget_mb"] = unbounded["budget_mb"]
    out["memory_bounded"] = bounded
    return out


def _device() -> str:
    """``cpu``, or the first visible GPU (which TensorFlow then uses by default)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "cpu"
    details = tf.config.experimental.get_device_details(gpus[0])
    return f"{gpus[0].name} ({details.get('device_name', 'GPU')})"


def _train_stage(cache_dir: str, training: TrainingConfig, seconds: float) -> dict:
    """Triplets/s of the trainer's step, with and without the input pipeline."""
    import keras

    from .features import open_cache
    from .rules import choose_training
    from .sampler import TripletSampler
    from .train import build_triplet_model, make_optimizer

    cache = open_cache(cache_dir)
    training, _ = choose_training(training, cache.index, cache.frames_per_second)  # as train() does
    t = training.train
    keras.utils.set_random_seed(t.seed)
    sampler = TripletSampler(cache, training.tiles, training.sampler, batch_size=t.batch_size, seed=t.seed)
    model = build_triplet_model(training, sampler.tile_shape, cache.params.normalize)
    model.compile(optimizer=make_optimizer(training))
    fixed = next(iter(sampler.dataset()))
    with_pipeline = _time_fit(model, sampler.dataset(), seconds, t.batch_size)
    import tensorflow as tf

    model_only = _time_fit(model, tf.data.Dataset.from_tensors(fixed).repeat(), seconds, t.batch_size)
    return {
        "device": _device(), "batch_size": t.batch_size, "tile_shape": list(sampler.tile_shape),
        "encoder_params": int(model.encoder.count_params()),
        "triplets_per_s": with_pipeline["triplets_per_s"], "ms_per_step": with_pipeline["ms_per_step"],
        "model_only_triplets_per_s": model_only["triplets_per_s"],
        "model_only_ms_per_step": model_only["ms_per_step"],
        "first_step_s": with_pipeline["first_step_s"], "steps_timed": with_pipeline["steps"],
        "model_only_steps_timed": model_only["steps"],
    }


def _time_fit(model, dataset, seconds: float, batch_size: int) -> dict:
    """Run ``fit`` until ``seconds`` have passed after the first step; time the later steps."""
    import keras

    class Timer(keras.callbacks.Callback):
        """Record the end of every step (waiting for it) and stop after ``seconds``."""

        def on_train_begin(self, logs=None):
            self.begin, self.ends = time.perf_counter(), []

        def on_train_batch_end(self, batch, logs=None):
            for value in (logs or {}).values():
                float(value)  # block until the step has really finished (GPUs run ahead)
                break
            self.ends.append(time.perf_counter())
            if len(self.ends) >= 3 and self.ends[-1] - self.ends[0] >= seconds:
                self.model.stop_training = True

    timer = Timer()
    model.fit(dataset, epochs=1, steps_per_epoch=10**9, callbacks=[timer], verbose=0)
    steps = len(timer.ends) - 1
    per_step = (timer.ends[-1] - timer.ends[0]) / steps
    return {"steps": steps, "ms_per_step": 1000.0 * per_step, "triplets_per_s": batch_size / per_step,
            "first_step_s": timer.ends[0] - timer.begin}


def _memory_stage(cache_dir: str, training: TrainingConfig, out: Path, bounded: bool) -> dict:
    """A short real training run (tile2audio.train.train); budget = cache / 4 when bounded."""
    import tensorflow as tf  # noqa: F401  (imported before the baseline reading)

    from .features import open_cache
    from .sampler import TripletSampler
    from .train import train

    cache = open_cache(cache_dir)
    t = training.train
    size = TripletSampler(cache, training.tiles, training.sampler, batch_size=t.batch_size, seed=t.seed).total_nbytes
    budget = size / 4 if bounded else max(size * 2, 2**20)
    cfg = replace(
        training,
        sampler=replace(training.sampler, memory_gb=budget / 2**30, rotate_steps=MEMORY_ROTATE_STEPS),
        train=replace(t, epochs=1, steps_per_epoch=MEMORY_STEPS, checkpoint_every_steps=MEMORY_STEPS,
                      probe_every_epochs=0, warmup_steps=0),
    )
    rotating = TripletSampler(cache, cfg.tiles, cfg.sampler, batch_size=t.batch_size, seed=t.seed).rotating
    baseline = _current_rss_mb()
    started = time.perf_counter()
    train(cache_dir, out, cfg, exact=True, progress=False)
    return {"encoder": cfg.model.encoder, "steps": MEMORY_STEPS, "rotate_steps": MEMORY_ROTATE_STEPS,
            "rotating": rotating, "cache_float32_mb": size / 2**20, "budget_mb": budget / 2**20,
            "rss_before_training_mb": baseline, "wall_seconds": round(time.perf_counter() - started, 3)}
