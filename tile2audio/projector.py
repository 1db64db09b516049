"""The TensorBoard Embedding Projector log of a report: ``report/projector/``.

:func:`write_projector` writes, with TensorBoard's own projector plugin config
(``tensorboard.plugins.projector``, as its documentation does it):

- a checkpoint (``embedding.ckpt-1.*``) of one variable per entry, the clip embeddings
  of the trained run (``trained``) and of its random-weight twin (``random``), pooled as
  the probes pool them;
- ``metadata_trained.tsv`` / ``metadata_random.tsv``: one row per clip after a header,
  ``clip_id, label, group, split, fold``, the k-means cluster at each listened k
  (``cluster_k<k>``, the entry's own k-means) and ``probe_correct`` (the logistic
  probe got the clip right: ``yes`` / ``no``, empty when it was not a test clip);
- ``sprite.png``: a small log-mel image of every clip, read from the run's feature cache
  (when the entry comes from a run whose cache is still there), so a point shows its
  spectrogram;
- ``projector_config.pbtxt`` tying each tensor to its metadata (and sprite).

``tensorboard --logdir report/projector`` then shows both point clouds under the
Projector tab; colour by ``label`` or a ``cluster_k`` column, search a clip id. The
metadata comes from the report data's ``listen`` part (:mod:`tile2audio.listen`), the
same as the page's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from . import atomic
from .errors import Tile2AudioError

log = logging.getLogger(__name__)

TENSOR_NAMES = ("trained", "random")
#: Sprite thumbnail side (pixels) and TensorBoard's largest sprite image.
THUMB, SPRITE_MAX = 32, 8192


def _cell(value) -> str:
    """A TSV cell: tabs and newlines become spaces; booleans yes / no; None empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return " ".join(str(value).split())


def metadata_tsv(points: dict) -> str:
    """The metadata TSV of a ``listen`` points table (header row, then one row per clip).

    Parameters
    ----------
    points : dict of equal-length columns (``clip_id``, ``label``, ..., ``cluster_k<k>``, ``correct``)

    Returns
    -------
    str
    """
    cols = ["clip_id", "label", "group", "split", "fold"] + sorted(c for c in points if c.startswith("cluster_k"))
    header = cols + ["probe_correct"]
    rows = zip(*[points[c] for c in cols], points["correct"])
    return "\n".join(["\t".join(header)] + ["\t".join(_cell(v) for v in r) for r in rows]) + "\n"


def _shrink(a: np.ndarray, size: int, axis: int) -> np.ndarray:
    """``a`` resized to ``size`` along ``axis``: block means when longer (no aliasing), repeats when shorter."""
    n = a.shape[axis]
    if n <= size:
        return np.take(a, np.linspace(0, n - 1, size).round().astype(int), axis=axis)
    edges = np.linspace(0, n, size + 1).astype(int)
    shape = [1, 1]
    shape[axis] = size
    return np.add.reduceat(a, edges[:-1], axis=axis) / np.diff(edges).reshape(shape)


def thumbnails(frames: list[np.ndarray], size: int = THUMB) -> np.ndarray:
    """Small log-mel images, low frequencies at the bottom, each scaled to its own range.

    Parameters
    ----------
    frames : list of (n_frames, n_mels) log-mel arrays
    size : thumbnail side in pixels

    Returns
    -------
    np.ndarray of float, shape (n, size, size), values in [0, 1]
    """
    out = np.zeros((len(frames), size, size))
    for i, f in enumerate(frames):
        f = np.asarray(f, dtype=np.float64)
        if f.ndim != 2 or not f.size or not np.isfinite(f).all():
            continue
        img = _shrink(_shrink(f, size, 0), size, 1).T[::-1]
        out[i] = (img - img.min()) / max(float(np.ptp(img)), 1e-9)
    return out


def write_sprite(entry, path: Path) -> list[int] | None:
    """The sprite of an entry's clips from its run's feature cache; its thumbnail size, or None.

    Cheap: the cache's log-mel frames (memory-mapped), one small image per clip, in clip
    order, row by row. None (no sprite) when the entry has no run with a readable cache.
    """
    from .features import open_cache
    from .plots import pyplot
    from .runs import read_run

    run_dir = entry.meta.get("run_dir")
    try:
        cache = open_cache(read_run(run_dir)["cache"]) if run_dir else None
        frames = [cache.frames(c, raw=True) for c in entry.clips["clip_id"]] if cache is not None else None
    except (Tile2AudioError, KeyError, OSError) as exc:
        log.info("projector sprite skipped: %s", exc)
        return None
    if not frames:
        return None
    per_row = int(np.ceil(np.sqrt(len(frames))))
    size = min(THUMB, SPRITE_MAX // per_row)
    if size < 8:
        return None
    thumbs = thumbnails(frames, size)
    sheet = np.zeros((per_row * size, per_row * size))
    for i, t in enumerate(thumbs):
        r, c = divmod(i, per_row)
        sheet[r * size:(r + 1) * size, c * size:(c + 1) * size] = t
    with atomic.atomic_path(path) as tmp:
        pyplot().imsave(tmp, sheet, cmap="magma", format="png")
    return [size, size]


def write_projector(report: dict, entries: Sequence, out_dir: str | Path, pooling: str = "meanstd") -> Path:
    """Write the projector log of a report's best entry and its random-weight twin.

    Parameters
    ----------
    report : the report dict (its ``listen`` part gives the metadata)
    entries : [best EmbeddingSet, twin EmbeddingSet or None]
    out_dir : the log folder (``report/projector``)
    pooling : the clip pooling shown (the probes' ``probe.pooling``)

    Returns
    -------
    Path
        ``out_dir``.
    """
    import tensorflow as tf
    from tensorboard.plugins import projector

    listen = report.get("listen") or {}
    out_dir = atomic.ensure_dir(out_dir, "projector log folder")
    for old in list(out_dir.glob("embedding.ckpt*")) + [out_dir / "checkpoint"]:
        old.unlink(missing_ok=True)  # a rerun must not leave an older checkpoint for TensorBoard to pick
    tensors, config = {}, projector.ProjectorConfig()
    sprite = write_sprite(entries[0], out_dir / "sprite.png") if entries else None
    for name, entry, points in zip(TENSOR_NAMES, entries, (listen.get("points"), listen.get("twin_points"))):
        if entry is None or points is None:
            continue
        X = np.asarray(entry.pooled(pooling), dtype=np.float32)
        tensors[name] = tf.Variable(np.nan_to_num(X), name=name, trainable=False)
        atomic.write_text(out_dir / f"metadata_{name}.tsv", metadata_tsv(points))
        emb = config.embeddings.add()
        emb.tensor_name = f"{name}/.ATTRIBUTES/VARIABLE_VALUE"
        emb.metadata_path = f"metadata_{name}.tsv"
        if sprite and entry.clips["clip_id"].tolist() == entries[0].clips["clip_id"].tolist():
            emb.sprite.image_path = "sprite.png"
            emb.sprite.single_image_dim.extend(sprite)
    if not tensors:
        raise Tile2AudioError("no embeddings to write to the projector log")
    try:
        tf.train.Checkpoint(**tensors).save(str(out_dir / "embedding.ckpt"))
        projector.visualize_embeddings(str(out_dir), config)
    except (OSError, tf.errors.OpError) as exc:
        raise Tile2AudioError(f"{out_dir}: cannot write the projector log: {exc}") from exc
    return out_dir
