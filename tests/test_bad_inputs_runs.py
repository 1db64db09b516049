"""Bad inputs and faults, round 2 (issue 18), runs part: concurrent runs, resume on changed
features, edited run files, raw tracebacks of run / embedding files and settings, the YAML
alias bomb, tile settings that cannot work, and Ctrl-C / SIGTERM during train and embed.
Every case asserts its outcome and, where the defect was a message, that the message
names the real cause."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import TINY_FEATURES, TINY_TRAIN, one_line_error
from tile2audio.cli import main
from tile2audio.config import FeatureParams, load_experiment, load_training
from tile2audio.errors import Tile2AudioError
from tile2audio.features import build_cache
from tile2audio.runs import open_run, read_run

SR = 8000
REPO = Path(__file__).resolve().parents[1]


def _cfg(*extra):
    return load_training(None, TINY_TRAIN + ["train.epochs=1", "train.steps_per_epoch=2", *extra])


def _sets(*extra):
    return [a for s in TINY_TRAIN + list(extra) for a in ("--set", s)]


@pytest.fixture(scope="module")
def tiny_run(tiny_cache, tmp_path_factory):
    from tile2audio.train import train

    return train(tiny_cache, tmp_path_factory.mktemp("run") / "run", _cfg(), exact=True, progress=False)


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    return copy


# --------------------------------------------------------------------------- concurrent runs


def test_two_runs_started_in_the_same_second_get_their_own_folders(tiny_cache, tmp_path, monkeypatch):
    from tile2audio.train import train

    # Both runs see the same clock second, as two `train` started together do.
    monkeypatch.setattr(time, "strftime", lambda fmt, t=None: "20260101-000000")
    first = train(tiny_cache, tmp_path / "runs", _cfg(), progress=False)
    second = train(tiny_cache, tmp_path / "runs", _cfg(), progress=False)
    assert first != second and second.name == first.name + "-2"
    for run in (first, second):
        assert list(pd.read_csv(run / "log.csv")["epoch"]) == [0]
        assert read_run(run)["status"] == "complete"


def test_a_second_writer_of_a_run_is_refused_naming_the_first(run_copy, tiny_cache, capsys):
    argv = ["-q", "train", "--cache", str(tiny_cache), "-o", str(run_copy), "--resume"]
    with open(run_copy / ".lock", "w+", encoding="utf-8") as holder:  # what a running `train` holds
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.write("pid 4242 on elsewhere since 2026-01-01 00:00:00: tile2audio train --resume\n")
        holder.flush()
        assert main(argv) == 2
        one_line_error(capsys, str(run_copy), "another process is writing this run", "pid 4242")
    # The lock file of a process that died (no flock held) does not block.
    assert (run_copy / ".lock").read_text().startswith("pid 4242")
    assert main(argv) == 0
    assert f"pid {os.getpid()}" in (run_copy / ".lock").read_text()


# --------------------------------------------------------------------------- resume on changed features


def test_resume_checks_the_features_of_the_cache(tiny_dataset, tmp_path, capsys):
    params = FeatureParams(**TINY_FEATURES)
    cache = tmp_path / "cache"
    build_cache(tiny_dataset, cache, params, jobs=1, progress=False)
    same = tmp_path / "same_cache"
    shutil.copytree(cache, same)
    other = tmp_path / "other_cache"
    build_cache(tiny_dataset, other, FeatureParams(**{**TINY_FEATURES, "hop_length": 64}), jobs=1, progress=False)
    assert main(["-q", "train", "--cache", str(cache), "-o", str(tmp_path / "runs"), *_sets("train.epochs=1",
                 "train.steps_per_epoch=2")]) == 0
    run = Path(capsys.readouterr().out.strip().splitlines()[-1])
    encoder = (run / "encoder.keras").read_bytes()

    def resume(with_cache, epochs):
        return main(["-q", "train", "--cache", str(with_cache), "-o", str(run), "--resume",
                     "--set", f"train.epochs={epochs}"])

    # Another cache with other features is refused by name, not silently ignored.
    assert resume(other, 2) == 2
    one_line_error(capsys, "--resume", str(other), "other feature parameters")
    assert (run / "encoder.keras").read_bytes() == encoder
    # A cache with the same features (a copy) is used.
    assert resume(same, 2) == 0
    assert read_run(run)["step"] == 4
    encoder = (run / "encoder.keras").read_bytes()
    # The run's own cache rebuilt in place with another hop: refused, the encoder is kept.
    build_cache(tiny_dataset, cache, FeatureParams(**{**TINY_FEATURES, "hop_length": 64}), jobs=1,
                progress=False, overwrite=True)
    capsys.readouterr()
    assert resume(cache, 3) == 2
    one_line_error(capsys, str(cache), "was rebuilt with other feature settings")
    assert (run / "encoder.keras").read_bytes() == encoder
    assert read_run(run)["step"] == 4


# --------------------------------------------------------------------------- edited run files


@pytest.mark.parametrize("edit", ["normalize", "mean"])
def test_an_edited_features_json_is_refused(run_copy, tiny_cache, tmp_path, capsys, edit):
    path = run_copy / "features.json"
    feat = json.loads(path.read_text())
    if edit == "normalize":
        feat["params"]["normalize"] = "minmax" if feat["params"]["normalize"] != "minmax" else "standardize"
    else:
        feat["stats"]["mean"][0] += 1.0
    path.write_text(json.dumps(feat, indent=1))
    with pytest.raises(Tile2AudioError, match="features.json: the feature parameters or normalisation statistics"):
        open_run(run_copy)
    assert main(["-q", "embed", str(run_copy), str(tiny_cache), "-o", str(tmp_path / "emb")]) == 2
    one_line_error(capsys, str(path), "edited after training")
    assert not (tmp_path / "emb" / "clip_embeddings.npz").exists()


def test_rewritten_features_json_with_the_same_values_still_opens(run_copy):
    path = run_copy / "features.json"
    feat = json.loads(path.read_text())
    path.write_text(json.dumps(dict(reversed(list(feat.items()))), indent=4))  # order and spacing only
    assert open_run(run_copy).features == FeatureParams(**feat["params"])


# --------------------------------------------------------------------------- raw tracebacks


@pytest.mark.parametrize("content, needle", [
    ("truncate", "not valid JSON"), ("[1, 2]", "expected a JSON object, got a JSON list"),
])
@pytest.mark.parametrize("reader", ["embed", "report", "resume", "hear"])
def test_a_broken_run_json_is_one_line(run_copy, tiny_cache, tmp_path, capsys, content, needle, reader):
    path = run_copy / "run.json"
    text = path.read_text()
    path.write_text(text[: len(text) // 2] if content == "truncate" else content)
    if reader == "hear":
        from tile2audio.hear import load_model

        with pytest.raises(Tile2AudioError, match=needle) as info:
            load_model(str(run_copy))
        assert str(path) in str(info.value)
        return
    argv = {
        "embed": ["embed", str(run_copy), str(tiny_cache), "-o", str(tmp_path / "emb")],
        "report": ["report", str(run_copy), "-o", str(tmp_path / "report")],
        "resume": ["train", "--cache", str(tiny_cache), "-o", str(run_copy), "--resume"],
    }[reader]
    assert main(["-q", *argv]) == 2
    one_line_error(capsys, str(path), needle)


@pytest.mark.parametrize("edit, needle", [
    (lambda f: f["params"].update(colour="blue"), "unknown config key(s) params.colour"),
    (lambda f: f.pop("params"), "no 'params' mapping"),
    (lambda f: f["params"].update(sample_rate="x"), "params.sample_rate must be an integer, got 'x'"),
    (lambda f: f["stats"].update(mean=[0.0, 1.0]), "stats.mean must be a list of 16 finite numbers"),
])
def test_a_broken_features_json_is_one_line(run_copy, tiny_cache, tmp_path, capsys, edit, needle):
    path = run_copy / "features.json"
    feat = json.loads(path.read_text())
    edit(feat)
    path.write_text(json.dumps(feat))
    assert main(["-q", "embed", str(run_copy), str(tiny_cache), "-o", str(tmp_path / "emb")]) == 2
    one_line_error(capsys, str(path), needle)


@pytest.fixture(scope="module")
def tiny_embeddings(tiny_run, tiny_cache, tmp_path_factory):
    from tile2audio.embed import embed

    out = tmp_path_factory.mktemp("emb") / "emb"
    embed(tiny_run, tiny_cache, out, progress=False)
    return out


@pytest.mark.parametrize("broken, needle", [
    ("n_tiles", "n_tiles must be a whole number, got '2.5'"),
    ("embed.json", "expected a JSON object, got a JSON list"),
])
def test_broken_embedding_files_are_one_line(tiny_embeddings, tmp_path, broken, needle):
    from tile2audio.embed import load_embeddings

    emb = tmp_path / "emb"
    shutil.copytree(tiny_embeddings, emb)
    if broken == "n_tiles":
        clips = pd.read_csv(emb / "clips.csv", dtype=str, keep_default_na=False)
        clips.loc[1, "n_tiles"] = "2.5"
        clips.to_csv(emb / "clips.csv", index=False)
    else:
        (emb / "embed.json").write_text("[]")
    with pytest.raises(Tile2AudioError, match=needle.replace("(", r"\(")):
        load_embeddings(emb)


@pytest.mark.parametrize("value", ["1e30", "1.0e+30", "1e8"])
def test_a_huge_batch_size_is_refused_at_start(tiny_cache, tmp_path, capsys, value):
    runs = tmp_path / "runs"
    assert main(["-q", "train", "--cache", str(tiny_cache), "-o", str(runs), *_sets(f"train.batch_size={value}")]) == 2
    one_line_error(capsys, "train.batch_size", "GiB")
    assert not runs.exists() or not list(runs.iterdir())  # no half-made run folder


def test_a_batch_far_beyond_the_clips_is_refused(tiny_cache, tmp_path, capsys):
    # 12 clips: 100 triplets per clip is the bound, small enough in memory to pass the first check.
    assert main(["-q", "train", "--cache", str(tiny_cache), "-o", str(tmp_path / "runs"),
                 *_sets("train.batch_size=1201")]) == 2
    one_line_error(capsys, "train.batch_size 1,201", "12 clips")


@pytest.mark.parametrize("size", ["0", "-1"])
def test_embed_batch_size_must_be_positive(tiny_run, tiny_cache, tmp_path, capsys, size):
    assert main(["-q", "embed", str(tiny_run), str(tiny_cache), "-o", str(tmp_path / "emb"),
                 "--batch-size", size]) == 2
    one_line_error(capsys, "--batch-size", f"got {size}")


# --------------------------------------------------------------------------- YAML


def _alias_bomb() -> str:
    """Nine levels of nine aliases: 387 million strings from a few hundred bytes."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_a_yaml_alias_bomb_is_refused(tmp_path, capsys):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_alias_bomb())
    assert bomb.stat().st_size < 500
    with pytest.raises(Tile2AudioError, match="aliases .* expand to more than"):
        load_training(bomb)
    assert main(["-q", "train", "--cache", str(tmp_path / "none"), "-o", str(tmp_path / "runs"),
                 "--config", str(bomb)]) == 2
    one_line_error(capsys, str(bomb), "&anchor / *alias")
    with pytest.raises(Tile2AudioError, match="--set data.options"):
        load_experiment(None, ["data.options={a: &a [1,1,1,1,1,1,1,1,1,1], b: &b [" + ",".join(["*a"] * 10)
                               + "], c: &c [" + ",".join(["*b"] * 10) + "], d: &d [" + ",".join(["*c"] * 10)
                               + "], e: &e [" + ",".join(["*d"] * 10) + "], f: [" + ",".join(["*e"] * 10) + "]}"])


def test_a_legitimate_10_mb_yaml_loads(tmp_path):
    # A few shared anchors are fine; what is refused is aliases that multiply.
    path = tmp_path / "big.yaml"
    options = "".join(f"    key_{i}: value_{i}\n" for i in range(100_000))
    path.write_text("# " + "x" * 8_000_000 + "\nname: big\ntrain: &t {epochs: 3}\ndata:\n  source: csv\n"
                    f"  options:\n{options}    copy: *t\n")
    assert path.stat().st_size > 10_000_000
    cfg = load_experiment(path)
    assert cfg.train.epochs == 3 and len(cfg.data.options) == 100_001 and cfg.data.options["copy"] == {"epochs": 3}


# --------------------------------------------------------------------------- tile settings


def test_a_one_frame_tile_is_refused(tiny_cache, tmp_path, capsys):
    # 62.5 frames/s: 0.016 s is one frame.
    assert main(["-q", "train", "--cache", str(tiny_cache), "-o", str(tmp_path / "runs"),
                 *_sets("tiles.tile_seconds=0.016", "tiles.tile_hop_seconds=0.016")]) == 2
    one_line_error(capsys, "tiles.tile_seconds 0.016 is 1 frame", "at least 2 frames")
    assert not list((tmp_path / "runs").iterdir())


def test_tiles_longer_than_the_clips_and_a_short_neighbourhood_warn(tiny_cache, tmp_path, caplog):
    from tile2audio.train import train

    cfg = _cfg("tiles.tile_seconds=10", "tiles.tile_hop_seconds=10", "tiles.neighbourhood_seconds=5",
               "tiles.min_gap_seconds=0", "sampler.positive=neighbour", "train.steps_per_epoch=1")
    with caplog.at_level(logging.WARNING, logger="tile2audio.train"):
        train(tiny_cache, tmp_path / "run", cfg, exact=True, progress=False)
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "tiles.tile_seconds 10 is longer than 12 of 12 clips (longest clip 3.01 s)" in text
    assert "tiles.neighbourhood_seconds 5 is shorter than tiles.tile_seconds 10" in text


def test_a_zero_neighbourhood_with_neighbour_positives_is_refused():
    with pytest.raises(Tile2AudioError, match="neighbour would be its anchor tile itself"):
        load_training(None, ["tiles.tile_seconds=1", "tiles.tile_hop_seconds=1", "tiles.neighbourhood_seconds=0",
                             "tiles.min_gap_seconds=0", "sampler.positive=neighbour"])
    load_training(None, ["tiles.tile_seconds=1", "tiles.tile_hop_seconds=1", "tiles.neighbourhood_seconds=0",
                         "tiles.min_gap_seconds=0", "sampler.positive=view"])


# --------------------------------------------------------------------------- Ctrl-C and SIGTERM


def test_ctrl_c_during_train_names_the_resume_command(tiny_cache, tmp_path, monkeypatch, capsys):
    import tile2audio.train as train_mod

    real = train_mod.save_checkpoint

    def interrupted(run_dir, model, optimizer, step, keep=2):
        out = real(run_dir, model, optimizer, step, keep)
        if step == 2:
            raise KeyboardInterrupt  # what Ctrl-C raises in the main thread
        return out

    monkeypatch.setattr(train_mod, "save_checkpoint", interrupted)
    runs = tmp_path / "runs"
    code = main(["-q", "train", "--cache", str(tiny_cache), "-o", str(runs),
                 *_sets("train.epochs=2", "train.steps_per_epoch=3", "train.checkpoint_every_steps=2")])
    assert code == 130
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "rerun the same command" not in err, err
    (run,) = runs.iterdir()
    command = f"tile2audio train --resume --cache {tiny_cache} -o {run}"
    assert err == f"tile2audio: interrupted; run {run} kept; continue it with: {command}", err
    monkeypatch.setattr(train_mod, "save_checkpoint", real)
    assert main(["-q", *shlex.split(command)[1:]]) == 0
    assert read_run(run)["status"] == "complete" and read_run(run)["step"] == 6
    assert list(pd.read_csv(run / "log.csv")["epoch"]) == [0, 1]


def _start(argv, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.Popen([sys.executable, "-m", "tile2audio", "-q", *argv], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(proc, found, what, limit=600):
    """Poll until ``found()`` is true (progress made); fail if the process ends first."""
    deadline = time.monotonic() + limit
    while not found():
        if proc.poll() is not None:
            pytest.fail(f"the process ended before {what}: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} in {limit} s")
        time.sleep(0.2)


def test_sigterm_during_train_checkpoints_and_names_the_resume_command(tiny_cache, tmp_path):
    runs = tmp_path / "runs"
    proc = _start(["train", "--cache", str(tiny_cache), "-o", str(runs),
                   *_sets("train.epochs=100000", "train.steps_per_epoch=2", "train.checkpoint_every_steps=2")],
                  tmp_path)
    _wait_for(proc, lambda: any(runs.glob("*/checkpoints/step_*/state.json")), "first checkpoint")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    (run,) = runs.iterdir()
    assert last.startswith(f"tile2audio: terminated (SIGTERM); run {run} kept; continue it with: "), err
    command = last.split("continue it with: ", 1)[1]
    assert command == f"tile2audio train --resume --cache {tiny_cache} -o {run}"
    assert not list(run.rglob(".tmp*")) and not list(run.rglob("*.tmp.keras"))
    steps = sorted(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))
    # Training stops soon after the signal; to resume in a test, the run is made to end one epoch on.
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["train"]["epochs"] = steps[-1] // 2 + 1
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert main(["-q", *shlex.split(command)[1:]]) == 0
    info = read_run(run)
    assert info["status"] == "complete" and info["step"] == 2 * cfg["train"]["epochs"]


def test_sigterm_during_embed_keeps_finished_clips_and_resumes_identically(tiny_run, tmp_path, tone_fn,
                                                                           write_audio):
    audio = tmp_path / "audio"
    for i in range(150):
        write_audio(audio / f"c{i:03d}.wav", tone_fn(1.0, sr=SR, freq=200.0 + 5 * i, noise=0.05, seed=i), sr=SR)
    out = tmp_path / "emb"
    proc = _start(["embed", str(tiny_run), str(audio), "-o", str(out)], tmp_path)
    _wait_for(proc, lambda: (out / "tiles").is_dir() and len(list((out / "tiles").glob("*.npz"))) >= 3,
              "tile files")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    if proc.returncode == 0:
        pytest.skip("embedding finished before the signal arrived")
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("tile2audio: terminated (SIGTERM); ") and "of 150 clips embedded" in last, err
    assert "--skip-existing" in last
    assert not list(out.rglob(".*.tmp")) and not (out / "clip_embeddings.npz").exists()
    kept = {p.name: p.read_bytes() for p in (out / "tiles").glob("*.npz")}
    assert 3 <= len(kept) < 150
    assert main(["-q", "embed", str(tiny_run), str(audio), "-o", str(out), "--skip-existing"]) == 0
    assert {k: (out / "tiles" / k).read_bytes() for k in kept} == kept
    full = tmp_path / "full"
    assert main(["-q", "embed", str(tiny_run), str(audio), "-o", str(full)]) == 0
    with np.load(out / "clip_embeddings.npz") as a, np.load(full / "clip_embeddings.npz") as b:
        for k in b.files:
            np.testing.assert_array_equal(a[k], b[k])
