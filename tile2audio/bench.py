"""Speed benchmark: ``tile2audio bench {features,sampler,train,all}``.

Measures, on the built-in synthetic demo data (or a folder of labelled audio):

``features``
    Log-mel extraction (:func:`tile2audio.features.build_cache`): clips per second and
    real-time factor (seconds of audio per wall-clock second), in one process
    (``per_process``, jobs=1) and with every core (``all_cores``, jobs=os.cpu_count()).
    The top-level ``clips_per_s`` / ``realtime_factor`` are the all-cores figures (what
    ``tile2audio features`` does by default).
``sampler``
    :func:`measure_sampler`: triplets per second of the tf.data
    sampler, of the reference sampler that decodes audio per triplet in Python (the
    predecessor's design), and their ratio; then the trainer's own step for the
    configured encoder on one fixed in-memory batch (``train_step_triplets_per_s``, as
    ``model_only_triplets_per_s`` of ``train``) and ``train_ratio``, sampler over train
    step: above 1 (3 is the target with BYOL-A views) the sampler keeps up with training.
    ``tile2audio bench sampler --set sampler.views=byola`` measures the views.
``train``
    For each encoder (cnn, crnn, resnet18, default :class:`ModelConfig` widths, batch
    :attr:`TrainConfig.batch_size`): triplets per second and ms per step of the trainer's
    own train step, with the input pipeline (``fit`` on the sampler's dataset) and
    without it (``model_only_*``: the same step on one fixed in-memory batch). The first
    step (graph tracing, pool loading) is timed apart (``first_step_s``) and excluded.
    Work and hardware use: ``gflop_per_triplet`` is counted layer by layer from the Keras
    model (:func:`forward_flops`: multiply-adds x 2 of every Conv2D, Conv2DTranspose, Dense
    and GRU/LSTM matrix product, over the three tiles of a triplet and the decoder if any;
    element-wise ops, batch norm and pooling are not counted), times 3 for forward plus
    backward (the backward pass costs about twice the forward: one product for the
    input gradient, one for the weight gradient). ``gflop_per_s`` is that times the
    model-only triplets/s; ``matmul_peaks`` are the median GFLOP/s of a square
    ``tf.linalg.matmul`` (4096 x 4096 by default) in float32 and bfloat16, measured in the
    same process just before the encoder's figures, and ``pct_of_fp32_peak`` /
    ``pct_of_bf16_peak`` the share of each that the model-only step reached.
    ``precision`` is the run's dtype policy (``train.precision``, ``auto`` resolved).
    ``embed_tiles_per_s``: tiles per second of :func:`tile2audio.embed.embed_frames` with
    the exported (saved) encoder in that precision, ``embed_float32_tiles_per_s`` with
    the same weights in float32, on one minute of frames in batches of 128.
    With ``baseline`` (``tile2audio bench train --baseline``), each encoder's process
    also times the same model built the pre-speed-work way
    (``build_triplet_model(..., baseline=True)``: float32, Keras's unfused batch norm)
    under ``baseline`` (same keys), and ``speedup`` / ``model_only_speedup`` are the
    ratios of triplets/s, fast over baseline. The two models' steps are interleaved
    (fast, baseline, fast, baseline, each ``seconds / 2``) and the median (with two
    halves, the mean) of each figure kept, so load from other processes on a shared
    machine hits both alike.
    ``memory_bounded``: peak RSS of a short training run whose ``sampler.memory_gb`` is a
    quarter of the cache's float32 size (so the sampler rotates pools), beside the same
    run with an unbounded budget, and the budget itself.
``embed``
    :func:`_embed_stage`, one process per encoder: the training step's tile rate
    (``train_tiles_per_s``: 3 x the model-only triplets/s of the trainer's own step, i.e.
    forward + backward over three tiles per triplet, as in ``train``), then a short real
    training run (:data:`EMBED_TRAIN_STEPS` steps) whose run is embedded with
    :func:`tile2audio.embed.embed`, end to end as ``tile2audio embed`` does it: from the
    audio files (``embed_tiles_per_s``, decoding and log-mel included) and from the
    feature cache (``embed_cache_tiles_per_s``); then exported
    (:func:`tile2audio.export.export_run`, float32 and in the run's precision) and the
    SavedModel, loaded with ``tf.saved_model.load``, timed on the same clips' waveforms,
    one call per clip (``saved_model_tiles_per_s``, ``saved_model_run_precision_tiles_per_s``;
    after one warm-up call). ``*_vs_train`` are the ratios to ``train_tiles_per_s``.

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
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from . import atomic
from .config import ENCODERS, ExperimentConfig, FeatureParams, TrainingConfig, to_dict
from .errors import Tile2AudioError

if TYPE_CHECKING:
    from .config import SamplerConfig, TileConfig
    from .tiles import TileGeometry

WHAT = ("features", "sampler", "train", "embed", "all")

#: Steps of the memory-bounded run, and pool rotation period (so several pools load).
MEMORY_STEPS = 8
MEMORY_ROTATE_STEPS = 2
#: Training steps of the run the ``embed`` stage embeds (its speed does not depend on them).
EMBED_TRAIN_STEPS = 4


def run_bench(
    what: str,
    data: str | os.PathLike | None = None,
    seconds: float = 5.0,
    json_path: str | os.PathLike | None = None,
    *,
    settings: ExperimentConfig | None = None,
    encoders: Sequence[str] = ENCODERS,
    baseline: bool = False,
    matmul_size: int = 4096,
) -> dict:
    """Measure feature extraction, sampling and training speed (and peak memory).

    Parameters
    ----------
    what : {"features", "sampler", "train", "embed", "all"}
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
    baseline : bool
        Also time each encoder built the old way (float32, unfused batch norm) in the
        same process and report the speed-ups (``train`` stage).
    matmul_size : int
        Side of the square matrices of the fp32 / bf16 matmul peaks (``train`` stage).

    Returns
    -------
    dict
        ``{"what", "data", "cpu_count", "seconds", "settings", "features": {...},
        "sampler": {...}, "train": {"device", "cnn": {...}, "crnn": {...},
        "resnet18": {...}, "peak_rss_mb", "memory_bounded": {...}}, "embed": {"cnn": {...}, ...}}`` (only the stages
        asked for); rates are per second, memory in MiB, work in GFLOP (10^9 FLOP).

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
    if isinstance(matmul_size, bool) or not isinstance(matmul_size, int) or matmul_size < 1:
        raise Tile2AudioError(f"bench: matmul_size must be a positive integer, got {matmul_size!r}")
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
        if "sampler" in stages or "train" in stages or "embed" in stages:
            cache = _in_child("cache", _cache_stage, manifest, work / "cache", settings.features)["path"]
        if "sampler" in stages:
            result["sampler"] = _in_child("sampler", _sampler_stage, cache, settings.training, manifest, seconds)
        if "train" in stages:
            result["train"] = _train_all(cache, settings.training, encoders, work, seconds,
                                         baseline=bool(baseline), matmul_size=matmul_size)
        if "embed" in stages:
            result["embed"] = {enc: _in_child(f"embed ({enc})", _embed_stage, cache, manifest,
                                              replace(settings.training, model=replace(settings.training.model,
                                                                                       encoder=enc)),
                                              work / f"embed-{enc}", seconds)
                               for enc in encoders}
    if json_path is not None:
        atomic.write_json(json_path, result)
    return result


# --------------------------------------------------------------------------- setup


def _stages(what: str) -> tuple[str, ...]:
    """The stages ``what`` asks for."""
    if what not in WHAT:
        raise Tile2AudioError(f"bench: what must be one of {', '.join(WHAT)}, got {what!r}")
    return ("features", "sampler", "train", "embed") if what == "all" else (what,)


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


def reference_triplets(paths: Sequence, params: FeatureParams, geometry: "TileGeometry",
                       seed: int = 0) -> Iterator[tuple]:
    """The predecessor's sampler, kept as a benchmark baseline: decode audio per triplet.

    For every triplet it picks an anchor file and another file at random, decodes both
    (:func:`tile2audio.audio.load_audio`), computes their log-mel
    (:func:`tile2audio.features.log_mel`) and cuts an anchor tile, a neighbour tile
    within the neighbourhood, and a random opposite tile. Slow by design.

    Parameters
    ----------
    paths : sequence of path-like
        At least two audio files.
    params : FeatureParams
        Front-end parameters.
    geometry : TileGeometry
        Tile and neighbourhood lengths.
    seed : int
        Seed of the stream.

    Yields
    ------
    tuple of np.ndarray
        ``(anchor, neighbour, opposite)``, each float32 (T, M) un-normalised log-mel.
    """
    import numpy as np

    from .audio import load_audio, loop_pad
    from .features import log_mel

    paths = list(paths)
    if len(paths) < 2:
        raise Tile2AudioError("reference_triplets needs at least two audio files")
    rng = np.random.default_rng(seed)
    t, hood = geometry.tile_frames, geometry.neighbourhood_frames

    def frames_of(path) -> np.ndarray:
        return loop_pad(log_mel(load_audio(path, params.sample_rate, params.channel), params), t)

    while True:
        i, j = rng.choice(len(paths), size=2, replace=False)
        anchor_frames, other_frames = frames_of(paths[i]), frames_of(paths[j])
        span = anchor_frames.shape[0] - t
        a = int(rng.integers(0, span + 1))
        n = int(rng.integers(max(0, a - hood), min(span, a + hood) + 1))
        o = int(rng.integers(0, other_frames.shape[0] - t + 1))
        yield (anchor_frames[a:a + t].astype(np.float32), anchor_frames[n:n + t].astype(np.float32),
               other_frames[o:o + t].astype(np.float32))


def measure_sampler(cache, tiles: "TileConfig", sampler: "SamplerConfig", batch_size: int,
                    seconds: float = 5.0, reference_paths: Sequence | None = None,
                    reference_seconds: float = 5.0, pool_dtype: str = "float16") -> dict:
    """Measure triplets per second of :class:`TripletSampler` (and of the reference sampler).

    Parameters
    ----------
    cache : FeatureCache
        The cache to sample from.
    tiles, sampler : TileConfig, SamplerConfig
        Sampling settings.
    batch_size : int
        Triplets per batch.
    seconds : float
        Time spent pulling batches after the first one (pool load and tracing excluded,
        reported as ``first_batch_s``).
    reference_paths : sequence of path-like, optional
        Audio files for :func:`reference_triplets`; skipped when None.
    reference_seconds : float
        Time spent on the reference sampler (at least one triplet).
    pool_dtype : str
        In-memory frame dtype, see :class:`TripletSampler`.

    Returns
    -------
    dict
        ``triplets_per_s``, ``reference_triplets_per_s`` and ``ratio`` (None without
        reference paths), ``peak_rss_mb`` (peak resident memory of this process),
        ``first_batch_s``, ``batch_size``, ``tile_shape``, ``pool_dtype``, ``rotating``.
    """
    import resource

    from .sampler import TripletSampler

    ts = TripletSampler(cache, tiles, sampler, batch_size=batch_size, seed=0, pool_dtype=pool_dtype)
    started = time.perf_counter()
    it = iter(ts.dataset())
    next(it)
    first = time.perf_counter() - started
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        next(it)
        count += batch_size
    rate = count / (time.perf_counter() - started)
    ref_rate = None
    if reference_paths is not None:
        geometry = ts.geometry  # the sampler resolved any auto tile setting
        gen = reference_triplets(reference_paths, cache.params, geometry, seed=0)
        n_ref, started = 0, time.perf_counter()
        while n_ref == 0 or time.perf_counter() - started < reference_seconds:
            next(gen)
            n_ref += 1
        ref_rate = n_ref / (time.perf_counter() - started)
    return {
        "triplets_per_s": rate,
        "reference_triplets_per_s": ref_rate,
        "ratio": rate / ref_rate if ref_rate else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "first_batch_s": first,
        "batch_size": int(batch_size),
        "tile_shape": list(ts.tile_shape),
        "pool_dtype": pool_dtype,
        "rotating": ts.rotating,
    }


def _sampler_stage(cache_dir: str, training: TrainingConfig, manifest: Path, seconds: float) -> dict:
    """measure_sampler on the cache, with the per-triplet-decoding reference."""
    from .datasets import read_manifest, resolve_paths
    from .features import extract_clip, open_cache

    paths = resolve_paths(read_manifest(manifest))
    cache = open_cache(cache_dir)
    # Warm up the reference's decoder (imports, numba compilation): measure_sampler
    # times its first triplet too, which would charge it seconds of one-off start-up.
    extract_clip(paths[0], cache.params)
    out = measure_sampler(cache, training.tiles, training.sampler, training.train.batch_size,
                          seconds=seconds, reference_paths=paths, reference_seconds=seconds)
    out = dict(out)
    out.update(_train_step_rate(cache, training, seconds))
    out["train_ratio"] = out["triplets_per_s"] / out["train_step_triplets_per_s"]
    return out


def _train_step_rate(cache, training: TrainingConfig, seconds: float) -> dict:
    """Triplets/s of the trainer's step (configured encoder) on one fixed batch, the sampler's yardstick."""
    import keras
    import tensorflow as tf

    from .rules import choose_training
    from .sampler import TripletSampler
    from .train import build_triplet_model, make_optimizer

    training, _ = choose_training(training, cache.index, cache.frames_per_second)  # as train() does
    t = training.train
    keras.utils.set_random_seed(t.seed)
    sampler = TripletSampler(cache, training.tiles, training.sampler, batch_size=t.batch_size, seed=t.seed)
    model = build_triplet_model(training, sampler.tile_shape, cache.params.normalize)
    model.compile(optimizer=make_optimizer(training), jit_compile=t.jit_compile)
    fixed = tf.data.Dataset.from_tensors(next(iter(sampler.dataset()))).repeat()
    timing = _time_fit(model, fixed, seconds, t.batch_size)
    return {"train_step_triplets_per_s": timing["triplets_per_s"], "train_step_ms": timing["ms_per_step"],
            "train_encoder": training.model.encoder}


# --------------------------------------------------------------------------- training


def _train_all(cache: str, training: TrainingConfig, encoders: tuple[str, ...], work: Path,
               seconds: float, baseline: bool = False, matmul_size: int = 4096) -> dict:
    """Every encoder's speed, each in its own process, then the memory-bounded run."""
    out: dict[str, Any] = {}
    for enc in encoders:
        cfg = replace(training, model=replace(training.model, encoder=enc))
        out[enc] = _in_child(f"train ({enc})", _train_stage, cache, cfg, seconds, baseline, matmul_size)
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


def _train_stage(cache_dir: str, training: TrainingConfig, seconds: float, baseline: bool = False,
                 matmul_size: int = 4096) -> dict:
    """Triplets/s of the trainer's step (with and without the input pipeline), its work and the peaks."""
    import keras
    import tensorflow as tf

    from .features import open_cache
    from .rules import choose_training
    from .sampler import TripletSampler
    from .train import build_triplet_model, make_optimizer, resolve_precision

    cache = open_cache(cache_dir)
    training, _ = choose_training(training, cache.index, cache.frames_per_second)  # as train() does
    t = training.train
    keras.utils.set_random_seed(t.seed)
    sampler = TripletSampler(cache, training.tiles, training.sampler, batch_size=t.batch_size, seed=t.seed)
    peaks = matmul_peaks(matmul_size)
    variants = {"fast": False, "baseline": True} if baseline else {"fast": False}
    models = {}
    for name, old in variants.items():
        model = build_triplet_model(training, sampler.tile_shape, cache.params.normalize, baseline=old)
        model.compile(optimizer=make_optimizer(training), jit_compile=t.jit_compile and not old)
        models[name] = model
    fixed = next(iter(sampler.dataset()))
    in_memory = tf.data.Dataset.from_tensors(fixed).repeat()
    # Interleaved halves: a burst of load from elsewhere hits both variants alike.
    timings: dict[str, dict[str, list]] = {name: {"pipeline": [], "model_only": []} for name in models}
    for _ in range(2):
        for name, model in models.items():
            timings[name]["pipeline"].append(_time_fit(model, sampler.dataset(), seconds / 2, t.batch_size))
            timings[name]["model_only"].append(_time_fit(model, in_memory, seconds / 2, t.batch_size))
    figures = {name: _step_figures(model, timings[name], t.batch_size, peaks)
               for name, model in models.items()}
    out = {
        "device": _device(), "precision": resolve_precision(t.precision),
        "batch_size": t.batch_size, "tile_shape": list(sampler.tile_shape),
        "encoder_params": int(models["fast"].encoder.count_params()),
        "matmul_peaks": peaks, **figures["fast"],
    }
    out.update(_embed_figures(models["fast"], training, sampler.geometry, int(sampler.tile_shape[1]), seconds))
    if baseline:
        out["baseline"] = figures["baseline"]
        out["speedup"] = out["triplets_per_s"] / out["baseline"]["triplets_per_s"]
        out["model_only_speedup"] = out["model_only_triplets_per_s"] / out["baseline"]["model_only_triplets_per_s"]
    return out


def _step_figures(model, timing: dict[str, list], batch_size: int, peaks: dict) -> dict:
    """Median step figures of one model, its GFLOP per triplet and the share of the peaks reached."""
    import statistics

    def median(kind: str) -> float:
        return statistics.median(run["ms_per_step"] for run in timing[kind])

    pipeline_ms, model_only_ms = median("pipeline"), median("model_only")
    per_tile = forward_flops(model.encoder)
    if getattr(model, "decoder", None) is not None:
        per_tile += forward_flops(model.decoder)
    # Three tiles per triplet; backward ~ 2 x forward (input and weight gradients).
    gflop = 3 * 3 * per_tile / 1e9
    rate = batch_size / (model_only_ms / 1000.0)
    achieved = gflop * rate
    return {
        "triplets_per_s": batch_size / (pipeline_ms / 1000.0), "ms_per_step": pipeline_ms,
        "model_only_triplets_per_s": rate, "model_only_ms_per_step": model_only_ms,
        "first_step_s": timing["pipeline"][0]["first_step_s"],
        "steps_timed": sum(run["steps"] for run in timing["pipeline"]),
        "model_only_steps_timed": sum(run["steps"] for run in timing["model_only"]),
        "gflop_per_triplet": gflop, "gflop_per_s": achieved,
        "pct_of_fp32_peak": 100.0 * achieved / peaks["float32_gflop_per_s"],
        "pct_of_bf16_peak": 100.0 * achieved / peaks["bfloat16_gflop_per_s"],
    }


def _embed_figures(model, training: TrainingConfig, geometry, n_mels: int, seconds: float) -> dict:
    """Tiles/s of embed_frames with the saved encoder in the run's precision and in float32."""
    import numpy as np

    from .embed import embed_frames
    from .models import export_encoder

    # One minute of frames, tiled at the experiment's own hop (what ``tile2audio embed`` does).
    n_frames = max(geometry.tile_frames, int(60 * geometry.frames_per_second))
    frames = np.random.default_rng(0).standard_normal((n_frames, n_mels)).astype(np.float32)
    out = {}
    encoders = {"embed_tiles_per_s": model.export(),
                "embed_float32_tiles_per_s": export_encoder(model.encoder, training.model, "float32")}
    for key, encoder in encoders.items():
        embed_frames(encoder, frames, geometry)  # warm-up (first call builds the graph)
        tiles, started = 0, time.perf_counter()
        while True:
            tiles += len(embed_frames(encoder, frames, geometry)[0])
            elapsed = time.perf_counter() - started
            if elapsed >= seconds / 4:
                break
        out[key] = tiles / elapsed
    return out


def matmul_peaks(size: int = 4096, repeats: int = 5) -> dict:
    """Median GFLOP/s of a ``size`` x ``size`` ``tf.linalg.matmul`` in float32 and in bfloat16.

    Parameters
    ----------
    size : int
        Side of the square matrices (2 size^3 FLOP per product).
    repeats : int
        Timed products per dtype (after one warm-up); the median is reported.

    Returns
    -------
    dict
        ``{"size", "float32_gflop_per_s", "bfloat16_gflop_per_s"}``.
    """
    import statistics

    import tensorflow as tf

    out: dict[str, Any] = {"size": int(size)}
    rng = tf.random.Generator.from_seed(0)
    for name, dtype in (("float32", tf.float32), ("bfloat16", tf.bfloat16)):
        a = tf.cast(rng.normal((size, size)), dtype)
        b = tf.cast(rng.normal((size, size)), dtype)
        times = []
        for i in range(repeats + 1):
            started = time.perf_counter()
            tf.linalg.matmul(a, b).numpy()
            if i:  # the first product is the warm-up
                times.append(time.perf_counter() - started)
        out[f"{name}_gflop_per_s"] = 2 * size**3 / statistics.median(times) / 1e9
    return out


def forward_flops(model) -> int:
    """FLOP of one sample's forward pass, counted layer by layer (matrix products only).

    Counts 2 x multiply-adds of Conv2D, Conv2DTranspose, Dense and GRU / LSTM layers
    (the input and recurrent kernels, every time step; bidirectional wrappers count both
    directions) and recurses into nested models. Element-wise work, batch norm, pooling
    and activations are not counted.

    Parameters
    ----------
    model : keras.Model
        A built functional model (every layer called once).

    Returns
    -------
    int
        FLOP per sample.
    """
    import keras

    def prod(values) -> int:
        return math.prod(int(v) for v in values)

    def rnn(layer, steps: int) -> int:
        cell = layer.cell
        return 2 * steps * (prod(cell.kernel.shape) + prod(cell.recurrent_kernel.shape))

    def count(layer) -> int:
        if isinstance(layer, keras.Model):
            return sum(count(inner) for inner in layer.layers)
        if isinstance(layer, keras.layers.Bidirectional):
            steps = int(layer.input.shape[1])
            return rnn(layer.forward_layer, steps) + rnn(layer.backward_layer, steps)
        if isinstance(layer, (keras.layers.GRU, keras.layers.LSTM)):
            return rnn(layer, int(layer.input.shape[1]))
        if isinstance(layer, keras.layers.Conv2DTranspose):
            # kernel (kh, kw, out, in), applied at every input position
            return 2 * prod(layer.input.shape[1:3]) * prod(layer.kernel.shape)
        if isinstance(layer, keras.layers.Conv2D):
            # kernel (kh, kw, in, out), applied at every output position
            return 2 * prod(layer.output.shape[1:3]) * prod(layer.kernel.shape)
        if isinstance(layer, keras.layers.Dense):
            return 2 * prod(layer.input.shape[1:-1]) * prod(layer.kernel.shape)
        return 0

    return count(model)


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


# --------------------------------------------------------------------------- embedding


def _embed_stage(cache_dir: str, manifest: Path, training: TrainingConfig, out: Path, seconds: float) -> dict:
    """Tiles/s of ``tile2audio embed`` and of the exported SavedModel, beside the training step's tile rate."""
    import tensorflow as tf

    from .audio import load_audio
    from .datasets import read_manifest, resolve_paths
    from .embed import embed
    from .export import export_run
    from .features import open_cache
    from .train import train

    train_figures = _train_stage(cache_dir, training, seconds, False, 256)
    cache = open_cache(cache_dir)
    cfg = replace(training, train=replace(training.train, epochs=1, steps_per_epoch=EMBED_TRAIN_STEPS,
                                          checkpoint_every_steps=EMBED_TRAIN_STEPS, probe_every_epochs=0,
                                          warmup_steps=0))
    run = train(cache_dir, out / "run", cfg, exact=True, progress=False)
    paths = resolve_paths(read_manifest(manifest))
    # Three tiles per triplet: forward and backward work of the trainer's own step, per tile.
    out_figures: dict[str, Any] = {
        "clips": len(paths), "precision": train_figures["precision"], "batch_size": 128,
        "train_tiles_per_s": 3 * train_figures["model_only_triplets_per_s"],
        "train_pipeline_tiles_per_s": 3 * train_figures["triplets_per_s"],
    }
    for key, source in (("embed_tiles_per_s", manifest), ("embed_cache_tiles_per_s", cache_dir)):
        started = time.perf_counter()
        emb = embed(run, source, progress=False)
        elapsed = time.perf_counter() - started
        out_figures[key] = int(emb.clips["n_tiles"].sum()) / elapsed
        out_figures["tiles"] = int(emb.clips["n_tiles"].sum())
    waves = [load_audio(p, cache.params.sample_rate) for p in paths]
    for key, precision in (("saved_model_tiles_per_s", "float32"), ("saved_model_run_precision_tiles_per_s", "run")):
        model = tf.saved_model.load(str(export_run(run, out / f"model-{precision}", precision=precision)))
        model.embed(waves[0])  # warm-up
        tiles, started = 0, time.perf_counter()
        for wave in waves:
            tiles += int(model.embed(wave)["embeddings"].shape[0])
        out_figures[key] = tiles / (time.perf_counter() - started)
    for key in ("embed_tiles_per_s", "embed_cache_tiles_per_s", "saved_model_tiles_per_s",
                "saved_model_run_precision_tiles_per_s"):
        out_figures[key.replace("_tiles_per_s", "_vs_train")] = out_figures[key] / out_figures["train_tiles_per_s"]
    out_figures["device"] = train_figures["device"]
    return out_figures
