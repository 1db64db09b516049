"""Atomic writes leave either the old file or the new one, never a partial file."""

import numpy as np
import pytest

from tile2audio import atomic


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "f.txt"
    atomic.write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_open(target, "w") as fh:
            fh.write("partial")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_npz_and_npy_round_trip_without_pickle(tmp_path):
    atomic.save_npz(tmp_path / "a.npz", x=np.arange(3), y=np.ones((2, 2), np.float16))
    with np.load(tmp_path / "a.npz", allow_pickle=False) as z:
        assert z["x"].tolist() == [0, 1, 2] and z["y"].dtype == np.float16
    atomic.save_npy(tmp_path / "b.npy", np.eye(2))
    assert np.load(tmp_path / "b.npy", allow_pickle=False).trace() == 2
    atomic.write_json(tmp_path / "c.json", {"v": np.float32(1.5), "a": np.arange(2)})
    assert '"v": 1.5' in (tmp_path / "c.json").read_text()
