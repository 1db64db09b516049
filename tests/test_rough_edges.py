"""What a new user trips over: folders to embed, training longer on resume, non-terminal logs."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from conftest import TINY_TRAIN
from tile2audio import cli
from tile2audio.config import load_training
from tile2audio.embed import embed, load_embeddings
from tile2audio.errors import Tile2AudioError
from tile2audio.runs import load_run_config, read_run
from tile2audio.train import train


def _cfg(*extra: str):
    return load_training(None, TINY_TRAIN + ["train.steps_per_epoch=2", *extra])


@pytest.fixture(scope="module")
def short_run(tiny_cache, tmp_path_factory):
    """A complete one-epoch run (2 steps)."""
    return train(tiny_cache, tmp_path_factory.mktemp("short") / "run", _cfg("train.epochs=1"), exact=True,
                 progress=False)


def test_embed_a_folder_recursively_with_any_audio_extension(short_run, tmp_path, write_audio, tone_fn):
    root = tmp_path / "audio"
    write_audio(root / "birds" / "a.wav", tone_fn(1.2, sr=8000, freq=2000.0), sr=8000)
    write_audio(root / "birds" / "deep" / "b.FLAC", tone_fn(0.7, sr=16000, freq=2500.0), sr=16000)
    write_audio(root / "c.ogg", tone_fn(1.0, sr=8000, freq=300.0), sr=8000)
    (root / "notes.txt").write_text("not audio")
    out = tmp_path / "emb"
    assert cli.main(["-q", "embed", str(short_run), str(root), "-o", str(out)]) == 0
    emb = load_embeddings(out)
    assert sorted(emb.clips["clip_id"]) == ["birds/a", "birds/deep/b", "c"]
    assert dict(zip(emb.clips["clip_id"], emb.clips["label"])) == {"birds/a": "birds", "birds/deep/b": "deep",
                                                                  "c": ""}
    assert emb.pooled("mean").shape == (3, 8) and np.isfinite(emb.pooled("mean")).all()
    # The same file embedded directly gives the same numbers.
    one = embed(short_run, [root / "c.ogg"], progress=False)
    row = list(emb.clips["clip_id"]).index("c")
    np.testing.assert_allclose(emb.pooled("mean")[row], one.pooled("mean")[0], rtol=1e-5, atol=1e-6)
    # A folder and a file together: clip ids keep the folder's name.
    both = embed(short_run, [root / "birds", root / "c.ogg"], progress=False)
    assert sorted(both.clips["clip_id"]) == ["birds/a", "birds/deep/b", "c"]


def test_embed_folder_without_audio_is_a_clear_error(short_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["-q", "embed", str(short_run), str(tmp_path / "empty"), "-o", str(tmp_path / "e")]) == 2
    assert "no audio files" in capsys.readouterr().err


def test_resume_with_more_epochs_trains_a_complete_run_longer(tiny_cache, tmp_path):
    run = train(tiny_cache, tmp_path / "run", _cfg("train.epochs=1"), exact=True, progress=False)
    assert read_run(run)["step"] == 2
    before = (run / "encoder.keras").stat().st_mtime_ns
    code = cli.main(["-q", "train", "--cache", str(tiny_cache), "-o", str(run), "--resume",
                     "--set", "train.epochs=3"])
    assert code == 0
    info = read_run(run)
    assert info["status"] == "complete" and info["step"] == 6 and info["epoch"] == 3
    assert load_run_config(run).train.epochs == 3
    assert (run / "encoder.keras").stat().st_mtime_ns != before
    log = pd.read_csv(run / "log.csv")
    assert log["epoch"].tolist() == [0, 1, 2] and log["step"].tolist() == [2, 4, 6]
    # Resuming again with the same epochs does nothing more.
    assert cli.main(["-q", "train", "--cache", str(tiny_cache), "-o", str(run), "--resume"]) == 0
    assert read_run(run)["step"] == 6


def test_resume_refuses_other_changes_naming_the_keys(short_run, tiny_cache, capsys):
    args = ["-q", "train", "--cache", str(tiny_cache), "-o", str(short_run), "--resume",
            "--set", "train.epochs=4", "--set", "loss.margin=0.9", "--set", "train.learning_rate=0.01"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "loss.margin" in err and "train.learning_rate" in err and "only train.epochs" in err
    assert "train.epochs (" not in err
    assert read_run(short_run)["step"] == 2 and load_run_config(short_run).train.epochs == 1  # untouched


def test_epochs_can_only_grow_on_resume(tiny_cache, tmp_path):
    run = train(tiny_cache, tmp_path / "run", _cfg("train.epochs=2"), exact=True, progress=False)
    with pytest.raises(Tile2AudioError, match=r"can only grow \(.* has 2, given 1\)"):
        train(tiny_cache, run, _cfg("train.epochs=1"), resume=True)


def test_one_line_per_epoch_when_stdout_is_not_a_terminal(tiny_cache, tmp_path, capsys):
    train(tiny_cache, tmp_path / "run", _cfg("train.epochs=3"), exact=True, progress=True)
    out = capsys.readouterr().out
    assert "\r" not in out and "\x1b[" not in out  # no progress bar redraws, no colours
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 3, out[-2000:]  # one per epoch, not one per step
    for i, ln in enumerate(lines):
        assert re.match(rf"^epoch {i + 1}/3 - step {2 * (i + 1)} - [\d.]+ s - .*loss [\d.e+-]+", ln), ln
