"""Config loading: defaults, YAML sections, --set overrides, and clear errors."""

import pytest

from tile2audio.config import (
    ExperimentConfig,
    SamplerConfig,
    TrainingConfig,
    dump_yaml,
    load_experiment,
    load_training,
    parse_overrides,
    read_yaml,
)
from tile2audio.errors import Tile2AudioError


def test_defaults_have_the_documented_keys():
    cfg = TrainingConfig()
    assert cfg.model.encoder == "cnn" and cfg.model.embedding_dim == 128
    assert cfg.loss.reduction == "zero_filtered" and cfg.sampler.mode == "tile2vec"
    assert cfg.train.total_steps == cfg.train.epochs * cfg.train.steps_per_epoch


def test_overrides_are_parsed_as_yaml():
    cfg = load_training(None, ["model.widths=[8, 16]", "train.epochs=3", "loss.margin=1", "model.decoder=true"])
    assert cfg.model.widths == (8, 16)
    assert cfg.train.epochs == 3 and cfg.loss.margin == 1.0 and cfg.model.decoder is True


def test_unknown_key_names_the_known_ones():
    with pytest.raises(Tile2AudioError, match="model.widthz.*known keys of model: encoder"):
        load_training(None, ["model.widthz=[8]"])


def test_unknown_section_is_an_error(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("modle:\n  encoder: cnn\n")
    with pytest.raises(Tile2AudioError, match="modle"):
        load_training(path)


def test_bad_values_are_errors():
    with pytest.raises(Tile2AudioError, match="model.encoder"):
        load_training(None, ["model.encoder=transformer"])
    with pytest.raises(Tile2AudioError, match="train.epochs must be an integer"):
        load_training(None, ["train.epochs=many"])
    with pytest.raises(Tile2AudioError, match="section.key=value"):
        parse_overrides(["epochs=3"])


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(Tile2AudioError, match="not valid YAML"):
        read_yaml(bad)
    with pytest.raises(Tile2AudioError, match="not found"):
        read_yaml(tmp_path / "missing.yaml")
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(Tile2AudioError, match="mapping"):
        read_yaml(lst)


def test_experiment_round_trip_and_env(tmp_path, monkeypatch):
    monkeypatch.setenv("T2A_TEST_ROOT", "/data/x")
    path = tmp_path / "e.yaml"
    path.write_text("name: e\ndata:\n  source: folder\n  root: ${T2A_TEST_ROOT}\nfeatures:\n  n_mels: 64\n")
    cfg = load_experiment(path, ["train.seed=7"])
    assert cfg.data.root == "/data/x" and cfg.features.n_mels == 64 and cfg.train.seed == 7
    again = tmp_path / "again.yaml"
    again.write_text(dump_yaml(cfg))
    assert load_experiment(again) == cfg
    assert isinstance(cfg.training, TrainingConfig) and cfg.training.train.seed == 7


def test_missing_env_var_is_named(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text("data:\n  root: ${T2A_SURELY_UNSET_VAR}\n")
    with pytest.raises(Tile2AudioError, match="T2A_SURELY_UNSET_VAR"):
        load_experiment(path)


def test_training_accepts_experiment_sections(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text("name: e\ndata: {source: synthetic}\nprobe: {n_splits: 3}\nmodel: {encoder: crnn}\n")
    assert load_training(path).model.encoder == "crnn"
    assert ExperimentConfig().features.frames_per_second == pytest.approx(22050 / 512)


@pytest.mark.parametrize("name", ["distant_prob", "mix_prob", "time_mask_fraction", "freq_mask_fraction"])
@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_sampler_probabilities_and_mask_fractions_are_checked(name, value):
    from tile2audio.config import SamplerConfig

    with pytest.raises(Tile2AudioError, match=rf"sampler.{name} must be in \[0, 1\]"):
        SamplerConfig(**{name: value})
    SamplerConfig(**{name: 1.0})  # the ends are allowed


@pytest.mark.parametrize("field, value", [("kernel_size", 0), ("frame_units", -1), ("dropout", 1.0)])
def test_model_fields_are_checked_by_the_config(field, value):
    from tile2audio.config import ModelConfig

    with pytest.raises(Tile2AudioError, match=rf"model.{field} must be"):
        ModelConfig(**{field: value})


def test_choices_live_in_config():
    import tile2audio.losses as losses
    from tile2audio import bench, cli, config, features, pools

    assert losses.DISTANCES is config.DISTANCES and losses.NEGATIVES is config.NEGATIVES
    assert bench.ENCODERS is config.ENCODERS
    # The sampler's in-graph normalisation (built by pools) uses the cache's floors, not copies.
    assert pools.STD_FLOOR is features.STD_FLOOR and pools.MIN_SCALE is features.MIN_SCALE
    actions = {a.dest: a for p in cli._parser()._subparsers._group_actions[0].choices.values() for a in p._actions}
    assert tuple(actions["strategy"].choices) == config.STRATEGIES
    assert tuple(actions["weights"].choices) == config.WEIGHTS


@pytest.mark.parametrize("name, value", [
    ("views", "simclr"), ("mixup_ratio", 1.0), ("mixup_ratio", -0.1), ("mixup_ratio", float("nan")),
    ("crop_scale_min", 0.0), ("crop_scale_max", 0.5), ("crop_canvas", 0.9), ("crop_canvas", float("inf")),
    ("view_gain_db", -1.0), ("eq_db", -2.0), ("eq_points", 1), ("eq_points", 2.5), ("skip_silence", "yes"),
    ("silence_db", 0.0), ("silence_db", float("nan")), ("silence_tile_fraction", 1.5),
])
def test_view_and_silence_settings_are_checked(name, value):
    with pytest.raises(Tile2AudioError, match=rf"sampler.{name}"):
        SamplerConfig(**{name: value})


def test_view_and_silence_settings_default_off_and_load_from_overrides():
    cfg = SamplerConfig()
    assert cfg.views == "plain" and not cfg.byola and cfg.skip_silence is False
    loaded = load_experiment(None, ["sampler.views=byola", "sampler.mixup_ratio=0.3", "sampler.skip_silence=true",
                                    "sampler.eq_points=3"]).sampler
    assert loaded.byola and loaded.mixup_ratio == 0.3 and loaded.skip_silence is True and loaded.eq_points == 3
