"""Probe inner layers of a trial's trained and random-weight encoders.

    python experiments/layer_probe.py runs/trials/NAME global_avg,embedding,l2_normalize

For each named layer, every clip of the trial's cache is tiled as in training, the
layer's output is flattened per tile, pooled over the clip's tiles with mean + std, and
probed with the trial's probe protocol (clip-level logistic regression, same splits for
every row). Prints one line per (weights, layer). Used to decide which layer the
toolkit should embed with (experiments/README.md, "Which layer to probe").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import keras
import numpy as np

from tile2audio.config import FeatureParams, ProbeConfig, load_experiment
from tile2audio.embed import embed_frames, from_clip_matrix, pool_tiles
from tile2audio.features import normalize_frames, open_cache
from tile2audio.probes import run_probes
from tile2audio.tiles import TileGeometry
from tile2audio.train import load_encoder, load_run_config


def layer_matrices(trial: Path, layers: list[str], weights: str) -> dict[str, np.ndarray]:
    """(n_clips, 2 * layer size) mean+std pooled matrices, one per layer."""
    run, cache = trial / "run", open_cache(trial / "cache")
    feat = json.loads((run / "features.json").read_text())
    params = FeatureParams(**feat["params"])
    stats = {k: np.asarray(v, np.float32) for k, v in feat["stats"].items() if k in ("mean", "std")}
    geometry = TileGeometry.from_config(load_run_config(run).tiles, params.frames_per_second)
    encoder = load_encoder(run, weights)
    models = {name: keras.Model(encoder.input, encoder.get_layer(name).output) for name in layers}
    rows = {name: [] for name in layers}
    for clip_id in cache.index["clip_id"]:
        frames = normalize_frames(cache.frames(clip_id, raw=True), params, stats)
        for name, model in models.items():
            e, _ = embed_frames(model, frames, geometry)
            rows[name].append(pool_tiles(e.reshape(len(e), -1))["meanstd"])
    return {name: np.stack(r) for name, r in rows.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trial", type=Path, help="a trial directory (runs/trials/NAME)")
    p.add_argument("layers", help="comma-separated layer names, e.g. global_avg,embedding,l2_normalize")
    args = p.parse_args()
    layers = args.layers.split(",")
    probe = load_experiment(args.trial / "config.yaml").probe
    index = open_cache(args.trial / "cache").index.reset_index(drop=True)
    entries = []
    for weights, kind in (("trained", "trained"), ("init", "random")):
        for name, X in layer_matrices(args.trial, layers, weights).items():
            entries.append(from_clip_matrix(index, X, name=f"{weights}:{name}", kind=kind))
    result = run_probes(entries, ProbeConfig(protocol=probe.protocol, n_splits=probe.n_splits, seed=probe.seed),
                        progress=False)
    for r in result["rows"]:
        if r["probe"] == "logreg":
            print(f"{r['name']:28s} dim {r['dim']:5d}  accuracy {r['accuracy']:.3f}  macro-F1 {r['macro_f1']:.3f}")


if __name__ == "__main__":
    main()
