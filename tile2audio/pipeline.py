"""The whole pipeline in one call: ``tile2audio run`` and ``tile2audio demo``.

Layout of an experiment's output folder::

    OUT/
      config.yaml          the resolved ExperimentConfig
      stages.json          a fingerprint per finished stage (what makes a stage up to date)
      data/                synthetic audio (demo only)
      manifest.csv
      cache/               log-mel cache (+ mfcc_stats.npz, egemaps_stats.npz, compare_stats.npz:
                           the handcrafted baselines' features, computed once per cache)
      run/                 the training run (encoder.keras, log.csv ...)
        embeddings/trained/  embeddings/random/
      probe/probe.json
      cluster/cluster.json, kmeans_curves.png
      report/report.md, report.json, *.png, report.html, audio/*.ogg, projector/ (report.html
                           and its excerpts unless report.html = false; the TensorBoard
                           projector log unless report.projector = false)

A stage is skipped when its output exists and its fingerprint (a hash of the config
sections it depends on, chained with its inputs' fingerprints) is unchanged, so a rerun
after a crash continues where it stopped, and a changed setting reruns only the stages
downstream of it. Features, training and embedding also resume inside a stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from . import atomic
from .config import ExperimentConfig, dump_yaml, experiment_from_dict, merge, parse_overrides, to_dict
from .errors import Tile2AudioError

log = logging.getLogger(__name__)

STAGES = ("manifest", "features", "train", "embed", "probe", "cluster", "report")
DEPENDS = {"manifest": set(), "features": {"manifest"}, "train": {"features"}, "embed": {"train"},
           "probe": {"embed"}, "cluster": {"embed"}, "report": {"probe", "cluster"}}

#: The demo's settings: small enough for a few minutes on 2 CPU cores.
#: ``experiments/demo.yaml`` holds the same values (a test keeps them equal).
DEMO_CONFIG: dict = {
    "name": "demo",
    "data": {"source": "synthetic", "options": {"n_classes": 5, "clips_per_class": 40}},
    "features": {"sample_rate": 16000, "n_fft": 1024, "hop_length": 512, "n_mels": 64},
    "tiles": {"tile_seconds": 1.5, "tile_hop_seconds": 0.75, "neighbourhood_seconds": 3.0},
    "model": {"encoder": "cnn", "widths": [16, 32, 64], "embedding_dim": 64},
    "loss": {"margin": 0.5, "negatives": "batch_all"},
    "train": {"epochs": 8, "steps_per_epoch": 100, "batch_size": 32, "learning_rate": 0.001},
    # 4 simulated artists per style: 4 grouped folds hold out one artist of each style.
    "probe": {"n_splits": 4},
    "cluster": {"k_min": 2, "k_max": 10},
}


@dataclass(frozen=True)
class ExperimentLayout:
    """Every path of an experiment's output folder (the layout in the module docstring).

    Parameters
    ----------
    out : Path
        The experiment's output folder.
    """

    out: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))

    config_file = property(lambda self: self.out / "config.yaml", doc="The resolved ExperimentConfig.")
    stages_file = property(lambda self: self.out / "stages.json", doc="Fingerprints of the finished stages.")
    data = property(lambda self: self.out / "data", doc="Synthetic audio (demo only).")
    manifest = property(lambda self: self.out / "manifest.csv", doc="The manifest CSV.")
    cache = property(lambda self: self.out / "cache", doc="The log-mel cache.")
    run = property(lambda self: self.out / "run", doc="The training run directory.")
    probe = property(lambda self: self.out / "probe", doc="The probe stage's folder.")
    cluster = property(lambda self: self.out / "cluster", doc="The cluster stage's folder.")
    report = property(lambda self: self.out / "report", doc="The report stage's folder.")

    def embeddings(self, sub: str) -> Path:
        """The run's embedding folder ``trained`` or ``random``."""
        return self.run / "embeddings" / sub

    @property
    def probe_json(self) -> Path:
        return self.probe / "probe.json"

    @property
    def cluster_json(self) -> Path:
        return self.cluster / "cluster.json"

    @property
    def report_md(self) -> Path:
        return self.report / "report.md"

    def outputs(self, stage: str) -> list[Path]:
        """The files whose presence (with a matching fingerprint) makes ``stage`` up to date."""
        return {
            "manifest": [self.manifest], "features": [self.cache / "index.csv"],
            "train": [self.run / "encoder.keras"],
            "embed": [self.embeddings("trained") / "clip_embeddings.npz",
                      self.embeddings("random") / "clip_embeddings.npz"],
            "probe": [self.probe_json], "cluster": [self.cluster_json], "report": [self.report_md],
        }[stage]


def _fingerprint(*parts) -> str:
    """Stable short hash of JSON-able parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Stages:
    """Reads and writes ``stages.json``: which stage finished with which fingerprint."""

    def __init__(self, out: Path):
        self.path = ExperimentLayout(out).stages_file
        self.done = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def fresh(self, stage: str, fp: str, *outputs: Path) -> bool:
        return self.done.get(stage) == fp and all(p.exists() for p in outputs)

    def mark(self, stage: str, fp: str) -> None:
        self.done[stage] = fp
        atomic.write_json(self.path, self.done)


def stage_fingerprints(cfg: ExperimentConfig) -> dict[str, str]:
    """Each stage's fingerprint, chained so a change upstream invalidates downstream."""
    c = to_dict(cfg)
    fps: dict[str, str] = {}
    fps["manifest"] = _fingerprint(c["data"])
    fps["features"] = _fingerprint(fps["manifest"], c["features"])
    # The training sections in TrainingConfig's field order (the hash of earlier runs is kept).
    fps["train"] = _fingerprint(fps["features"], *to_dict(cfg.training).values())
    fps["embed"] = _fingerprint(fps["train"], c["embed"])
    # The resolved baselines, so installing opensmile later reruns the probe and cluster stages.
    from .baselines import resolve_baselines

    kinds = resolve_baselines(cfg.probe.baselines)
    fps["probe"] = _fingerprint(fps["embed"], {**c["probe"], "baselines": kinds})
    fps["cluster"] = _fingerprint(fps["embed"], c["cluster"], kinds)
    fps["report"] = _fingerprint(fps["probe"], fps["cluster"], c["report"])
    return fps


def plan(cfg: ExperimentConfig, out: str | os.PathLike) -> list[tuple[str, bool]]:
    """(stage, up to date) for every stage of an experiment in ``out``."""
    layout = ExperimentLayout(out)
    stages, fps = Stages(layout.out), stage_fingerprints(cfg)
    stale: set[str] = set()
    result = []
    for s in STAGES:
        ok = stages.fresh(s, fps[s], *layout.outputs(s)) and not (DEPENDS[s] & stale)
        if not ok:
            stale.add(s)
        result.append((s, ok))
    return result


def _manifest_stage(cfg: ExperimentConfig, out: Path, progress: bool) -> Path:
    """Make or copy the manifest; returns its path."""
    from .datasets import build_manifest, read_manifest, write_manifest

    d = cfg.data
    layout = ExperimentLayout(out)
    target = layout.manifest
    if d.manifest:
        write_manifest(read_manifest(d.manifest), target)
    elif d.source == "synthetic":
        from .synth import make_demo_dataset

        made = make_demo_dataset(layout.data, sample_rate=cfg.features.sample_rate, seed=cfg.train.seed,
                                 progress=progress, **d.options)
        write_manifest(read_manifest(made), target)
    else:
        if not d.root:
            raise Tile2AudioError(f"data.root is not set for source {d.source!r}: pass --set data.root=PATH "
                                  "or set the environment variable the config names")
        options = dict(d.options)
        if d.source == "gtzan" and d.split_dir:
            options["split_dir"] = d.split_dir
        if d.source == "fma":
            options["subset"] = d.subset
        write_manifest(build_manifest(d.source, d.root, **options), target)
    return target


def _embed_stage(cfg: ExperimentConfig, out: Path, progress: bool) -> dict:
    """Embed the cache with the trained and the initial (random) weights."""
    from .embed import embed

    layout = ExperimentLayout(out)
    sets = {}
    for weights, sub in (("trained", "trained"), ("init", "random")):
        sets[sub] = embed(layout.run, layout.cache, layout.embeddings(sub), weights=weights,
                          skip_existing=True, batch_size=cfg.embed.batch_size,
                          name=f"{cfg.name} ({'random weights' if weights == 'init' else 'trained'})",
                          progress=progress)
    return sets


def mfcc_baseline(cache_dir: str | os.PathLike, progress: bool = True):
    """The MFCC-statistics baseline of a cache's clips, as an EmbeddingSet (cached on disk)."""
    return baseline_sets(cache_dir, ["mfcc"], progress)[0]


def baseline_sets(cache_dir: str | os.PathLike, kinds: Sequence[str] | None = None, progress: bool = True) -> list:
    """The handcrafted baselines of a cache's clips, as EmbeddingSets (cached in the cache).

    Parameters
    ----------
    cache_dir : a feature cache directory
    kinds : ``probe.baselines`` (None: every kind installed, see
        :func:`tile2audio.baselines.resolve_baselines`)

    Returns
    -------
    list of EmbeddingSet, one per kind, each (n_clips, dim) at clip level.
    """
    from .baselines import KINDS, baseline_embeddings, resolve_baselines
    from .features import open_cache

    cache = open_cache(cache_dir)
    idx = cache.index
    paths = [Path(r) / p for r, p in zip(idx["root"], idx["path"])]
    # Baselines see the same audio as the encoder: the cache's crop (features.max_seconds) too.
    return [baseline_embeddings(k, idx, paths, cache_file=Path(cache.path) / KINDS[k].cache_name, progress=progress,
                                max_seconds=cache.params.max_seconds)
            for k in resolve_baselines(kinds)]


def run_experiment(cfg: ExperimentConfig, out: str | os.PathLike, *, dry_run: bool = False,
                   progress: bool = True, extra_runs: Sequence[str | os.PathLike] = ()) -> Path | list:
    """Run every stage of an experiment that is not up to date.

    Parameters
    ----------
    cfg : ExperimentConfig
    out : path
        The experiment's output folder (layout in the module docstring).
    dry_run : bool
        Print the resolved config and the stages that would run; run nothing.
    extra_runs : paths
        Other run directories to add to the probe table (baseline (c)).

    Returns
    -------
    Path or list
        The report's path, or the plan ``[(stage, up_to_date), ...]`` for a dry run.
    """
    layout = ExperimentLayout(out)
    out = layout.out
    steps = plan(cfg, out)
    if dry_run:
        print(dump_yaml(cfg))
        for stage, ok in steps:
            print(f"{stage:9s} {'up to date, skipped' if ok else 'would run'}")
        return steps
    atomic.ensure_dir(out, "output folder")
    atomic.write_text(layout.config_file, dump_yaml(cfg))
    ctx = StageContext(cfg=cfg, layout=layout, progress=progress, stages=Stages(out), fps=stage_fingerprints(cfg),
                       todo={s for s, ok in steps if not ok}, extra_runs=tuple(extra_runs))
    for name in STAGES:
        if name not in ctx.todo:
            log.info("stage %s: up to date", name)
        else:
            log.info("stage %s ...", name)
            t0 = time.time()
            STAGE_FUNCTIONS[name](ctx)
            ctx.timings[name] = round(time.time() - t0, 2)
            ctx.stages.mark(name, ctx.fps[name])
        if name == "embed":
            # Probe, cluster and report all read these, fresh or not.
            ctx.entries = _load_entries(ctx)
    _summary(out, layout.report_md)
    return layout.report_md


@dataclass
class StageContext:
    """What the stage functions of :func:`run_experiment` share."""

    cfg: ExperimentConfig
    layout: ExperimentLayout
    progress: bool
    stages: Stages
    fps: dict
    todo: set
    extra_runs: tuple = ()
    timings: dict = field(default_factory=dict)
    entries: list = field(default_factory=list)

    def baselines(self) -> list:
        """The handcrafted baselines of the cache (computed once, then read from the cache)."""
        return baseline_sets(self.layout.cache, self.cfg.probe.baselines, self.progress)


def _load_entries(ctx: StageContext) -> list:
    """The trained run, its random twin and any extra runs' embeddings."""
    from .embed import load_embeddings

    entries = [load_embeddings(ctx.layout.embeddings("trained")), load_embeddings(ctx.layout.embeddings("random"))]
    extras = [Path(r) for r in ctx.extra_runs]
    names = run_names(extras)
    _check_same_features(extras, names, ctx.layout.cache)
    for extra, name in zip(extras, names):
        entries.append(_embeddings_for_run(extra, ctx.layout.cache, ctx.cfg, ctx.progress))
        entries[-1].meta["name"] = name
    return entries


def _run_manifest(ctx: StageContext) -> None:
    """Stage ``manifest``."""
    _manifest_stage(ctx.cfg, ctx.layout.out, ctx.progress)


def _run_features(ctx: StageContext) -> None:
    """Stage ``features``: build (or, when its settings changed, rebuild) the cache."""
    from .features import build_cache

    layout = ctx.layout
    build_cache(layout.manifest, layout.cache, ctx.cfg.features, progress=ctx.progress,
                overwrite="features" in ctx.todo and (layout.cache / "index.csv").exists())


def _run_train(ctx: StageContext) -> None:
    """Stage ``train``: train, or resume the run trained with the same settings."""
    from .runs import is_run_dir
    from .train import train

    run = ctx.layout.run
    if is_run_dir(run) and "train" in ctx.todo and ctx.stages.done.get("train") not in (None, ctx.fps["train"]):
        raise Tile2AudioError(f"{run} was trained with other settings; move it away or use another -o")
    train(ctx.layout.cache, run, ctx.cfg.training, resume=is_run_dir(run), exact=True, progress=ctx.progress)


def _run_embed(ctx: StageContext) -> None:
    """Stage ``embed``."""
    _embed_stage(ctx.cfg, ctx.layout.out, ctx.progress)


def _run_probe(ctx: StageContext) -> None:
    """Stage ``probe``: the probe table of the entries and the baselines."""
    from .probes import run_probes

    result = run_probes(ctx.entries + ctx.baselines(), ctx.cfg.probe, progress=ctx.progress)
    atomic.write_json(ctx.layout.probe_json, result)


def _run_cluster(ctx: StageContext) -> None:
    """Stage ``cluster``."""
    from .clusters import cluster_entries

    # Same entries as the probe table: the trained run, its random twin, the baselines.
    cluster_entries(ctx.entries + ctx.baselines(), ctx.cfg.cluster, ctx.layout.cluster,
                    figure_entry=ctx.entries[0])


def _run_report(ctx: StageContext) -> None:
    """Stage ``report``."""
    from .report import make_report
    from .runs import read_run

    layout, cfg = ctx.layout, ctx.cfg
    probe_result = json.loads(layout.probe_json.read_text())
    cluster_result = json.loads(layout.cluster_json.read_text())
    run_info = read_run(layout.run)
    extra = {"experiment": cfg.name, "train_seconds": run_info.get("train_seconds"),
             "steps": run_info.get("step"), "label_free": run_info.get("label_free"),
             "config": to_dict(cfg), "stage_seconds": ctx.timings}
    baselines = ctx.baselines()  # cached: no recomputation
    make_report(ctx.entries + baselines, layout.report, cfg.probe, cfg.cluster, title=f"tile2audio: {cfg.name}",
                probe_result=probe_result, cluster_result=cluster_result, extra=extra, report_config=cfg.report)


#: Stage name -> the function that runs it, in :data:`STAGES` order.
STAGE_FUNCTIONS = {"manifest": _run_manifest, "features": _run_features, "train": _run_train,
                   "embed": _run_embed, "probe": _run_probe, "cluster": _run_cluster, "report": _run_report}


def _summary(out: Path, report_path: Path) -> None:
    """Print a one-screen summary of the probe table."""
    probe = ExperimentLayout(out).probe_json
    if not probe.is_file():
        return
    rows = json.loads(probe.read_text())["rows"]
    print(f"\n{'entry':42s} {'kind':10s} {'probe':14s} {'accuracy':>15s} {'macro-F1':>15s}")
    for r in rows:
        print(f"{r['name'][:42]:42s} {r['kind']:10s} {r['probe']:14s} "
              f"{r['accuracy']:.3f} ± {r.get('accuracy_std', 0):.3f}  {r['macro_f1']:.3f} ± {r.get('macro_f1_std', 0):.3f}")
    print(f"\nreport: {report_path}")


def run_names(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Display names of run directories: the shortest path suffix that tells each apart.

    ``runs/a`` and ``runs/b`` keep their last folder name (``a``, ``b``); ``a/run`` and
    ``b/run`` become ``a/run`` and ``b/run``. A directory given twice gets `` (2)``.

    Parameters
    ----------
    paths : run directories, in report order

    Returns
    -------
    list of str, one per path
    """
    parts = [Path(os.path.abspath(p)).parts for p in paths]
    names: list[str] = []
    for i, p in enumerate(parts):
        others = [q for q in parts if q != p]
        n = 1
        while n < len(p) and any(q[-n:] == p[-n:] for q in others):
            n += 1
        name = Path(*p[-n:]).as_posix()
        seen = parts[:i].count(p)
        names.append(f"{name} ({seen + 1})" if seen else name)
    return names


def _check_same_features(runs: Sequence[Path], names: Sequence[str], cache: Path) -> None:
    """Raise, naming the runs, when a run's feature parameters are not the cache's (one line)."""
    from dataclasses import fields

    from .features import open_cache
    from .runs import open_run

    want = open_cache(cache).params
    differ = []
    for run, name in zip(runs, names):
        have = open_run(run).features
        keys = [f.name for f in fields(want) if getattr(have, f.name) != getattr(want, f.name)]
        if keys:
            differ.append(f"{name} has " + ", ".join(f"{k}={getattr(have, k)!r}" for k in keys))
    if differ:
        raise Tile2AudioError(
            f"the runs' features differ from those of the cache {cache} the report embeds "
            f"({'; '.join(differ)}); report runs trained on the same features together, or embed the "
            "same audio with each run (`tile2audio embed RUN MANIFEST -o DIR`) and compare the folders "
            "with `tile2audio probe`"
        )


def _embeddings_for_run(run_dir: Path, cache: Path, cfg: ExperimentConfig, progress: bool):
    """Embeddings of ``cache`` by another run (written inside that run's folder).

    The run's feature parameters must be the cache's (:func:`_check_same_features`): the
    clips are embedded from the cache's own frames, never from a manifest found beside it.
    """
    from .embed import embed, load_embeddings
    from .features import open_cache

    fc = open_cache(cache)
    # Keyed on the cache's content too: audio re-extracted since (changed files) is embedded again.
    target = run_dir / "embeddings" / f"on-{_fingerprint(str(Path(cache).resolve()) + fc.content_fingerprint)}"
    if (target / "clip_embeddings.npz").is_file():
        done = load_embeddings(target)
        # A folder holding other clips than the cache's (written by an older version) is redone.
        if set(done.clips["clip_id"].astype(str)) == set(fc.index["clip_id"].astype(str)):
            return done
        log.warning("%s holds other clips than the cache %s: embedding again", target, cache)
        return embed(run_dir, cache, target, batch_size=cfg.embed.batch_size, progress=progress)
    return embed(run_dir, cache, target, skip_existing=True, batch_size=cfg.embed.batch_size,
                 progress=progress)


def report_runs(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike,
                cfg: ExperimentConfig | None = None, progress: bool = True) -> Path:
    """``tile2audio report``: probe and cluster runs on the first run's cache, with baselines.

    The first run's cache defines the clips and the splits. Each run is embedded on it
    (cached under the run's ``embeddings/``); the first run's initial weights give the
    random-weight baseline and the cache's audio gives the MFCC baseline. Every run must
    use the cache's feature parameters (else one error naming the runs); entries are
    named by :func:`run_names`.
    """
    from .clusters import cluster_entries
    from .report import make_report
    from .runs import read_run

    cfg = cfg or ExperimentConfig()
    runs = [Path(r) for r in run_dirs]
    cache = Path(read_run(runs[0])["cache"])
    names = run_names(runs)
    _check_same_features(runs, names, cache)
    entries = [_embeddings_for_run(r, cache, cfg, progress) for r in runs]
    from .embed import embed, load_embeddings

    rnd = runs[0] / "embeddings" / "random"
    entries.append(load_embeddings(rnd) if (rnd / "clip_embeddings.npz").is_file() else
                   embed(runs[0], cache, rnd, weights="init", skip_existing=True, progress=progress))
    for e, name in zip(entries, names + [f"{names[0]} (random)"]):
        e.meta["name"] = name
    entries += baseline_sets(cache, cfg.probe.baselines, progress)
    out = Path(out)
    cluster_result = cluster_entries(entries, cfg.cluster, out, figure_entry=entries[0])
    extra = {"runs": [str(r) for r in runs],
             "train_seconds": {n: read_run(r).get("train_seconds") for r, n in zip(runs, names)}}
    # make_report probes (or notes why it cannot: no labels, a single class).
    return make_report(entries, out, cfg.probe, cfg.cluster, cluster_result=cluster_result, extra=extra,
                       progress=progress, report_config=cfg.report)


def demo(out: str | os.PathLike = "tile2audio-demo", overrides: Sequence[str] = (),
         progress: bool = True) -> Path:
    """``tile2audio demo``: the whole pipeline on the built-in synthetic data.

    Returns the path of the report.
    """
    cfg = experiment_from_dict(merge(DEMO_CONFIG, parse_overrides(overrides)))
    return run_experiment(cfg, out, progress=progress)
