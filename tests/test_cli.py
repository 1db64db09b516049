"""The command line parses arguments, calls the API and turns errors into messages."""

import subprocess
import sys

import pandas as pd

from tile2audio.cli import main


def test_unknown_config_key_is_a_clear_error(tmp_path, capsys):
    code = main(["train", "--cache", str(tmp_path), "-o", str(tmp_path / "r"), "--set", "model.nope=1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "model.nope" in err and "known keys" in err


def test_missing_cache_is_a_clear_error(tmp_path, capsys):
    code = main(["train", "--cache", str(tmp_path / "nowhere"), "-o", str(tmp_path / "r")])
    assert code == 2 and "nowhere" in capsys.readouterr().err


def test_manifest_and_features_commands(tmp_path, write_audio, tone_fn, capsys):
    for label, f in (("low", 220.0), ("high", 880.0)):
        for i in range(2):
            write_audio(tmp_path / "audio" / label / f"{i}.wav", tone_fn(1.5, sr=8000, freq=f * (1 + i / 10)), sr=8000)
    assert main(["manifest", "folder", str(tmp_path / "audio"), "-o", str(tmp_path / "m.csv")]) == 0
    assert "4 clips, 2 labels" in capsys.readouterr().out
    assert main(["-q", "features", str(tmp_path / "m.csv"), "-o", str(tmp_path / "cache"), "--jobs", "1",
                 "--set", "features.sample_rate=8000", "--set", "features.n_mels=16",
                 "--set", "features.n_fft=256", "--set", "features.hop_length=128"]) == 0
    index = pd.read_csv(tmp_path / "cache" / "index.csv")
    assert len(index) == 4


def test_python_dash_m_works():
    result = subprocess.run([sys.executable, "-m", "tile2audio", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "manifest" in result.stdout and "bench" in result.stdout


def test_bench_passes_baseline_and_encoders(monkeypatch, capsys):
    import tile2audio.bench

    calls = []
    monkeypatch.setattr(tile2audio.bench, "run_bench", lambda *a, **k: calls.append((a, k)) or {"ok": 1})
    assert main(["bench", "train", "--baseline", "--encoders", "cnn,crnn", "--seconds", "2"]) == 0
    (args, kwargs), = calls
    assert args == ("train",) and kwargs["baseline"] is True and kwargs["encoders"] == ["cnn", "crnn"]
    assert kwargs["seconds"] == 2.0 and '"ok": 1' in capsys.readouterr().out
    calls.clear()
    assert main(["bench", "all"]) == 0
    assert calls[0][1]["baseline"] is False and calls[0][1]["encoders"] == ["cnn", "crnn", "resnet18"]


def test_cluster_takes_config_and_set_and_k_level_win(monkeypatch, tmp_path, capsys):
    import tile2audio.clusters
    import tile2audio.embed
    from tile2audio.config import ClusterConfig

    seen = []
    monkeypatch.setattr(tile2audio.embed, "load_embeddings", lambda path: path)
    monkeypatch.setattr(tile2audio.clusters, "cluster_embeddings",
                        lambda emb, cfg, out: seen.append(cfg) or {"chosen": 3})
    assert main(["cluster", "emb", "-o", str(tmp_path)]) == 0
    assert seen[-1] == ClusterConfig()
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("cluster:\n  k_max: 9\n  level: tile\n", encoding="utf-8")
    assert main(["cluster", "emb", "-o", str(tmp_path), "--config", str(cfg), "--set", "cluster.seed=4"]) == 0
    assert (seen[-1].k_min, seen[-1].k_max, seen[-1].level, seen[-1].seed) == (2, 9, "tile", 4)
    assert main(["cluster", "emb", "-o", str(tmp_path), "--config", str(cfg), "--k", "3:5", "--level", "clip"]) == 0
    assert (seen[-1].k_min, seen[-1].k_max, seen[-1].level) == (3, 5, "clip")
    assert main(["cluster", "emb", "-o", str(tmp_path), "--set", "cluster.nope=1"]) == 2
    assert '"chosen_k": 3' in capsys.readouterr().out
