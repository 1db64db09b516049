"""`tile2audio run`: every stage, skipping what is up to date, and the dry run."""

import json

import pytest

from conftest import TINY_FEATURES, TINY_TRAIN
from tile2audio.config import experiment_from_dict, load_experiment, merge, parse_overrides, to_dict
from tile2audio.pipeline import DEMO_CONFIG, plan, run_experiment


def _tiny_experiment():
    sets = TINY_TRAIN + [f"features.{k}={v}" for k, v in TINY_FEATURES.items()] + [
        "train.epochs=1", "train.steps_per_epoch=3", "probe.n_splits=2", "cluster.k_max=4",
        "data.options={n_classes: 3, clips_per_class: 4, seconds: 3.0}"]
    return experiment_from_dict(merge(DEMO_CONFIG, {**parse_overrides(sets), "name": "tiny"}))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("exp")
    cfg = _tiny_experiment()
    report = run_experiment(cfg, out, progress=False)
    return cfg, out, report


def test_run_writes_every_stage_and_a_report(finished):
    cfg, out, report = finished
    assert report == out / "report" / "report.md" and report.is_file()
    data = json.loads((out / "report" / "report.json").read_text())
    kinds = {r["kind"] for r in data["rows"]} if "rows" in data else {r["kind"] for r in data["probe"]["rows"]}
    assert {"trained", "random", "mfcc"} <= kinds
    text = report.read_text()
    assert "MFCC" in text and "random" in text
    # The k-means table has the same references as the probe table.
    from tile2audio.baselines import resolve_baselines

    cluster_kinds = [e["kind"] for e in data["cluster"]["entries"]]
    assert cluster_kinds == ["trained", "random"] + resolve_baselines(None)
    assert {"trained", "random"} | set(resolve_baselines(None)) <= kinds
    assert (out / "report" / "embedding_map_random.png").is_file()
    assert "```yaml" in text.split("## Run details")[1]
    assert (out / "config.yaml").is_file() and load_experiment(out / "config.yaml") == cfg
    assert all(ok for _, ok in plan(cfg, out))


def test_rerun_skips_and_a_change_reruns_downstream(finished, capsys):
    cfg, out, _ = finished
    stamp = (out / "run" / "encoder.keras").stat().st_mtime_ns
    run_experiment(cfg, out, progress=False)
    assert (out / "run" / "encoder.keras").stat().st_mtime_ns == stamp
    changed = experiment_from_dict(merge(to_dict(cfg), {"cluster": {"k_max": 5}}))
    steps = dict(plan(changed, out))
    assert steps["train"] and steps["probe"] and not steps["cluster"] and not steps["report"]
    run_experiment(changed, out, dry_run=True)
    printed = capsys.readouterr().out
    assert "cluster   would run" in printed and "train     up to date" in printed


def test_dry_run_runs_nothing(tmp_path, capsys):
    steps = run_experiment(_tiny_experiment(), tmp_path / "x", dry_run=True)
    assert [s for s, ok in steps if ok] == []
    assert not (tmp_path / "x").exists()
    assert "tiles:" in capsys.readouterr().out


def test_experiment_layout_and_training_fingerprint(tmp_path):
    from tile2audio.config import load_experiment, to_dict
    from tile2audio.pipeline import STAGE_FUNCTIONS, STAGES, ExperimentLayout, stage_fingerprints

    layout = ExperimentLayout(str(tmp_path))
    assert layout.outputs("embed") == [tmp_path / "run" / "embeddings" / "trained" / "clip_embeddings.npz",
                                       tmp_path / "run" / "embeddings" / "random" / "clip_embeddings.npz"]
    assert layout.outputs("report") == [tmp_path / "report" / "report.md"] and layout.stages_file.parent == tmp_path
    assert tuple(STAGE_FUNCTIONS) == STAGES
    base = stage_fingerprints(load_experiment(None, []))
    for section in to_dict(load_experiment(None, []).training):
        key = {"tiles": "tile_seconds=2", "sampler": "clip_fraction=0.5", "model": "embedding_dim=16",
               "loss": "margin=0.3", "train": "seed=7"}[section]
        changed = stage_fingerprints(load_experiment(None, [f"{section}.{key}"]))
        assert changed["features"] == base["features"] and changed["train"] != base["train"], section
