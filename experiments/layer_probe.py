"""Probe inner layers of a trial's trained and random-weight encoders.

    python experiments/layer_probe.py runs/trials/NAME global_avg,embedding,l2_normalize

For each named layer, every clip of the trial's cache is tiled as in training, the
layer's output is flattened per tile, pooled over the clip's tiles with mean + std, and
probed with the trial's probe protocol (clip-level logistic regression, same splits for
every row). Prints one line per (weights, layer) and records them in
``experiments/results/layers-NAME.json`` (``--render`` of trial.py skips these files;
experiments/README.md quotes them). Used to decide which layer the
toolkit should embed with (experiments/README.md, "Which layer to probe").
"""

from __future__ import annotations

import argparse
from pathlib import Path

import keras
import numpy as np

from tile2audio import atomic
from tile2audio.config import ProbeConfig, load_experiment
from tile2audio.embed import embed_frames, from_clip_matrix, pool_tiles
from tile2audio.features import normalize_frames, open_cache
from tile2audio.probes import run_probes
from tile2audio.runs import open_run

WEIGHTS = ("trained", "init")
RESULTS = Path(__file__).resolve().parent / "results"


def layer_matrices(trial: Path, layers: list[str], cache) -> dict[tuple[str, str], np.ndarray]:
    """(n_clips, 2 * layer size) mean+std pooled matrices, one per (weights, layer)."""
    run = trial / "run"
    opened = open_run(run)
    params, stats, geometry = opened.features, opened.stats, opened.geometry
    models = {}
    for weights in WEIGHTS:
        encoder = opened.encoder(weights, layer="output")  # the whole encoder: every layer is probed
        for name in layers:
            models[weights, name] = keras.Model(encoder.input, encoder.get_layer(name).output)
    rows = {key: [] for key in models}
    for clip_id in cache.index["clip_id"]:
        frames = normalize_frames(cache.frames(clip_id, raw=True), params, stats)
        for key, model in models.items():
            e, _ = embed_frames(model, frames, geometry)
            rows[key].append(pool_tiles(e.reshape(len(e), -1))["meanstd"])
    return {key: np.stack(r) for key, r in rows.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trial", type=Path, help="a trial directory (runs/trials/NAME)")
    p.add_argument("layers", help="comma-separated layer names, e.g. global_avg,embedding,l2_normalize")
    args = p.parse_args()
    layers = args.layers.split(",")
    probe = load_experiment(args.trial / "config.yaml").probe
    cache = open_cache(args.trial / "cache")
    index = cache.index.reset_index(drop=True)
    entries = [from_clip_matrix(index, X, name=f"{weights}:{name}", kind="trained" if weights == "trained" else "random")
               for (weights, name), X in layer_matrices(args.trial, layers, cache).items()]
    result = run_probes(entries, ProbeConfig(protocol=probe.protocol, n_splits=probe.n_splits, seed=probe.seed),
                        progress=False)
    rows = [r for r in result["rows"] if r["probe"] == "logreg"]
    for r in rows:
        print(f"{r['name']:28s} dim {r['dim']:5d}  accuracy {r['accuracy']:.3f}  macro-F1 {r['macro_f1']:.3f}")
    record = {"trial": args.trial.name, "layers": layers, "protocol": result.get("protocol"),
              "rows": [{k: r[k] for k in ("name", "kind", "dim", "accuracy", "accuracy_std", "macro_f1",
                                          "macro_f1_std")} for r in rows]}
    atomic.write_json(RESULTS / f"layers-{args.trial.name}.json", record)


if __name__ == "__main__":
    main()
