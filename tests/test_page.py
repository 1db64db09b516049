"""report.html, its audio excerpts and the projector log, on a tiny set with a known answer."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from tile2audio.config import ClusterConfig, ProbeConfig, ReportConfig
from tile2audio.embed import from_clip_matrix
from tile2audio.listen import excerpt_window
from tile2audio.report import make_report

PROBE = ProbeConfig(n_splits=3, c_grid=(1.0,), pooling="mean")
CLUSTER = ClusterConfig(k_min=2, k_max=6, gap=False)
CENTRES = {"a": (10.0, 10.0), "b": (-10.0, 10.0), "c": (10.0, -10.0), "d": (-10.0, -10.0)}
#: Offsets from a blob's centre: the centre itself, then +- d along alternating axes, so the
#: blob's mean is its centre and its 5 nearest points are the centre and the d = 0.5, 1.0 pairs.
OFFSETS = [("o", (0.0, 0.0))] + [(f"{s}{j}", (sign * d, 0.0) if j % 2 else (0.0, sign * d))
                                 for j, d in enumerate((0.5, 1.0, 1.5, 2.0, 2.5), start=1)
                                 for s, sign in (("p", 1), ("m", -1))]
NEAREST = {"o", "p1", "m1", "p2", "m2"}


def blobs(audio_dir: Path, seconds=(0.6, 12.0), labels=True):
    """Four blobs of 11 clips (2-D), each clip a short sine (one in three 12 s long) on disk."""
    rows, X = [], []
    sr = 8000
    for b, (cx, cy) in CENTRES.items():
        for i, (name, (dx, dy)) in enumerate(OFFSETS):
            cid = f"{b}/{name}"
            path = audio_dir / f"{b}_{name}.wav"
            dur = seconds[1] if i % 3 == 0 else seconds[0]
            t = np.arange(int(dur * sr)) / sr
            sf.write(path, 0.3 * np.sin(2 * np.pi * (220 + 40 * i) * t), sr)
            rows.append({"clip_id": cid, "label": f"blob {b}" if labels else "", "path": str(path),
                         "group": f"{b}{i % 4}"})
            X.append((cx + dx, cy + dy))
    clips = pd.DataFrame(rows)
    X = np.asarray(X)
    rng = np.random.default_rng(0)
    trained = from_clip_matrix(clips, X, name="run", kind="trained")
    trained.meta["features"] = {"sample_rate": 16000}
    twin = from_clip_matrix(clips, rng.standard_normal(X.shape), name="run (random)", kind="random")
    return [trained, twin]


class Links(HTMLParser):
    """Collects tag names, <audio src> and <img src>; fails on unbalanced structure."""

    def __init__(self):
        super().__init__()
        self.tags, self.audio, self.img, self.stack = [], [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "audio" and a.get("src"):
            self.audio.append(a["src"])
        if tag == "img":
            self.img.append(a["src"])
        if tag not in ("meta", "img", "input", "br"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()


def parse(path: Path) -> Links:
    p = Links()
    p.feed(path.read_text(encoding="utf-8"))
    p.close()
    assert p.stack == [] and p.tags[0] == "html"
    return p


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    base = tmp_path_factory.mktemp("page")
    (base / "audio_in").mkdir()
    ents = blobs(base / "audio_in")
    (base / "audio_in" / "b_p3.wav").unlink()  # gone since it was embedded
    out = base / "report"
    make_report(ents, out, PROBE, CLUSTER, title="Blobs <&> check", progress=False,
                report_config=ReportConfig(excerpt_seconds=4.0))
    return out


def test_page_parses_and_every_audio_and_image_exists(report):
    page = parse(report / "report.html")
    assert len(page.audio) >= 4 * 5 and page.img
    for src in page.audio + page.img:
        assert not Path(src).is_absolute() and (report / src).is_file(), src
    assert all(src.startswith("audio/") and src.endswith(".ogg") for src in page.audio)
    text = (report / "report.html").read_text()
    assert "Blobs &lt;&amp;&gt; check" in text
    assert "<script src" not in text and 'src="http' not in text and 'href="http' not in text  # offline: no CDN


def test_cluster_sections_list_the_clips_nearest_each_centroid(report):
    rep = json.loads((report / "report.json").read_text())
    listen = rep["listen"]
    assert listen["ks"][0] == 4  # k = number of classes first
    sol = listen["clusterings"][0]
    assert len(sol["clusters"]) == 4
    text = (report / "report.html").read_text()
    for c in sol["clusters"]:
        ids = [n["clip_id"] for n in c["nearest"]]
        blob = {i.split("/")[0] for i in ids}
        assert len(blob) == 1 and {i.split("/")[1] for i in ids} == NEAREST
        assert c["size"] == len(OFFSETS) and c["purity"] == 1.0
        assert [n["distance"] for n in c["nearest"]] == sorted(n["distance"] for n in c["nearest"])
        section = text.split(f'data-k="4" data-cluster="{c["cluster"]}">')[1].split('<div class="cluster"')[0]
        for i in ids:
            assert f"<code>{i}</code>" in section


def test_nearest_clips_match_an_independent_kmeans(report):
    """Any k listened to: the listed clips are the members nearest their cluster's own mean."""
    from sklearn.preprocessing import StandardScaler

    rep = json.loads((report / "report.json").read_text())
    pts = rep["listen"]["points"]
    ids = np.array(pts["clip_id"])
    X = StandardScaler().fit_transform(np.array([CENTRES[i[0]] for i in ids]) +
                                       np.array([dict(OFFSETS)[i.split("/")[1]] for i in ids]))
    for sol in rep["listen"]["clusterings"]:
        assign = np.array(pts[f"cluster_k{sol['k']}"])
        for c in sol["clusters"]:
            members = np.flatnonzero(assign == c["cluster"])
            d = np.linalg.norm(X[members] - X[members].mean(axis=0), axis=1)
            listed = [n["clip_id"] for n in c["nearest"]]
            cutoff = np.sort(d)[len(listed) - 1]
            assert set(listed) <= set(ids[members][d <= cutoff + 1e-9])
            assert np.allclose(sorted(d[np.isin(ids[members], listed)]), [n["distance"] for n in c["nearest"]])


def test_excerpts_are_ogg_at_the_run_rate_and_at_most_the_excerpt_length(report):
    files = sorted((report / "audio").glob("*.ogg"))
    assert len(files) == 4 * len(OFFSETS) - 1  # 44 clips, one missing
    for f in files:
        info = sf.info(str(f))
        assert info.format == "OGG" and info.samplerate == 16000 and info.duration <= 4.0 + 0.01
    assert any(sf.info(str(f)).duration > 3.9 for f in files)  # the 12 s clips were cut to 4 s


def test_missing_audio_gets_a_note_and_the_page_is_written(report):
    rep = json.loads((report / "report.json").read_text())
    pts = rep["listen"]["points"]
    assert pts["audio"][pts["clip_id"].index("b/p3")] is None
    listed = [n for sol in rep["listen"]["clusterings"] for c in sol["clusters"] for n in c["nearest"]]
    missing = [n for n in listed if n["clip_id"] == "b/p3"]
    html = (report / "report.html").read_text()
    assert all("audio missing" in n["note"] for n in missing)
    if missing:
        assert "audio missing" in html


def test_projector_log_has_both_tensors_and_metadata(report):
    import tensorflow as tf
    from google.protobuf import text_format
    from tensorboard.plugins.projector import ProjectorConfig

    proj = report / "projector"
    config = text_format.Parse((proj / "projector_config.pbtxt").read_text(), ProjectorConfig())
    assert [e.metadata_path for e in config.embeddings] == ["metadata_trained.tsv", "metadata_random.tsv"]
    reader = tf.train.load_checkpoint(str(proj))
    for e in config.embeddings:
        assert reader.get_tensor(e.tensor_name).shape == (4 * len(OFFSETS), 2)
        meta = pd.read_csv(proj / e.metadata_path, sep="\t", keep_default_na=False)
        assert len(meta) == 4 * len(OFFSETS)
        assert {"clip_id", "label", "group", "split", "fold", "cluster_k4", "probe_correct"} <= set(meta.columns)
    meta = pd.read_csv(proj / "metadata_trained.tsv", sep="\t", keep_default_na=False)
    assert set(meta["probe_correct"]) <= {"yes", "no"} and (meta["probe_correct"] == "yes").mean() > 0.9
    assert meta.groupby("label")["cluster_k4"].nunique().max() == 1


def test_no_labels_still_lists_clusters_and_html_can_be_switched_off(tmp_path):
    (tmp_path / "in").mkdir()
    ents = blobs(tmp_path / "in", labels=False)
    make_report(ents, tmp_path / "r", PROBE, CLUSTER, progress=False)
    page = parse(tmp_path / "r" / "report.html")
    html = (tmp_path / "r" / "report.html").read_text()
    assert "Listen to the clusters" in html and "no labels" in html and page.audio
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert rep["listen"]["clusterings"] and rep["listen"]["confusions"] == []
    make_report(ents, tmp_path / "off", PROBE, CLUSTER, progress=False,
                report_config=ReportConfig(html=False, projector=False))
    assert (tmp_path / "off" / "report.md").is_file()
    assert not (tmp_path / "off" / "report.html").exists() and not (tmp_path / "off" / "audio").exists()
    assert not (tmp_path / "off" / "projector").exists()


def test_labels_and_clip_ids_are_escaped(tmp_path):
    (tmp_path / "in").mkdir()
    ents = blobs(tmp_path / "in")
    for e in ents:
        e.clips.loc[0, "clip_id"] = "</script><b>x"
        e.clips.loc[1, "label"] = "<i>blob a</i>"
    make_report(ents, tmp_path / "r", PROBE, CLUSTER, progress=False, report_config=ReportConfig(projector=False))
    html = (tmp_path / "r" / "report.html").read_text()
    parse(tmp_path / "r" / "report.html")
    assert "</script><b>x" not in html and "<i>blob a</i>" not in html
    assert "&lt;/script&gt;&lt;b&gt;x" in html or "\\u003c/script>" in html


@pytest.mark.parametrize("duration,ts,expected", [
    (3.0, [[0, 1.5]], (0.0, 3.0)),
    (30.0, [[0, 10], [10, 20], [20, 30]], (10.0, 20.0)),
    (30.0, [[0, 2], [2, 4], [28, 30]], (0.0, 10.0)),        # central tile near the start: clamped
    (30.0, np.zeros((1, 2)), (10.0, 20.0)),                  # unknown tiles: the middle
])
def test_excerpt_window(duration, ts, expected):
    assert excerpt_window(duration, np.asarray(ts, dtype=float), 10.0) == pytest.approx(expected)


def test_sprite_thumbnails_put_low_frequencies_at_the_bottom():
    from tile2audio.projector import thumbnails

    low = np.zeros((300, 64))
    low[:, :8] = 5.0  # energy in the lowest mel bands only
    short = np.tile(np.linspace(0, 1, 64), (5, 1))  # shorter than a thumbnail: repeated frames
    t = thumbnails([low, short, np.full((3, 64), np.nan)], size=16)
    assert t.shape == (3, 16, 16) and t.min() >= 0 and t.max() <= 1
    assert t[0, -2:].mean() == 1.0 and t[0, :8].mean() == 0.0
    assert t[1, -1].mean() < t[1, 0].mean()  # rising with frequency: bright at the top
    assert not t[2].any()  # non-finite frames give a blank thumbnail
