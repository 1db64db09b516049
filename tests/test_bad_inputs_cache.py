"""Bad inputs and faults of the feature cache (issue 18, reliability round 2): a damaged
cache, changed audio under the same names, failed clips that come back, paths that
escape their root, copies of one file under two clip ids, missing files and roots,
SIGTERM during a parallel build, and progress bars in log files. Every case asserts its
outcome and, where the defect was a message, that the message names the real cause."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import TINY_FEATURES, TINY_TRAIN, one_line_error
from tile2audio.audio import load_audio
from tile2audio.cli import main
from tile2audio.config import FeatureParams, ProbeConfig, load_training
from tile2audio.console import show_progress
from tile2audio.errors import Tile2AudioError
from tile2audio.features import build_cache, log_mel, open_cache

SR = 8000
PARAMS = FeatureParams(**TINY_FEATURES)


def _clips(root: Path, tone_fn, write_audio, n: int = 6, seconds: float = 1.0) -> pd.DataFrame:
    """``n`` distinct tones under ``root`` and their manifest (labels a/b, no groups)."""
    names = []
    for i in range(n):
        write_audio(root / f"c{i:02d}.wav", tone_fn(seconds + 0.1 * (i % 10), sr=SR, freq=150.0 + 50 * i), sr=SR)
        names.append(f"c{i:02d}.wav")
    return pd.DataFrame({"clip_id": [n[:-4] for n in names], "path": names, "root": str(root),
                         "label": ["a", "b"] * (n // 2) + ["a"] * (n % 2), "split": "", "fold": "", "group": ""})


def _build(manifest, out, **kwargs):
    kwargs = {"jobs": 1, "chunk_clips": 3, "progress": False, **kwargs}
    return build_cache(manifest, out, PARAMS, **kwargs)


def _tree(cache_dir: Path) -> dict[str, bytes]:
    """Every file of a finished cache except the resume records, by relative path."""
    return {str(p.relative_to(cache_dir)): p.read_bytes()
            for p in sorted(cache_dir.rglob("*")) if p.is_file() and "chunks" not in p.parts and p.name != ".lock"}


def _messages(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


@pytest.fixture
def built(tmp_path, tone_fn, write_audio):
    """A finished 6-clip cache (2 chunks of 3 clips) and a reference copy; returns (manifest, cache, reference)."""
    manifest = _clips(tmp_path / "audio", tone_fn, write_audio)
    _build(manifest, tmp_path / "cache")
    shutil.copytree(tmp_path / "cache", tmp_path / "reference")
    return manifest, tmp_path / "cache", tmp_path / "reference"


# --------------------------------------------------------------------------- the cache trusts itself


def _truncate_shard(cache: Path) -> None:
    shard = sorted((cache / "shards").glob("*.npy"))[0]
    shard.write_bytes(shard.read_bytes()[:-200])


def _delete_row(cache: Path) -> None:
    index = pd.read_csv(cache / "index.csv", dtype=str, keep_default_na=False)
    index.drop(index.index[-1]).to_csv(cache / "index.csv", index=False)


def _duplicate_row(cache: Path) -> None:
    index = pd.read_csv(cache / "index.csv", dtype=str, keep_default_na=False)
    pd.concat([index, index.iloc[[1]]]).to_csv(cache / "index.csv", index=False)


def _offset_at_other_clip(cache: Path) -> None:
    # c01 reads c00's frames: what made embed give clip A the frames of clip B (cosine 1.000)
    index = pd.read_csv(cache / "index.csv", dtype=str, keep_default_na=False)
    index.loc[1, "offset"] = index.loc[0, "offset"]
    index.to_csv(cache / "index.csv", index=False)


def _delete_shard(cache: Path) -> None:
    sorted((cache / "shards").glob("*.npy"))[-1].unlink()


REDONE = "redoing 1 of 2 chunk(s): 1 damaged"
REWRITTEN = "index.csv did not match the chunk records (edited or damaged); rewrote it"
# case: (damage, what open_cache says, what the repairing features run says)
DAMAGE = {
    "truncated shard": (_truncate_shard, "were written (truncated or replaced)", REDONE),
    "deleted index row": (_delete_row, "index.csv lacks 1 clip(s)", REWRITTEN),
    "duplicated index row": (_duplicate_row, "clip 'c01' is listed twice", REWRITTEN),
    "offset at another clip": (_offset_at_other_clip, "overlap in shard", REWRITTEN),
    "deleted shard": (_delete_shard, "shard file(s) missing", REDONE),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_cache_is_refused_then_repaired(built, case, caplog):
    manifest, cache, reference = built
    damage, needle, repair = DAMAGE[case]
    damage(cache)
    with pytest.raises(Tile2AudioError, match="the feature cache is damaged") as info:
        open_cache(cache)
    assert needle in str(info.value) and "rerun the `tile2audio features` command" in str(info.value)
    # The next features run notices, says so, and repairs: the cache is the one built first.
    with caplog.at_level(logging.WARNING, logger="tile2audio.features"):
        repaired = _build(manifest, cache)
    assert repair in _messages(caplog)
    assert _tree(cache) == _tree(reference)
    np.testing.assert_array_equal(repaired.frames("c01", raw=True), open_cache(reference).frames("c01", raw=True))


def test_damaged_cache_is_one_line_in_train_and_embed(built, tmp_path, capsys):
    _, cache, _ = built
    _offset_at_other_clip(cache)
    argv = ["-q", "train", "--cache", str(cache), "-o", str(tmp_path / "runs"), *[a for s in TINY_TRAIN for a in ("--set", s)]]
    assert main(argv) == 2
    one_line_error(capsys, str(cache), "damaged", "clips 'c00' and 'c01' overlap")


def test_changed_shard_bytes_fail_the_checksum(built, caplog):
    manifest, cache, reference = built
    shard = sorted((cache / "shards").glob("*.npy"))[0]
    data = bytearray(shard.read_bytes())
    data[-4:] = b"\x00\x3c\x00\x3c"  # same size, other frames
    shard.write_bytes(bytes(data))
    open_cache(cache)  # sizes and ranges still match: only the checksum tells
    with pytest.raises(Tile2AudioError, match="does not match its checksum"):
        open_cache(cache, checksums=True)
    with caplog.at_level(logging.WARNING, logger="tile2audio.features"):
        _build(manifest, cache)
    assert "does not match its checksum" in _messages(caplog)
    assert _tree(cache) == _tree(reference)


def test_overwrite_always_rebuilds(built, capsys):
    manifest, cache, reference = built
    _delete_shard(cache)
    _duplicate_row(cache)
    csv = cache.parent / "manifest.csv"
    manifest.to_csv(csv, index=False)
    sets = [a for k, v in TINY_FEATURES.items() for a in ("--set", f"features.{k}={v}")]
    # the CLI's default chunk size differs from the fixture's: --overwrite replaces the lot
    assert main(["-q", "features", str(csv), "-o", str(cache), "--jobs", "1", "--overwrite", *sets]) == 0
    cache_ = open_cache(cache, checksums=True)
    assert sorted(cache_.index["clip_id"]) == sorted(manifest["clip_id"])
    np.testing.assert_array_equal(cache_.frames("c05", raw=True), open_cache(reference).frames("c05", raw=True))


def test_index_shard_outside_the_cache_is_refused(built, tmp_path):
    _, cache, _ = built
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    np.save(elsewhere / "outside.npy", np.zeros((1000, 16), np.float16))
    index = pd.read_csv(cache / "index.csv", dtype=str, keep_default_na=False)
    index["shard"] = index["shard"].where(index["clip_id"] != "c00", "../../elsewhere/outside")
    index.to_csv(cache / "index.csv", index=False)
    with pytest.raises(Tile2AudioError, match=r"names shard '../../elsewhere/outside', which is not a file inside"):
        open_cache(cache)


# --------------------------------------------------------------------------- changed audio, failed clips


def test_changed_audio_is_extracted_again(built, tone_fn, write_audio, caplog):
    manifest, cache, _ = built
    before = open_cache(cache)
    old_c01, old_c02 = before.frames("c01", raw=True), before.frames("c02", raw=True)
    path = Path(manifest["root"][0]) / "c02.wav"
    write_audio(path, tone_fn(1.2, sr=SR, freq=1500.0, noise=0.2), sr=SR)  # same name, same length
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with caplog.at_level(logging.WARNING, logger="tile2audio.features"):
        after = _build(manifest, cache)
    assert "with changed audio (e.g. 'c02')" in _messages(caplog)
    np.testing.assert_allclose(after.frames("c02", raw=True), log_mel(load_audio(path, SR), PARAMS), atol=0.1)
    assert not np.allclose(after.frames("c02", raw=True), old_c02, atol=1.0)
    np.testing.assert_array_equal(after.frames("c01", raw=True), old_c01)
    # What later stages key on changes with the content.
    assert after.content_fingerprint != before.content_fingerprint
    assert json.loads((cache / "params.json").read_text())["content"] == after.content_fingerprint


def test_changed_audio_is_embedded_again(built, tone_fn, write_audio):
    from tile2audio.embed import embed
    from tile2audio.train import train

    manifest, cache, _ = built
    run = train(cache, cache.parent / "run", load_training(None, TINY_TRAIN + ["train.epochs=1", "train.steps_per_epoch=1"]),
                exact=True, progress=False)
    out = cache.parent / "emb"
    first = embed(run, cache, out, skip_existing=True, progress=False)
    path = Path(manifest["root"][0]) / "c02.wav"
    write_audio(path, tone_fn(1.2, sr=SR, freq=1500.0, noise=0.2), sr=SR)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    _build(manifest, cache)
    second = embed(run, cache, out, skip_existing=True, progress=False)
    row = list(first.clips["clip_id"]).index("c02")
    assert not np.allclose(first.pooled("mean")[row], second.pooled("mean")[row])


def test_failed_clips_are_retried(tmp_path, tone_fn, write_audio, caplog):
    manifest = _clips(tmp_path / "audio", tone_fn, write_audio)
    later = tmp_path / "audio" / "c04.wav"
    later.rename(tmp_path / "c04.wav")  # missing on the first run
    cache = _build(manifest, tmp_path / "cache")
    assert "c04" in set(cache.failures["clip_id"]) and "c04" not in set(cache.index["clip_id"])
    (tmp_path / "c04.wav").rename(later)
    with caplog.at_level(logging.WARNING, logger="tile2audio.features"):
        cache = _build(manifest, tmp_path / "cache")
    assert "with failed clips whose files changed (e.g. 'c04': file not found" in _messages(caplog)
    assert "c04" in set(cache.index["clip_id"]) and len(cache.failures) == 0
    # --overwrite retries too (it rebuilds everything)
    later.rename(tmp_path / "c04.wav")
    assert "c04" in set(_build(manifest, tmp_path / "o").failures["clip_id"])
    (tmp_path / "c04.wav").rename(later)
    assert "c04" in set(_build(manifest, tmp_path / "o", overwrite=True).index["clip_id"])


# --------------------------------------------------------------------------- paths outside the root


def test_manifest_paths_outside_the_root(tmp_path, tone_fn, write_audio, caplog, capsys):
    manifest = _clips(tmp_path / "data" / "audio", tone_fn, write_audio, n=3)
    write_audio(tmp_path / "data" / "outside.wav", tone_fn(1.0, sr=SR), sr=SR)
    write_audio(tmp_path / "far.wav", tone_fn(1.0, sr=SR, freq=900.0), sr=SR)
    manifest = pd.concat([manifest, pd.DataFrame({
        "clip_id": ["up", "abs"], "path": ["../outside.wav", str(tmp_path / "far.wav")],
        "root": manifest["root"][0], "label": "a", "split": "", "fold": "", "group": ""})], ignore_index=True)
    with caplog.at_level(logging.WARNING, logger="tile2audio.features"):
        cache = _build(manifest, tmp_path / "cache")
    warned = [r.getMessage() for r in caplog.records if "outside their data root" in r.getMessage()]
    assert len(warned) == 1 and "2 manifest path(s)" in warned[0] and "../outside.wav" in warned[0], warned
    assert len(cache.index) == 5  # read anyway by default
    with pytest.raises(Tile2AudioError, match=r"2 manifest path\(s\) lie outside their data root"):
        _build(manifest, tmp_path / "refused", refuse_outside_root=True)
    assert not (tmp_path / "refused" / "shards").exists()
    csv = tmp_path / "m.csv"
    manifest.to_csv(csv, index=False)
    sets = [a for k, v in TINY_FEATURES.items() for a in ("--set", f"features.{k}={v}")]
    capsys.readouterr()
    assert main(["-q", "features", str(csv), "-o", str(tmp_path / "cli"), "--jobs", "1",
                 "--refuse-outside-root", *sets]) == 2
    one_line_error(capsys, "outside their data root", "../outside.wav")


# --------------------------------------------------------------------------- the same file twice


def test_copies_under_two_clip_ids_share_a_group(tmp_path, tone_fn, write_audio, caplog):
    from tile2audio.probes import make_splits

    root = tmp_path / "audio"
    manifest = _clips(root, tone_fn, write_audio, n=12)
    shutil.copyfile(root / "c00.wav", root / "copy_of_c00.wav")
    shutil.copyfile(root / "c03.wav", root / "copy_of_c03.wav")
    extra = pd.DataFrame({"clip_id": ["copy_of_c00", "copy_of_c03"], "path": ["copy_of_c00.wav", "copy_of_c03.wav"],
                          "root": str(root), "label": ["a", "b"], "split": "", "fold": "", "group": ["", "g7"]})
    manifest = pd.concat([manifest, extra], ignore_index=True)
    manifest.loc[manifest["clip_id"] == "c07", "group"] = "g7"  # c07's group joins c03's copies
    with caplog.at_level(logging.WARNING, logger="tile2audio.features"):
        cache = _build(manifest, tmp_path / "cache")
    assert "2 clip(s) have the same audio file content as another clip" in _messages(caplog)
    groups = cache.index.set_index("clip_id")["group"]
    assert groups["c00"] == groups["copy_of_c00"] != ""
    assert groups["c03"] == groups["copy_of_c03"] == groups["c07"] == "g7"
    assert groups["c01"] == ""
    index = cache.index.reset_index(drop=True)
    for seed in range(5):
        for split in make_splits(index, ProbeConfig(n_splits=3, seed=seed)):
            fit, test = set(index["clip_id"].iloc[split.fit]), set(index["clip_id"].iloc[split.test])
            for a, b in (("c00", "copy_of_c00"), ("c03", "copy_of_c03")):
                assert not ({a, b} & fit and {a, b} & test), (split.name, a, b)


# --------------------------------------------------------------------------- missing files and roots


def test_missing_root_is_one_line(tmp_path, capsys):
    manifest = pd.DataFrame({"clip_id": [f"x{i}" for i in range(500)], "path": [f"x{i}.wav" for i in range(500)],
                             "root": str(tmp_path / "moved"), "label": "", "split": "", "fold": "", "group": ""})
    csv = tmp_path / "m.csv"
    manifest.to_csv(csv, index=False)
    assert main(["-q", "features", str(csv), "-o", str(tmp_path / "cache"), "--jobs", "1"]) == 2
    one_line_error(capsys, f"data root {tmp_path / 'moved'} does not exist", "500 clip(s)", "--root")


def test_many_missing_files_are_one_summary(tmp_path, tone_fn, write_audio, caplog):
    manifest = _clips(tmp_path / "audio", tone_fn, write_audio, n=2)
    gone = pd.DataFrame({"clip_id": [f"gone{i}" for i in range(300)], "path": [f"gone{i}.wav" for i in range(300)],
                         "root": manifest["root"][0], "label": "", "split": "", "fold": "", "group": ""})
    with caplog.at_level(logging.WARNING, logger="tile2audio.features"):
        cache = _build(pd.concat([manifest, gone], ignore_index=True), tmp_path / "cache", chunk_clips=32)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) <= 3, lines
    assert any("300 of 302 audio file(s) do not exist (e.g. gone0.wav, gone1.wav, gone2.wav, ...)" in m for m in lines)
    assert len(cache.index) == 2 and len(cache.failures) == 300


# --------------------------------------------------------------------------- signals


# Slows every clip down in this process and in the loky workers (fresh interpreters import
# sitecustomize too), and notes each worker's pid so the test can check none is left.
_SITECUSTOMIZE = """
import os, time
if os.environ.get("T2A_SLOW_CLIP"):
    import tile2audio.features as F
    _original = F._analyse_clip
    def _slow(path, params):
        open(os.path.join(os.environ["T2A_PIDS"], str(os.getpid())), "w").close()
        time.sleep(float(os.environ["T2A_SLOW_CLIP"]))
        return _original(path, params)
    F._analyse_clip = _slow
"""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.is_file() and "State:\tZ" in status.read_text())


@pytest.mark.parametrize("sig, jobs", [(signal.SIGTERM, 2), (signal.SIGINT, 1)])
def test_signal_during_features_stops_cleanly_and_resumes(tmp_path, tone_fn, write_audio, sig, jobs):
    # 70 clips: 3 chunks of the CLI's 32, so --jobs 2 runs on worker processes
    manifest = _clips(tmp_path / "audio", tone_fn, write_audio, n=70, seconds=0.5)
    csv = tmp_path / "m.csv"
    manifest.to_csv(csv, index=False)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    pids = tmp_path / "pids"
    pids.mkdir()
    out = tmp_path / "cache"
    sets = [a for k, v in TINY_FEATURES.items() for a in ("--set", f"features.{k}={v}")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), *sys.path]), "T2A_SLOW_CLIP": "0.5",
           "T2A_PIDS": str(pids)}
    proc = subprocess.Popen([sys.executable, "-m", "tile2audio", "features", str(csv), "-o", str(out),
                             "--jobs", str(jobs), *sets], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        # Wait until the build is under way (the chunk folder exists and clips are being read).
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "chunks").is_dir() and len(list(pids.iterdir())) >= 1:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = err.decode()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        "tile2audio: interrupted; rerun the same command to resume"), err[-2000:]
    workers = [int(p.name) for p in pids.iterdir()]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(_pid_alive(p) for p in workers):
        time.sleep(0.1)
    assert not [p for p in workers if _pid_alive(p)], "worker processes survived the signal"
    assert not list(out.rglob(".*.tmp"))
    assert not (out / "index.csv").exists()
    # A plain rerun (any --jobs) resumes and ends where an uninterrupted build ends.
    assert main(["-q", "features", str(csv), "-o", str(out), "--jobs", "2", *sets]) == 0
    assert main(["-q", "features", str(csv), "-o", str(tmp_path / "straight"), "--jobs", "1", *sets]) == 0
    assert _tree(out) == _tree(tmp_path / "straight")


def test_all_chunks_done_but_not_merged_with_jobs_2(built):
    # What a worker finishing the last chunk after its parent died left: every record, no index.
    manifest, cache, reference = built
    (cache / "index.csv").unlink()
    (cache / "params.json").unlink()
    _build(manifest, cache, jobs=2)
    assert _tree(cache) == _tree(reference)


# --------------------------------------------------------------------------- progress bars


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def test_progress_bars_only_on_a_terminal(tmp_path, tone_fn, write_audio, capfd):
    assert show_progress(True, _Stream(True)) and not show_progress(True, _Stream(False))
    assert not show_progress(False, _Stream(True))
    manifest = _clips(tmp_path / "audio", tone_fn, write_audio, n=2)
    csv = tmp_path / "m.csv"
    manifest.to_csv(csv, index=False)
    sets = [a for k, v in TINY_FEATURES.items() for a in ("--set", f"features.{k}={v}")]
    assert main(["features", str(csv), "-o", str(tmp_path / "cache"), "--jobs", "1", *sets]) == 0  # no -q
    err = capfd.readouterr().err
    assert "\r" not in err and "log-mel" not in err, err
