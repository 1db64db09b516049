"""openSMILE baselines (eGeMAPSv02, ComParE_2016): skip cleanly without the optional extra."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tile2audio import baselines
from tile2audio.config import ProbeConfig
from tile2audio.errors import Tile2AudioError

needs_opensmile = pytest.mark.skipif(not baselines.opensmile_available(),
                                     reason='opensmile not installed (pip install -e ".[opensmile]")')
REPO = Path(__file__).resolve().parents[1]


def test_probe_baselines_setting_is_validated():
    assert ProbeConfig().baselines is None
    assert ProbeConfig(baselines=("mfcc", "egemaps")).baselines == ("mfcc", "egemaps")
    with pytest.raises(Tile2AudioError, match="probe.baselines"):
        ProbeConfig(baselines=("mfcc", "opensmile"))
    with pytest.raises(Tile2AudioError, match="twice"):
        ProbeConfig(baselines=("mfcc", "mfcc"))


def test_default_baselines_follow_what_is_installed(monkeypatch):
    monkeypatch.setattr(baselines, "opensmile_available", lambda: False)
    assert baselines.resolve_baselines(None) == ["mfcc"]
    with pytest.raises(Tile2AudioError, match=r"pip install -e \"\.\[opensmile\]\""):
        baselines.resolve_baselines(["mfcc", "compare"])
    monkeypatch.setattr(baselines, "opensmile_available", lambda: True)
    assert baselines.resolve_baselines(None) == ["mfcc", "egemaps", "compare"]
    assert baselines.resolve_baselines(["compare", "mfcc"]) == ["mfcc", "compare"]


def test_opensmile_refuses_to_run_beside_tensorflow(monkeypatch, tone_fn):
    monkeypatch.setitem(sys.modules, "tensorflow", sys.modules.get("tensorflow", object()))
    with pytest.raises(Tile2AudioError, match="TensorFlow"):
        baselines.opensmile_functionals(tone_fn(1.0), 22050, "egemaps")


@needs_opensmile
def test_opensmile_matrix_shapes_nan_row_and_cache(tmp_path, tone_fn, write_audio, caplog):
    a = write_audio(tmp_path / "a.wav", tone_fn(1.0, freq=300.0, noise=0.01))
    b = write_audio(tmp_path / "b.flac", tone_fn(0.2, sr=16000, freq=900.0, channels=2), sr=16000)  # < 0.5 s
    broken = tmp_path / "c.wav"
    broken.write_bytes(b"not audio")
    cache = tmp_path / "egemaps_stats.npz"
    with caplog.at_level(logging.WARNING):
        M = baselines.opensmile_matrix([a, b, broken], ["a", "b", "c"], "egemaps", cache_file=cache, jobs=2,
                                       progress=False)
    assert M.shape == (3, 88) and M.dtype == np.float32
    assert np.isfinite(M[:2]).all() and np.isnan(M[2]).all()
    assert not np.allclose(M[0], M[1])  # different sounds, different functionals
    assert "c" in caplog.text
    with np.load(cache, allow_pickle=False) as z:
        assert sorted(z["clip_ids"]) == ["a", "b"]
    again = baselines.opensmile_matrix([b, a], ["b", "a"], "egemaps", cache_file=cache, jobs=1, progress=False)
    np.testing.assert_array_equal(again, M[[1, 0]])


@needs_opensmile
def test_opensmile_extraction_works_where_tensorflow_is_imported(tmp_path, tone_fn, write_audio):
    """The reported trap: opensmile after TensorFlow in one process crashed (malloc)."""
    wav = write_audio(tmp_path / "x.wav", tone_fn(1.5, noise=0.02))
    code = (
        "import tensorflow, json, sys\n"
        "from tile2audio import baselines\n"
        f"M = baselines.opensmile_matrix([{str(wav)!r}], ['x'], 'compare', jobs=1, progress=False)\n"
        "print(json.dumps({'shape': list(M.shape), 'finite': bool((M == M).all()),"
        " 'opensmile_here': 'opensmile' in sys.modules}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env={**__import__("os").environ, "PYTHONPATH": str(REPO),
                                             "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out == {"shape": [1, 6373], "finite": True, "opensmile_here": False}


@needs_opensmile
def test_opensmile_rows_in_probe_and_kmeans_tables(tmp_path, tone_fn, write_audio):
    from tile2audio.clusters import cluster_entries
    from tile2audio.config import ClusterConfig
    from tile2audio.probes import run_probes

    paths, rows = [], []
    for i in range(12):
        label = "low" if i % 2 else "high"
        freq = 200.0 + 20 * i if label == "low" else 3000.0 + 50 * i
        paths.append(write_audio(tmp_path / f"{i}.wav", tone_fn(0.8, freq=freq, noise=0.02, seed=i)))
        rows.append({"clip_id": f"c{i}", "label": label})
    clips = pd.DataFrame(rows)
    sets = [baselines.baseline_embeddings(k, clips, paths, jobs=2, progress=False) for k in ("mfcc", "egemaps")]
    assert [s.kind for s in sets] == ["mfcc", "egemaps"] and sets[1].meta["dim"] == 88
    result = run_probes(sets, ProbeConfig(protocol="kfold", n_splits=2, fixed_c=1.0), progress=False)
    assert {r["kind"] for r in result["rows"]} == {"mfcc", "egemaps"}
    cl = cluster_entries(sets, ClusterConfig(k_min=2, k_max=3, gap=False), tmp_path / "cl")
    assert [e["kind"] for e in cl["entries"]] == ["mfcc", "egemaps"]
    assert json.loads((tmp_path / "cl" / "cluster.json").read_text())["figure_entry"] == sets[0].name


@needs_opensmile
def test_a_main_script_importing_tensorflow_is_a_clear_error(tmp_path, tone_fn, write_audio):
    """Spawned workers re-import the main script: one with a top-level TF import is refused, not NaN."""
    wav = write_audio(tmp_path / "x.wav", tone_fn(1.0))
    script = tmp_path / "user_script.py"
    script.write_text(
        "import tensorflow\n"
        "from tile2audio import baselines\n"
        "from tile2audio.errors import Tile2AudioError\n"
        "if __name__ == '__main__':\n"
        "    try:\n"
        f"        baselines.opensmile_matrix([{str(wav)!r}], ['x'], 'egemaps', jobs=1, progress=False)\n"
        "    except Tile2AudioError as exc:\n"
        "        print('ERROR', exc)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ERROR" in done.stdout and "if __name__ == '__main__'" in done.stdout

