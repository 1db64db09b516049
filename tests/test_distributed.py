"""Two MultiWorkerMirroredStrategy workers on 127.0.0.1 (CPU) end with identical weights."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest


def _free_ports(n):
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def test_two_workers_end_with_identical_weights(tiny_cache, tmp_path):
    import keras

    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    out = tmp_path / "runs"
    overrides = ["model.widths=[4,8]", "model.embedding_dim=8", "train.batch_size=8", "train.epochs=1",
                 "train.steps_per_epoch=3", "tiles.tile_seconds=0.5", "tiles.neighbourhood_seconds=1.0"]
    procs = []
    for i in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}),
                   CUDA_VISIBLE_DEVICES="-1", TF_CPP_MIN_LOG_LEVEL="2")
        cmd = [sys.executable, "-m", "tile2audio", "-q", "train", "--cache", str(tiny_cache), "-o", str(out),
               "--strategy", "multiworker"] + [a for o in overrides for a in ("--set", o)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=420)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("multi-worker training did not finish in time")
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-3000:]
    (run,) = [d for d in out.iterdir() if d.is_dir()]
    chief = keras.saving.load_model(run / "encoder.keras", safe_mode=True)
    other = keras.saving.load_model(run / "worker_1" / "encoder.keras", safe_mode=True)
    init = keras.saving.load_model(run / "encoder_init.keras", safe_mode=True)
    for a, b in zip(chief.get_weights(), other.get_weights()):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert any(not np.allclose(a, b) for a, b in zip(chief.get_weights(), init.get_weights()))
    assert json.loads((run / "run.json").read_text())["step"] == 3
