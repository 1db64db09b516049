"""Command line: ``tile2audio <stage> ...``. Each sub-command parses its arguments and
calls one public Python function; nothing here does work of its own."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

from .errors import Tile2AudioError


def _k_range(text: str) -> tuple[int, int]:
    """Parse ``2:20`` (or ``5``) into (k_min, k_max)."""
    try:
        lo, _, hi = text.partition(":")
        return int(lo), int(hi or lo)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--k expects MIN:MAX, got {text!r}") from exc


def _parser() -> argparse.ArgumentParser:
    from .bench import WHAT
    from .config import EXPORT_FORMATS, EXPORT_PRECISIONS, LEVELS, STRATEGIES, WEIGHTS
    from .datasets import SOURCES
    from .datasets.fma import SUBSETS

    p = argparse.ArgumentParser(prog="tile2audio", description="Label-free Tile2Vec-style audio embeddings.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("manifest", help="build a manifest CSV from a data set's layout")
    s.add_argument("source", choices=list(SOURCES))
    s.add_argument("root", help="data root (for csv: the CSV file)")
    s.add_argument("-o", "--output", required=True, help="output manifest CSV")
    s.add_argument("--split-dir", help="gtzan: folder with train/valid/test_filtered.txt")
    s.add_argument("--subset", default="small", choices=SUBSETS, help="fma subset")
    for col in ("path", "label", "split", "fold", "group", "clip-id"):
        s.add_argument(f"--{col}-column", help=f"csv: column holding the {col.replace('-', ' ')}")
    s.set_defaults(func=_manifest)

    s = sub.add_parser("merge", help="merge manifests of several data sets into one (one encoder for all)")
    s.add_argument("manifests", nargs="+", metavar="NAME=CSV",
                   help="manifests to merge; NAME prefixes clip ids and groups (default: the CSV's stem)")
    s.add_argument("-o", "--output", required=True, help="output manifest CSV")
    s.set_defaults(func=_merge)

    s = sub.add_parser("features", help="extract log-mel features into a cache")
    s.add_argument("manifest")
    s.add_argument("-o", "--output", required=True, help="cache directory")
    s.add_argument("--root", help="data root overriding the manifest's root column")
    s.add_argument("--jobs", type=int, default=None, help="processes (default: all cores)")
    s.add_argument("--config", help="experiment YAML whose `features` section to use")
    s.add_argument("--set", action="append", default=[], metavar="features.KEY=VALUE")
    s.add_argument("--overwrite", action="store_true",
                   help="rebuild from scratch (a cache made with other settings, or a damaged one)")
    s.add_argument("--refuse-outside-root", action="store_true",
                   help="refuse manifest paths outside their data root (default: read them, with a warning)")
    s.set_defaults(func=_features)

    s = sub.add_parser("train", help="train an encoder without labels")
    s.add_argument("--cache", required=True)
    s.add_argument("-o", "--output", required=True, help="runs folder (or an existing run with --resume)")
    s.add_argument("--config", help="experiment YAML (its tiles/sampler/model/loss/train sections)")
    s.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    s.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    s.add_argument("--strategy", choices=STRATEGIES)
    s.set_defaults(func=_train)

    s = sub.add_parser("embed", help="embed clips with a trained run")
    s.add_argument("run_dir")
    s.add_argument("inputs", nargs="+",
                   help="a manifest CSV, a cache directory, or audio files and folders (searched recursively)")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--skip-existing", action="store_true")
    s.add_argument("--weights", choices=WEIGHTS, default="trained")
    s.add_argument("--root", help="data root overriding a manifest's root column")
    s.add_argument("--batch-size", type=int, default=128)
    s.set_defaults(func=_embed)

    s = sub.add_parser("export", help="a self-contained SavedModel / TFLite model: waveform in, embeddings out")
    s.add_argument("run_dir")
    s.add_argument("-o", "--output", required=True, help="model folder")
    s.add_argument("--format", choices=EXPORT_FORMATS, default="saved_model")
    s.add_argument("--weights", choices=WEIGHTS, default="trained")
    s.add_argument("--precision", choices=EXPORT_PRECISIONS, default="float32",
                   help="float32 (the reference) or the run's own dtype policy")
    s.set_defaults(func=_export)

    s = sub.add_parser("probe", help="linear / k-NN probes of embedding directories")
    s.add_argument("embeddings", nargs="+", help="embedding directories (the first defines the clips)")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--config", help="experiment YAML whose `probe` section to use")
    s.add_argument("--set", action="append", default=[], metavar="probe.KEY=VALUE")
    s.set_defaults(func=_probe)

    s = sub.add_parser("cluster", help="k-means cluster-count analysis")
    s.add_argument("embeddings")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--k", type=_k_range, help="MIN:MAX (default: cluster.k_min:k_max, 2:20)")
    s.add_argument("--level", choices=LEVELS, help="default: cluster.level (clip)")
    s.add_argument("--config", help="experiment YAML whose `cluster` section to use")
    s.add_argument("--set", action="append", default=[], metavar="cluster.KEY=VALUE")
    s.set_defaults(func=_cluster)

    s = sub.add_parser("report", help="probe tables, k-means and figures for runs")
    s.add_argument("run_dirs", nargs="+")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--config", help="experiment YAML whose probe/cluster sections to use")
    s.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    s.set_defaults(func=_report)

    s = sub.add_parser("run", help="manifest -> features -> train -> embed -> probe -> cluster -> report")
    s.add_argument("experiment", help="experiment YAML")
    s.add_argument("-o", "--output", help="output folder (default: runs/<name>)")
    s.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    s.add_argument("--dry-run", action="store_true", help="print the resolved config and the stages to run")
    s.set_defaults(func=_run_experiment)

    s = sub.add_parser("demo", help="the whole pipeline on built-in synthetic data")
    s.add_argument("-o", "--output", default="tile2audio-demo")
    s.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    s.set_defaults(func=_demo)

    s = sub.add_parser("bench", help="speed benchmarks (JSON)")
    s.add_argument("what", choices=WHAT)
    s.add_argument("--data", help="a folder of labelled audio (default: synthetic demo data)")
    s.add_argument("--json", help="also write the JSON here")
    s.add_argument("--seconds", type=float, default=5.0, help="measuring time per figure")
    s.add_argument("--baseline", action="store_true",
                   help="train: also time each encoder built the old way (float32, unfused batch norm)")
    s.add_argument("--encoders", default="cnn,crnn,resnet18", help="train: comma-separated encoders")
    s.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="settings to measure, e.g. sampler.views=byola")
    s.set_defaults(func=_bench)
    return p


def _sections(path: str | None, overrides: list[str]):
    """Load an experiment config (or defaults) with overrides."""
    from .config import load_experiment

    return load_experiment(path, overrides)


# One function per sub-command: parse nothing, call one public function, print its result.


def _manifest(args: argparse.Namespace, progress: bool) -> None:
    from .datasets import build_manifest, write_manifest

    options = {k: v for k, v in {
        "split_dir": args.split_dir,
        "path_column": args.path_column, "label_column": args.label_column,
        "split_column": args.split_column, "fold_column": args.fold_column,
        "group_column": args.group_column, "clip_id_column": args.clip_id_column,
    }.items() if v is not None}
    if args.source == "fma":
        options["subset"] = args.subset
    df = build_manifest(args.source, args.root, **options)
    write_manifest(df, args.output)
    labels = df["label"][df["label"] != ""]
    print(f"{args.output}: {len(df)} clips, {labels.nunique()} labels")


def _merge(args: argparse.Namespace, progress: bool) -> None:
    from .datasets import merge_manifests, write_manifest

    named = dict(m.split("=", 1) if "=" in m else (Path(m).stem, m) for m in args.manifests)
    if len(named) != len(args.manifests):
        raise Tile2AudioError("two manifests have the same name: give NAME=CSV for each")
    df = merge_manifests(named)
    write_manifest(df, args.output)
    print(f"{args.output}: {len(df)} clips from {len(named)} manifests")


def _features(args: argparse.Namespace, progress: bool) -> None:
    from .features import build_cache

    cfg = _sections(args.config, args.set)
    cache = build_cache(args.manifest, args.output, cfg.features, root=args.root, jobs=args.jobs,
                        progress=progress, overwrite=args.overwrite, refuse_outside_root=args.refuse_outside_root)
    print(f"{cache.path}: {len(cache.index)} clips cached, {len(cache.failures)} problems "
          f"(see failures.csv)")


def _train(args: argparse.Namespace, progress: bool) -> None:
    from .config import load_training
    from .train import train

    run_dir = train(args.cache, args.output, load_training(args.config, args.set), resume=args.resume,
                    strategy=args.strategy, progress=progress)
    print(run_dir)


def _embed(args: argparse.Namespace, progress: bool) -> None:
    from .embed import embed

    inputs = args.inputs[0] if len(args.inputs) == 1 else args.inputs
    emb = embed(args.run_dir, inputs, args.output, weights=args.weights, skip_existing=args.skip_existing,
                batch_size=args.batch_size, root=args.root, progress=progress)
    print(f"{args.output}: {len(emb.clips)} clips, dim {emb.meta['dim']}")


def _export(args: argparse.Namespace, progress: bool) -> None:
    from .export import export_run

    out = export_run(args.run_dir, args.output, format=args.format, weights=args.weights, precision=args.precision)
    print(f"{out}: {args.format}, see {out / 'model_card.md'}")


def _probe(args: argparse.Namespace, progress: bool) -> None:
    from .probes import probe_directories

    cfg = _sections(args.config, args.set)
    result = probe_directories(args.embeddings, args.output, cfg.probe, progress=progress)
    print(json.dumps([{k: r[k] for k in ("name", "kind", "probe", "accuracy", "macro_f1")}
                      for r in result["rows"]], indent=1))


def _cluster(args: argparse.Namespace, progress: bool) -> None:
    from dataclasses import replace

    from .clusters import cluster_embeddings
    from .embed import load_embeddings

    cfg = _sections(args.config, args.set).cluster
    # --k and --level, when given, win over the config (as --set would).
    given = {"k_min": args.k[0], "k_max": args.k[1]} if args.k else {}
    if args.level:
        given["level"] = args.level
    cfg = replace(cfg, **given)
    result = cluster_embeddings(load_embeddings(args.embeddings), cfg, args.output)
    print(json.dumps({"chosen_k": result["chosen"], "at_n_classes": result.get("at_n_classes")}, indent=1))


def _report(args: argparse.Namespace, progress: bool) -> None:
    from .pipeline import report_runs

    cfg = _sections(args.config, args.set)
    print(report_runs(args.run_dirs, args.output, cfg, progress=progress))


def _run_experiment(args: argparse.Namespace, progress: bool) -> None:
    from .config import load_experiment
    from .pipeline import run_experiment

    cfg = load_experiment(args.experiment, args.set)
    out = args.output or os.path.join("runs", cfg.name)
    result = run_experiment(cfg, out, dry_run=args.dry_run, progress=progress)
    if not args.dry_run:
        print(result)


def _demo(args: argparse.Namespace, progress: bool) -> None:
    from .pipeline import demo

    print(demo(args.output, overrides=args.set, progress=progress))


def _bench(args: argparse.Namespace, progress: bool) -> None:
    from .bench import run_bench

    result = run_bench(args.what, data=args.data, seconds=args.seconds, json_path=args.json,
                       settings=_sections(None, args.set) if args.set else None,
                       baseline=args.baseline, encoders=[e for e in args.encoders.split(",") if e])
    print(json.dumps(result, indent=2))


def _run(args: argparse.Namespace) -> int:
    args.func(args, not args.quiet)
    return 0


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be, so every stage keeps its work the same way."""


def _on_sigterm(signum, frame):
    """SIGTERM handler: stop like Ctrl-C (checkpoint, clean temporaries, say how to resume)."""
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tile2audio`` console script; returns the exit code.

    Ctrl-C exits 130 and SIGTERM 143, each with one line; a stage that knows the exact
    command to resume (``train``, ``embed``) names it.
    """
    args = _parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else (logging.WARNING if args.quiet else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (main() called from a thread): signals stay as they are
        previous = None
    try:
        return _run(args)
    except Tile2AudioError as exc:
        print(f"tile2audio: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        # train and embed re-raise with how to resume; the chain tells SIGTERM from Ctrl-C.
        cause, terminated = exc, False
        while cause is not None:
            terminated = terminated or isinstance(cause, _Terminated)
            cause = cause.__cause__ or cause.__context__
        how = str(exc) or "rerun the same command to resume"
        print(f"tile2audio: {'terminated (SIGTERM)' if terminated else 'interrupted'}; {how}", file=sys.stderr)
        return 143 if terminated else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
