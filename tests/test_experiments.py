"""Every experiment YAML parses, names its data by environment variable, and trains.

Each config is loaded with :func:`tile2audio.config.load_experiment` (its ``${VAR}``
set to a dummy folder) and trained for one step on a small synthetic cache, with tiny
sizes (widths, embedding, RNN and ResNet widths, kernel, tiles, features, batch) but the
config's own choices that change the training graph (encoder type and depth, stride,
pooling, batch norm, decoder, sampler mode, loss settings, normalisation).
Configs that are identical once shrunk train once: the later ones check that the run of
their twin finished.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from tile2audio.config import ExperimentConfig, FeatureParams, TileConfig, TrainingConfig, load_experiment
from tile2audio.errors import Tile2AudioError

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
YAMLS = sorted(EXPERIMENTS.rglob("*.yaml"))
ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

TINY_FEATURES = dict(sample_rate=8000, n_fft=256, hop_length=128, win_length=None, n_mels=16, fmax=None)
TINY_TILES = TileConfig(tile_seconds=0.5, tile_hop_seconds=0.25, neighbourhood_seconds=1.0)

#: (tiny training config, normalisation) -> run directory of the first config that trained it
_TRAINED: dict[tuple, Path] = {}


def _ids(paths):
    """Test ids relative to experiments/."""
    return [str(p.relative_to(EXPERIMENTS)) for p in paths]


def _env_vars(path: Path) -> list[str]:
    """The ``${VAR}`` names a YAML refers to."""
    return sorted(set(ENV_VAR.findall(path.read_text(encoding="utf-8"))))


def _load(path: Path, monkeypatch, tmp_path: Path) -> ExperimentConfig:
    """Load a YAML with each of its environment variables set to a dummy folder."""
    for var in _env_vars(path):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    return load_experiment(path)


def _tiny_training(cfg: ExperimentConfig) -> TrainingConfig:
    """The config's training sections shrunk to one step of a tiny model."""
    m = cfg.model
    widths = tuple(min(4 * 2**i, 8) for i in range(len(m.widths)))  # keep the depth
    model = dataclasses.replace(m, widths=widths, embedding_dim=8, resnet_width=4, rnn_units=8,
                                kernel_size=min(m.kernel_size, 3))
    train = dataclasses.replace(cfg.train, batch_size=8, epochs=1, steps_per_epoch=1, warmup_steps=0,
                                checkpoint_every_steps=1, probe_every_epochs=0, strategy="one")
    return TrainingConfig(tiles=TINY_TILES, sampler=cfg.sampler, model=model, loss=cfg.loss, train=train)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """Return ``get(normalize) -> cache dir``: one small synthetic cache per normalisation."""
    from tile2audio.features import build_cache
    from tile2audio.synth import make_demo_dataset

    root = tmp_path_factory.mktemp("experiments")
    manifest = make_demo_dataset(root / "data", n_classes=3, clips_per_class=4, seconds=2.0,
                                 sample_rate=8000, seed=0, progress=False)
    made: dict[str, Path] = {}

    def get(normalize: str) -> Path:
        if normalize not in made:
            params = FeatureParams(**TINY_FEATURES, normalize=normalize)
            made[normalize] = build_cache(manifest, root / f"cache-{normalize}", params, jobs=1,
                                          progress=False).path
        return Path(made[normalize])

    return get


def test_there_are_experiments():
    names = {p.stem for p in YAMLS}
    assert {"demo", "emotify30", "urbansound", "gtzan_cnn", "gtzan_crnn", "fma_small_cnn",
            "fma_medium_crnn", "dcase2018_task5_resnet18"} <= names
    assert len([p for p in YAMLS if p.parent.name == "reproduce"]) >= 25


def test_demo_yaml_is_the_demo_config():
    from tile2audio.pipeline import DEMO_CONFIG

    assert yaml.safe_load((EXPERIMENTS / "demo.yaml").read_text(encoding="utf-8")) == DEMO_CONFIG


@pytest.mark.parametrize("path", YAMLS, ids=_ids(YAMLS))
def test_config_loads_and_names_its_data_by_variable(path, monkeypatch, tmp_path):
    cfg = _load(path, monkeypatch, tmp_path)
    assert cfg.name == path.stem
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    root = (raw.get("data") or {}).get("root")
    if cfg.data.source == "synthetic":
        assert root is None
    else:
        # Never a hard-coded path: the data root comes from the environment (or --set).
        assert isinstance(root, str) and ENV_VAR.search(root), f"{path.name}: data.root {root!r}"
        assert "split_dir" not in raw["data"] or ENV_VAR.search(str(raw["data"]["split_dir"]))


@pytest.mark.parametrize("path", [p for p in YAMLS if _env_vars(p)], ids=_ids([p for p in YAMLS if _env_vars(p)]))
def test_unset_variable_is_a_clear_error_and_set_overrides_it(path, monkeypatch, tmp_path):
    for var in _env_vars(path):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(Tile2AudioError, match=_env_vars(path)[0]):
        load_experiment(path)
    cfg = load_experiment(path, [f"data.root={tmp_path}"])
    assert cfg.data.root == str(tmp_path)


@pytest.mark.parametrize("path", YAMLS, ids=_ids(YAMLS))
def test_dry_run_from_the_command_line(path, monkeypatch, tmp_path, capsys):
    from tile2audio.cli import main

    for var in _env_vars(path):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    assert main(["-q", "run", str(path), "-o", str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"name: {path.stem}" in out
    assert "would run" in out


def test_supervised_variants_differ_from_their_label_free_twin_only_in_the_sampler(monkeypatch, tmp_path):
    pairs = [(p, p.with_name(p.name.replace("_supervised", ""))) for p in YAMLS if p.stem.endswith("_supervised")]
    assert len(pairs) >= 10
    for sup, free in pairs:
        a, b = _load(sup, monkeypatch, tmp_path), _load(free, monkeypatch, tmp_path)
        assert a.sampler.mode == "supervised" and not a.sampler.label_free
        assert b.sampler.mode == "tile2vec" and b.sampler.label_free
        assert dataclasses.replace(a, name=b.name, sampler=b.sampler) == b


def test_czech_configs_follow_the_paper(monkeypatch, tmp_path):
    czech = [p for p in YAMLS if p.stem.startswith("czech_")]
    assert len(czech) == 25
    for path in czech:
        cfg = _load(path, monkeypatch, tmp_path)
        f = cfg.features
        assert (f.sample_rate, f.n_mels, f.normalize) == (22050, 128, "minmax")
        assert cfg.model.decoder and cfg.probe.knn_k == 10 and cfg.loss.mse_weight == 1.0
        assert cfg.loss.triplet_weight == (0.0 if "_mse_" in path.stem else 0.01)


@pytest.mark.parametrize("path", YAMLS, ids=_ids(YAMLS))
def test_config_trains_one_step(path, monkeypatch, tmp_path_factory, caches):
    from tile2audio.runs import read_run
    from tile2audio.train import train

    cfg = _load(path, monkeypatch, tmp_path_factory.mktemp("env"))
    tiny = _tiny_training(cfg)
    key = (tiny, cfg.features.normalize)
    if key in _TRAINED:
        # Identical training graph to an earlier config: its run must have finished.
        assert read_run(_TRAINED[key])["status"] == "complete"
        return
    run = train(caches(cfg.features.normalize), tmp_path_factory.mktemp("run"), tiny, exact=True, progress=False)
    info = read_run(run)
    assert info["status"] == "complete" and info["step"] == 1
    assert info["label_free"] == (cfg.sampler.mode != "supervised")
    assert (run / "encoder.keras").is_file()
    _TRAINED[key] = run
