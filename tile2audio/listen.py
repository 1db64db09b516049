"""What a report lets you listen to: clusters, confusions, the map, and their audio excerpts.

:func:`listening_data` adds one part, ``listen``, to the report data (report.json); the
page (:mod:`tile2audio.page`) and the projector log (:mod:`tile2audio.projector`) both
read it. It holds, for the report's best entry:

``clusterings``
    the k-means solutions at k = the number of classes and at the k the silhouette
    picks (the sweep's own k-means: same features, standardisation and seed, so the
    clusters are those of the k-means table). Per cluster: its size, majority label
    and label purity (over its labelled clips; None without labels), and the
    ``listen_clips`` clips nearest its centroid with their distances (Euclidean, in the
    standardised space k-means ran in). Listening is at clip level: with
    ``cluster.level = tile`` the k values of the tile-level sweep are applied to the
    pooled clip embeddings.
``confusions``
    the 3 largest off-diagonal cells of the logistic probe's confusion matrix, each with
    up to 3 of its clips (out-of-fold predictions from the probe result).
``points``
    one column per field, one row per clip: ``clip_id, label, group, split, fold``, the
    2-D map coordinates ``x, y`` (the projection drawn in embedding_map.png), the cluster
    at each listened k (``cluster_k<k>``), ``correct`` (the logistic probe got the clip
    right: true / false / None when it was not a test clip) and ``audio``.
``twin_points``
    the same columns for the random-weight twin (no map, no audio), for the projector.

Audio excerpts go to ``audio/<clip file>.ogg`` (Ogg Vorbis through soundfile, at the
run's sample rate): the whole clip when it lasts at most ``excerpt_seconds``, else a
window of ``excerpt_seconds`` centred on its most central tile. Every clip listed gets
one; when the best entry has at most :data:`MAP_AUDIO_CLIPS` clips, every clip does, so
a click on any point of the map plays it. A clip whose audio cannot be read (moved,
deleted, corrupt) gets a ``note`` instead of an ``audio`` path, and the rest goes on.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from . import atomic
from .audio import load_audio
from .clusters import centroid_distances
from .config import ClusterConfig, ProbeConfig, ReportConfig
from .embed import safe_file_name
from .errors import Tile2AudioError
from .plots import project_2d

log = logging.getLogger(__name__)

#: Up to this many clips, every clip of the map gets an excerpt (a click plays it).
MAP_AUDIO_CLIPS = 300
#: Confusion cells listened to, and clips per cell.
N_CONFUSIONS, CONFUSION_CLIPS = 3, 3
AUDIO_DIR = "audio"


def listen_ks(cluster_result: dict | None) -> list[tuple[int, list[str]]]:
    """The k values to listen to, with why: k = number of classes, then the silhouette's pick.

    Parameters
    ----------
    cluster_result : one entry of the report's ``cluster["entries"]`` (a sweep result), or None

    Returns
    -------
    list of (k, reasons)
        Without labels, the silhouette's k alone (else the elbow's).
    """
    if not cluster_result:
        return []
    ks: dict[int, list[str]] = {}
    at = cluster_result.get("at_n_classes")
    if at:
        ks.setdefault(int(at["k"]), []).append("number of classes")
    chosen = cluster_result.get("chosen") or {}
    pick = chosen.get("silhouette") or (None if ks else chosen.get("elbow"))
    if pick is not None:
        ks.setdefault(int(pick), []).append("silhouette pick" if chosen.get("silhouette") else "elbow pick")
    return list(ks.items())


def _labels(entry) -> np.ndarray:
    """The entry's labels as str ("" for none)."""
    return entry.clips["label"].fillna("").astype(str).to_numpy()


def _clusters(entry, ks, config: ClusterConfig, standardized: bool):
    """k -> (clusters (n,), distances (n,)) at clip level; nothing for non-finite embeddings."""
    X = entry.pooled(config.pooling)
    if not np.isfinite(X).all():
        return {}
    return {k: centroid_distances(X, k, config.seed, standardized) for k in ks if 2 <= k < len(X)}


def _cluster_listing(labels, clip_ids, assign, dist, n_near: int) -> list[dict]:
    """Size, majority label, purity and the nearest clips of each cluster."""
    out = []
    for c in np.unique(assign):
        members = np.flatnonzero(assign == c)
        labelled = labels[members][labels[members] != ""]
        majority, purity = None, None
        if len(labelled):
            names, counts = np.unique(labelled, return_counts=True)
            majority, purity = str(names[np.argmax(counts)]), float(counts.max() / len(labelled))
        near = members[np.argsort(dist[members], kind="stable")[:n_near]]
        out.append({"cluster": int(c), "size": int(len(members)), "majority": majority, "purity": purity,
                    "nearest": [{"row": int(i), "clip_id": str(clip_ids[i]), "label": str(labels[i]),
                                 "distance": float(dist[i])} for i in near]})
    return out


def _confusions(probe_result: dict, name: str, labels, clip_ids) -> tuple[list[dict], str | None]:
    """The largest off-diagonal cells of the entry's logistic confusion, with clips of each."""
    row = next((r for r in probe_result.get("rows", []) if r["name"] == name and r["probe"] == "logreg"), None)
    if row is None:
        return [], "no logistic-probe result for this entry (no labels)"
    predicted = (probe_result.get("predictions") or {}).get(name)
    cm = np.asarray(row["confusion"], dtype=np.int64)
    np.fill_diagonal(cm, 0)
    cells = [(int(cm[i, j]), i, j) for i, j in zip(*np.nonzero(cm))]
    cells.sort(key=lambda c: (-c[0], c[1], c[2]))
    names = probe_result["labels"]
    out = []
    for count, i, j in cells[:N_CONFUSIONS]:
        rows = [] if predicted is None else [
            k for k, cid in enumerate(clip_ids) if labels[k] == names[i] and predicted.get(cid) == names[j]]
        out.append({"true": names[i], "predicted": names[j], "count": count,
                    "clips": [{"row": int(k), "clip_id": str(clip_ids[k]), "label": names[i],
                               "predicted": names[j]} for k in rows[:CONFUSION_CLIPS]]})
    note = None
    if not cells:
        note = "the logistic probe made no errors"
    elif predicted is None:
        note = "the probe result has no per-clip predictions (made before they were kept): rerun the probe stage"
    return out, note


def _correct(probe_result: dict, name: str, labels, clip_ids) -> list:
    """Per clip: the logistic probe got it right (bool), or None when it was not a test clip."""
    predicted = (probe_result.get("predictions") or {}).get(name) or {}
    return [None if cid not in predicted else bool(predicted[cid] == lab) for cid, lab in zip(clip_ids, labels)]


def _points(entry, probe_result, clusters: dict) -> dict:
    """Column-wise per-clip table: ids, metadata, cluster at each k, probe correctness."""
    clips = entry.clips
    labels = _labels(entry)
    ids = clips["clip_id"].astype(str).to_numpy()
    cols = {"clip_id": ids.tolist(), "label": labels.tolist()}
    for col in ("group", "split", "fold"):
        values = clips[col].tolist() if col in clips else [""] * len(ids)
        cols[col] = ["" if pd.isna(v) else str(v) for v in values]
    for k, (assign, _) in clusters.items():
        cols[f"cluster_k{k}"] = assign.tolist()
    cols["correct"] = _correct(probe_result, entry.name, labels, ids)
    return cols


def _audio_path(entry, row: int) -> Path | None:
    """The audio file of a clip row: ``root/path`` for a relative path with a root column."""
    clips = entry.clips
    path = str(clips["path"].iloc[row]) if "path" in clips else ""
    if not path:
        return None
    p = Path(path)
    if not p.is_absolute() and "root" in clips and str(clips["root"].iloc[row]):
        p = Path(str(clips["root"].iloc[row])) / p
    return p


def excerpt_window(duration: float, timestamps: np.ndarray, max_seconds: float) -> tuple[float, float]:
    """Start and end (seconds) of a clip's excerpt.

    Parameters
    ----------
    duration : the clip's length in seconds
    timestamps : (n_tiles, 2) tile start / end seconds (zeros when unknown)
    max_seconds : the longest excerpt

    Returns
    -------
    (float, float)
        ``(0, duration)`` for a short clip; else ``max_seconds`` centred on the tile whose
        centre is nearest the clip's middle, shifted to stay inside the clip.
    """
    if duration <= max_seconds:
        return 0.0, float(duration)
    centre = duration / 2
    ts = np.asarray(timestamps, dtype=float).reshape(-1, 2)
    if len(ts) and (ts[:, 1] > ts[:, 0]).any():
        mids = ts.mean(axis=1)
        centre = float(mids[np.argmin(np.abs(mids - duration / 2))])
    start = min(max(centre - max_seconds / 2, 0.0), duration - max_seconds)
    return float(start), float(start + max_seconds)


def write_excerpt(entry, row: int, out_dir: Path, sample_rate: int | None, max_seconds: float) -> dict:
    """Write one clip's excerpt as Ogg Vorbis; ``{"audio": relative path}`` or ``{"note": why not}``."""
    import soundfile as sf

    src = _audio_path(entry, row)
    if src is None:
        return {"note": "no audio path recorded for this clip"}
    clip_id = str(entry.clips["clip_id"].iloc[row])
    try:
        sr = sample_rate or sf.info(str(src)).samplerate
        y = load_audio(src, sr)
    except (Tile2AudioError, RuntimeError, OSError) as exc:
        reason = "audio missing" if not src.exists() else "audio unreadable"
        log.warning("%s: %s (%s)", clip_id, reason, src)
        return {"note": f"{reason}: {src}" if not src.exists() else f"{reason}: {exc}"}
    try:
        timestamps = entry.tiles(clip_id)[1]
    except Tile2AudioError:
        timestamps = np.zeros((0, 2))
    start, end = excerpt_window(len(y) / sr, timestamps, max_seconds)
    y = y[int(round(start * sr)):int(round(end * sr))]
    rel = f"{AUDIO_DIR}/{safe_file_name(clip_id)}.ogg"
    try:
        with atomic.atomic_path(out_dir / rel) as tmp:
            sf.write(str(tmp), np.clip(y, -1.0, 1.0), sr, format="OGG", subtype="VORBIS")
    except (RuntimeError, OSError) as exc:
        raise Tile2AudioError(f"{out_dir / rel}: cannot write the audio excerpt: {exc}") from exc
    return {"audio": rel, "start": round(start, 3), "end": round(end, 3)}


def _sample_rate(entry) -> int | None:
    """The run's sample rate (from embed.json's feature parameters), or None."""
    rate = (entry.meta.get("features") or {}).get("sample_rate")
    return int(rate) if rate else None


def listening_data(best, twin, probe_result: dict, cluster: dict, out_dir: str | Path,
                   probe_config: ProbeConfig = ProbeConfig(), cluster_config: ClusterConfig = ClusterConfig(),
                   config: ReportConfig = ReportConfig()) -> dict:
    """The ``listen`` part of the report data; writes the audio excerpts when ``config.html``.

    Parameters
    ----------
    best : EmbeddingSet, the report's best entry (its clips are listened to)
    twin : EmbeddingSet or None, its random-weight twin (projector metadata only)
    probe_result : :func:`tile2audio.probes.run_probes` result (``rows``, ``labels``, ``predictions``)
    cluster : the report's ``{"figure_entry": ..., "entries": [...]}`` cluster part
    out_dir : the report folder (excerpts go to ``out_dir/audio``)
    probe_config : its ``pooling`` and ``seed`` give the map (as embedding_map.png)
    cluster_config : ``level``, ``pooling`` and ``seed`` of the sweep
    config : ReportConfig (``listen_clips``, ``excerpt_seconds``, ``html``)

    Returns
    -------
    dict
        See the module docstring; also ``entry``, ``twin``, ``ks``, ``map_method``,
        ``sample_rate``, ``excerpt_seconds``, ``confusion_note``.
    """
    out_dir = Path(out_dir)
    entries = (cluster or {}).get("entries") or []
    sweep = next((r for r in entries if r.get("name") == best.name), None)
    ks = listen_ks(sweep)
    standardized = bool((sweep or {}).get("standardized", True))
    clusters = _clusters(best, [k for k, _ in ks], cluster_config, standardized)
    labels, ids = _labels(best), best.clips["clip_id"].astype(str).to_numpy()
    clusterings = [{"k": k, "why": why, "clusters": _cluster_listing(labels, ids, *clusters[k], config.listen_clips)}
                   for k, why in ks if k in clusters]
    confusions, note = _confusions(probe_result, best.name, labels, ids)
    points = _points(best, probe_result, clusters)
    X = np.asarray(best.pooled(probe_config.pooling))
    finite = np.isfinite(X).all(axis=1)
    xy, method = np.full((len(X), 2), np.nan), None
    if finite.sum() >= 5:
        try:
            proj, method = project_2d(X[finite], probe_config.seed)
            xy[finite] = proj
        except Tile2AudioError as e:  # a collapsed encoder: the page goes without a map (report logs why)
            log.debug("listen: no map: %s", e)
    points["x"], points["y"] = xy[:, 0].round(4).tolist(), xy[:, 1].round(4).tolist()
    points["audio"] = [None] * len(ids)
    if config.html:
        _write_audio(best, clusterings, confusions, points, out_dir, config)
    result = {"entry": best.name, "twin": twin.name if twin is not None else None, "ks": [k for k, _ in ks],
              "sample_rate": _sample_rate(best), "excerpt_seconds": config.excerpt_seconds,
              "map_method": method, "map_pooling": probe_config.pooling, "clusterings": clusterings,
              "confusions": confusions, "confusion_note": note, "points": points, "twin_points": None}
    if twin is not None and len(twin.clips) == len(best.clips):
        result["twin_points"] = _points(twin, probe_result, _clusters(twin, [k for k, _ in ks], cluster_config,
                                                                      standardized))
    return result


def map_projection(listen: dict | None):
    """The (finite coordinates (n, 2), method) of the listen data's map, or None (for plot_embedding_map)."""
    if not listen or not listen.get("map_method"):
        return None
    xy = np.column_stack([listen["points"]["x"], listen["points"]["y"]]).astype(float)
    return xy[np.isfinite(xy).all(axis=1)], listen["map_method"]


def _write_audio(best, clusterings, confusions, points, out_dir: Path, config: ReportConfig) -> None:
    """Write the excerpts of every listed clip (every clip of a small set) and note each result."""
    from tqdm.auto import tqdm

    items = [c for cl in clusterings for cluster in cl["clusters"] for c in cluster["nearest"]]
    items += [c for conf in confusions for c in conf["clips"]]
    rows = sorted({c["row"] for c in items} | (set(range(len(best.clips))) if len(best.clips) <= MAP_AUDIO_CLIPS
                                                 else set()))
    atomic.ensure_dir(out_dir / AUDIO_DIR, "report audio folder")
    rate = _sample_rate(best)
    done = {}
    for r in tqdm(rows, desc="audio excerpts", unit="clip", disable=not log.isEnabledFor(logging.INFO)):
        done[r] = write_excerpt(best, r, out_dir, rate, config.excerpt_seconds)
    for c in items:
        c.update(done[c["row"]])
    for r, d in done.items():
        points["audio"][r] = d.get("audio")
