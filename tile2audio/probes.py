"""Linear and k-NN probes of embeddings, on leak-free splits shared by every entry.

Protocols (``ProbeConfig.protocol``; ``auto`` picks the first that applies):

``split``
    The clip table's ``split`` column has ``train`` and ``test`` clips (GTZAN
    artist-filtered lists, FMA official split). One split; ``valid`` clips, if any, are
    the validation set.
``fold``
    The ``fold`` column is filled: leave-one-fold-out (DCASE 2018 task 5: 4 folds;
    urbansound_f12: train on fold 1 test on fold 2 and the reverse). Clips without a
    fold are left out.
``kfold``
    Stratified k-fold (``n_splits``, shuffled, ``random_state=seed``), grouped by the
    ``group`` column when any clip has one (``StratifiedGroupKFold``; a clip without a
    group is its own group), by clip otherwise.

Clips with an empty label take no part in probes.

How C is chosen (logistic regression, linear SVM)
    When a split has no validation clips, :func:`make_splits` holds out one stratified,
    grouped fifth of the training clips as validation. Each C of ``c_grid`` is fitted on
    the training part and scored (macro-F1) on the validation part only; the test clips
    are never seen. The chosen C is then refitted on training + validation, which is the
    final model. ``fixed_c`` skips the search (the fit is still on training +
    validation). k-NN is fitted on training + validation too. Ties in the search go to
    the smaller C (stronger regularisation).

Features are standardised (``StandardScaler`` fitted on the fitting rows only) before
every probe, k-NN included: the k-NN distances (cosine and Euclidean) are therefore
measured between standardised features, not raw embeddings.

Tile-level probes (``level='tile'``) fit on every tile of the fitting clips and average
the predicted class probabilities (decision values for the SVM) over the tiles of each
validation / test clip; a clip's tiles are always on one side of a split because splits
are made of clips.

Metrics are computed per fold, then reported as mean and standard deviation over folds
(``np.std``, ``ddof=0``, so a single split has std 0): accuracy, macro-F1 (over the
classes present in the fold's truth or predictions, scikit-learn's default), per-class
F1 (mean over the folds where the class occurs), and the confusion matrix summed over
folds (rows: true label, columns: predicted, in the order of ``labels``).

Clips whose features are not finite in any entry (e.g. an MFCC row of NaN for a file
that failed to decode) are dropped from every split for every entry, with a warning, so
all entries are still compared on exactly the same clips.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import pandas as pd
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from .console import show_progress
from .config import ProbeConfig
from .datasets.schema import group_or_self, text_column
from .errors import Tile2AudioError

log = logging.getLogger(__name__)

PROBES_WITH_C = ("logreg", "svm")
MAX_ITER = 5000
INNER_FOLDS = 5
#: Feature matrices with fewer values than this are probed, clustered and mapped (t-SNE)
#: single-threaded: on small problems BLAS / OpenMP thread start-up costs more than it
#: saves (many times more on a machine shared with other jobs).
SMALL_PROBLEM = 2_000_000


@dataclass(frozen=True)
class Split:
    """One train / validation / test split, as row positions in the clip table.

    Attributes
    ----------
    name : str
        e.g. ``split``, ``fold 1``, ``kfold 3/5``.
    train, valid, test : np.ndarray of int64
        Row positions (``iloc``) of the clips on each side; ``valid`` may be empty.
    """

    name: str
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray

    @property
    def fit(self) -> np.ndarray:
        """Training and validation rows together (what the final model is fitted on)."""
        return np.concatenate([self.train, self.valid])


# --------------------------------------------------------------------------- splits


def _table(clips: pd.DataFrame) -> pd.DataFrame:
    """The clip table with a fresh index and string label / split / group columns."""
    if "clip_id" not in clips.columns or "label" not in clips.columns:
        raise Tile2AudioError("the clip table needs at least the columns clip_id and label")
    t = clips.reset_index(drop=True).copy()
    for col in ("label", "split", "group"):
        t[col] = text_column(t, col)
    if "fold" not in t.columns:
        t["fold"] = pd.array([pd.NA] * len(t), dtype="Int64")
    t["fold"] = pd.array(pd.to_numeric(t["fold"].replace("", None), errors="coerce"), dtype="Int64")
    t["clip_id"] = t["clip_id"].astype(str)
    dup = t["clip_id"][t["clip_id"].duplicated()]
    if len(dup):
        raise Tile2AudioError(f"clip ids must be unique; repeated: {', '.join(dup.unique()[:5])}")
    return t


def resolve_protocol(clips: pd.DataFrame, protocol: str = "auto") -> str:
    """The protocol to use for the labelled clips of ``clips``.

    Parameters
    ----------
    clips : DataFrame with ``label``, ``split``, ``fold`` columns
    protocol : ``auto``, ``split``, ``fold`` or ``kfold``

    Returns
    -------
    str
        ``split``, ``fold`` or ``kfold``.
    """
    t = _table(clips)
    t = t[t["label"] != ""]
    splits = set(t["split"])
    has_split = {"train", "test"} <= splits
    n_folds = t["fold"].dropna().nunique()
    if protocol == "auto":
        return "split" if has_split else "fold" if n_folds >= 2 else "kfold"
    if protocol == "split" and not has_split:
        raise Tile2AudioError(
            f"probe.protocol=split needs labelled clips with split 'train' and 'test'; found {sorted(splits)}"
        )
    if protocol == "fold" and n_folds < 2:
        raise Tile2AudioError(f"probe.protocol=fold needs at least 2 folds in the fold column; found {n_folds}")
    if protocol not in ("split", "fold", "kfold"):
        raise Tile2AudioError(f"unknown probe protocol {protocol!r}")
    return protocol


def _groups(t: pd.DataFrame) -> np.ndarray:
    """Group of each clip; a clip without a group is its own group."""
    return group_or_self(t["group"].to_numpy(dtype=object), t["clip_id"].to_numpy(dtype=object))


def _split_protocol(t: pd.DataFrame, labelled: np.ndarray) -> list[Split]:
    """The one split given by the ``split`` column."""
    s = t["split"].to_numpy()[labelled]
    other = sorted(set(s) - {"train", "valid", "test"})
    if other:
        log.warning("probe split protocol: ignoring %d clip(s) with split %s", int(np.isin(s, other).sum()), other)
    pick = lambda name: labelled[s == name].astype(np.int64)  # noqa: E731
    return [Split("split", pick("train"), pick("valid"), pick("test"))]


def _fold_protocol(t: pd.DataFrame, labelled: np.ndarray) -> list[Split]:
    """Leave-one-fold-out over the ``fold`` column."""
    fold = t["fold"].iloc[labelled]
    missing = int(fold.isna().sum())
    if missing:
        log.warning("probe fold protocol: %d labelled clip(s) have no fold and are left out", missing)
    rows = labelled[fold.notna().to_numpy()]
    f = t["fold"].iloc[rows].astype(int).to_numpy()
    empty = np.zeros(0, dtype=np.int64)
    return [Split(f"fold {k}", rows[f != k].astype(np.int64), empty, rows[f == k].astype(np.int64))
            for k in sorted(set(f))]


def _kfold_count(y: np.ndarray, units: np.ndarray, unit: str, config: ProbeConfig, notes: list) -> int:
    """The number of k-fold splits: ``n_splits``, lowered (with a note) to what the classes allow."""
    per_class = {lab: len(set(units[y == lab])) for lab in sorted(set(y))}
    n_units = len(set(units))
    sizes = {lab: n for lab, n in per_class.items() if n >= 2}
    if n_units < 2 or not sizes:
        raise Tile2AudioError(
            f"probe kfold: every class has a single labelled {unit[:-1]} ({n_units} in all), so no class "
            "can be both trained on and tested; add clips, or give a split column (probe.protocol=split)"
        )
    singles = sorted(set(per_class) - set(sizes))
    if singles:
        notes.append(f"class(es) {', '.join(map(repr, singles[:5]))} have a single labelled {unit[:-1]}: "
                     "they are never in the training side when tested")
    small = min(sizes, key=sizes.get)
    k = min(config.n_splits, n_units, sizes[small])
    if k < config.n_splits:
        why = (f"there are only {n_units} labelled {unit}" if n_units == k
               else f"class {small!r} has only {sizes[small]} labelled {unit}")
        notes.append(f"probe.n_splits={config.n_splits} lowered to {k}: {why}")
    return k


def _kfold_protocol(t: pd.DataFrame, labelled: np.ndarray, config: ProbeConfig, notes: list) -> list[Split]:
    """Stratified (grouped when groups exist) k-fold over the labelled clips."""
    y = t["label"].to_numpy()[labelled]
    grouped = bool((t["group"].iloc[labelled] != "").any())
    groups = _groups(t.iloc[labelled])
    units = groups if grouped else t["clip_id"].to_numpy()[labelled]
    k = _kfold_count(y, units, "groups" if grouped else "clips", config, notes)
    if grouped:
        cv = StratifiedGroupKFold(k, shuffle=True, random_state=config.seed)
    else:
        cv = StratifiedKFold(k, shuffle=True, random_state=config.seed)
    empty = np.zeros(0, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*least populated class.*")
        parts = list(cv.split(np.zeros(len(y)), y, groups if grouped else None))
    return [Split(f"kfold {i + 1}/{k}", labelled[tr].astype(np.int64), empty,
                  labelled[te].astype(np.int64)) for i, (tr, te) in enumerate(parts)]


def _inner_valid(t: pd.DataFrame, split: Split, seed: int) -> Split:
    """Hold out a stratified, grouped fifth of the training clips as validation."""
    train = split.train
    groups = _groups(t.iloc[train])
    y = t["label"].to_numpy()[train]
    # scikit-learn refuses more folds than the largest class has members.
    n_inner = min(INNER_FOLDS, len(set(groups)), max(np.unique(y, return_counts=True)[1], default=0))
    if n_inner < 2 or len(set(y)) < 2:
        log.warning("%s: too few training clips for a validation hold-out; C falls back to 1.0", split.name)
        return split
    cv = StratifiedGroupKFold(n_inner, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*least populated class.*")
        tr, va = next(cv.split(np.zeros(len(y)), y, groups))
    return Split(split.name, train[tr], train[va], split.test)


def make_splits(clips: pd.DataFrame, config: ProbeConfig = ProbeConfig(), notes: list | None = None) -> list[Split]:
    """Build the leak-free splits of a clip table (see the module docstring).

    k-fold lowers ``n_splits`` to the number of labelled clips (groups when grouped) of
    the smallest class that has at least two, and to the number of clips (groups) in
    all, with a warning; a class of a single clip is kept, with a warning (it is never
    on the training side when tested).

    Parameters
    ----------
    clips : DataFrame, one row per clip
        Columns ``clip_id``, ``label`` and optionally ``split``, ``fold``, ``group``.
    config : ProbeConfig
        ``protocol``, ``n_splits`` and ``seed`` are used.
    notes : list, optional
        Receives the warnings (also logged) as strings, e.g. for probe.json.

    Returns
    -------
    list of Split
        Row positions into ``clips``. Every split has a validation set (given by the
        ``split`` column, or held out from the training clips) unless the training side
        is too small to hold one out. Each split has passed :func:`check_no_leak`.
    """
    t = _table(clips)
    labelled = np.flatnonzero(t["label"].to_numpy() != "")
    if len(labelled) == 0:
        raise Tile2AudioError("no clip has a label: probes need labels (the label column is empty)")
    classes = sorted(set(t["label"].to_numpy()[labelled]))
    if len(classes) < 2:
        raise Tile2AudioError(f"probes need at least two classes; every labelled clip has the label {classes[0]!r}")
    protocol = resolve_protocol(t, config.protocol)
    new_notes: list = []
    if protocol == "split":
        outer = _split_protocol(t, labelled)
    elif protocol == "fold":
        outer = _fold_protocol(t, labelled)
    else:
        outer = _kfold_protocol(t, labelled, config, new_notes)
    for note in new_notes:
        log.warning("probes: %s", note)
    if notes is not None:
        notes += new_notes
    splits = [s if len(s.valid) else _inner_valid(t, s, config.seed) for s in outer]
    for s in splits:
        check_sides(t, s)
        check_no_leak(t, s)
    return splits


def check_sides(clips: pd.DataFrame, split: Split, why: str = "") -> None:
    """Raise unless a split has test clips and training clips of at least two classes.

    Parameters
    ----------
    clips : DataFrame with ``label``; ``split`` indexes its rows
    split : Split
    why : str
        Appended to the message (what emptied the split).
    """
    if len(split.train) == 0 or len(split.test) == 0:
        raise Tile2AudioError(f"{split.name}: empty training or test side "
                              f"({len(split.train)} / {len(split.test)} clips){why}")
    fit_classes = sorted(set(text_column(clips, "label")[split.fit]) - {""})
    if len(fit_classes) < 2:
        raise Tile2AudioError(f"{split.name}: every training clip has the label {fit_classes[0]!r}, so no "
                              f"classifier can be fitted{why or ' (too few labelled clips or groups of the other classes)'}")


def check_no_leak(clips: pd.DataFrame, split: Split) -> None:
    """Raise if a clip id or a non-empty group is on both the fitting and the test side.

    Parameters
    ----------
    clips : DataFrame with ``clip_id`` and optionally ``group``
    split : Split whose row positions index ``clips``

    Raises
    ------
    Tile2AudioError
        Naming the split and a few of the offending clips or groups.
    """
    ids = clips["clip_id"].astype(str).to_numpy()
    fit, test = split.fit, split.test
    if len(fit) and (fit.max() >= len(ids) or fit.min() < 0) or len(test) and (test.max() >= len(ids) or test.min() < 0):
        raise Tile2AudioError(f"{split.name}: row positions out of range for a table of {len(ids)} clips")
    both = sorted(set(ids[fit]) & set(ids[test]))
    if both:
        raise Tile2AudioError(
            f"leak in {split.name}: {len(both)} clip(s) on both the training and the test side, "
            f"e.g. {', '.join(both[:5])}"
        )
    if "group" in clips.columns:
        g = text_column(clips, "group")
        shared = sorted((set(g[fit]) & set(g[test])) - {""})
        if shared:
            raise Tile2AudioError(
                f"leak in {split.name}: {len(shared)} group(s) on both the training and the test side, "
                f"e.g. {', '.join(shared[:5])}; clips of one group (artist, session, recording) must stay together"
            )


# --------------------------------------------------------------------------- models


class ProbeData(NamedTuple):
    """Features of one entry aligned to the reference clip table.

    ``X`` (n_rows, D) feature rows (clips, or tiles); ``owner`` (n_rows,) the reference
    clip row of each; ``y`` (n_clips,) label code of each reference clip (-1: none);
    ``n_classes`` the number of label codes.
    """

    X: np.ndarray
    owner: np.ndarray
    y: np.ndarray
    n_classes: int


def _model(probe: str, c: float, knn_k: int, n_fit: int, seed: int):
    """A standardise-then-classify pipeline for one probe."""
    if probe == "logreg":
        clf = LogisticRegression(C=c, max_iter=MAX_ITER, solver="lbfgs", random_state=seed)
    elif probe == "svm":
        clf = LinearSVC(C=c, max_iter=MAX_ITER, random_state=seed)
    elif probe in ("knn_cosine", "knn_euclidean"):
        metric = probe.split("_")[1]
        clf = KNeighborsClassifier(n_neighbors=max(1, min(knn_k, n_fit)), metric=metric)
    else:
        raise Tile2AudioError(f"unknown probe {probe!r}")
    return make_pipeline(StandardScaler(), clf)


def _scores(model, X: np.ndarray, n_classes: int) -> np.ndarray:
    """Class scores (n, n_classes): probabilities, or SVM decision values."""
    clf = model[-1]
    if hasattr(clf, "predict_proba"):
        s, fill = model.predict_proba(X), 0.0
    else:
        s, fill = model.decision_function(X), -np.inf
        if s.ndim == 1:
            s = np.stack([-s, s], axis=1)
    out = np.full((len(X), n_classes), fill, dtype=np.float64)
    out[:, clf.classes_] = s
    return out


def _clip_predictions(scores: np.ndarray, owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Average scores over the rows (tiles) of each clip; returns (clip rows, predicted codes)."""
    clips, inv = np.unique(owner, return_inverse=True)
    sums = np.zeros((len(clips), scores.shape[1]))
    np.add.at(sums, inv, np.where(np.isfinite(scores), scores, -1e30))
    return clips, np.argmax(sums / np.bincount(inv)[:, None], axis=1)


def _fit_predict(probe, c, data, fit_clips, eval_clips, config) -> tuple[np.ndarray, np.ndarray]:
    """Fit on the rows of ``fit_clips``; predicted codes for ``eval_clips`` (sorted)."""
    X, owner, y, n_classes = data
    fit = np.isin(owner, fit_clips)
    ev = np.isin(owner, eval_clips)
    if len(np.unique(y[owner[fit]])) < 2:
        raise Tile2AudioError("a probe's training side has a single class; cannot fit a classifier")
    model = _model(probe, c, config.knn_k, int(fit.sum()), config.seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(X[fit], y[owner[fit]])
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        log.info("%s with C=%g did not fully converge in %d iterations", probe, c, MAX_ITER)
    clips, pred = _clip_predictions(_scores(model, X[ev], n_classes), owner[ev])
    if len(clips) != len(np.unique(eval_clips)):
        raise Tile2AudioError("some evaluation clips have no feature rows (no tiles)")
    return clips, pred


def choose_c(probe: str, data, split: Split, config: ProbeConfig) -> float:
    """Pick C from ``config.c_grid`` by macro-F1 on the split's validation clips only.

    Parameters
    ----------
    probe : ``logreg`` or ``svm``
    data : ProbeData
        Features aligned to the reference clip table.
    split : Split; only ``train`` (fitting) and ``valid`` (scoring) are used
    config : ProbeConfig

    Returns
    -------
    float
        ``config.fixed_c`` when set; 1.0 when the split has no validation clips.
    """
    if config.fixed_c is not None:
        return float(config.fixed_c)
    if len(split.valid) == 0:
        return 1.0
    y = data.y
    best_c, best_f1 = None, -1.0
    for c in sorted(config.c_grid):
        clips, pred = _fit_predict(probe, c, data, split.train, split.valid, config)
        f1 = f1_score(y[clips], pred, average="macro", zero_division=0)
        if f1 > best_f1:
            best_c, best_f1 = float(c), f1
    return best_c


# --------------------------------------------------------------------------- metrics


def _fold_metrics(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict:
    """Accuracy, macro-F1, per-class F1 (NaN where a class is absent) and confusion of one fold."""
    codes = np.arange(n_classes)
    per_class = f1_score(y_true, y_pred, labels=codes, average=None, zero_division=0)
    absent = ~np.isin(codes, np.union1d(y_true, y_pred))
    per_class = np.where(absent, np.nan, per_class)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "per_class": per_class,
        "confusion": confusion_matrix(y_true, y_pred, labels=codes),
    }


def _summarise(folds: list[dict], labels: list[str]) -> dict:
    """Mean and std over folds, per-class F1 means and the summed confusion matrix."""
    acc = np.array([f["accuracy"] for f in folds])
    f1 = np.array([f["macro_f1"] for f in folds])
    per = np.vstack([f["per_class"] for f in folds])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        per_mean = np.nanmean(per, axis=0)
    return {
        "accuracy": float(acc.mean()),
        "accuracy_std": float(acc.std()),
        "macro_f1": float(f1.mean()),
        "macro_f1_std": float(f1.std()),
        "fold_accuracy": acc.tolist(),
        "fold_macro_f1": f1.tolist(),
        "per_class_f1": {lab: (None if np.isnan(v) else float(v)) for lab, v in zip(labels, per_mean)},
        "confusion": np.sum([f["confusion"] for f in folds], axis=0).astype(int).tolist(),
    }


# --------------------------------------------------------------------------- entries


def _aligned(entry, ref_ids: np.ndarray, needed: np.ndarray, level: str, pooling: str):
    """Feature rows of ``entry`` and the reference clip row of each: (X, owner)."""
    pos = {cid: i for i, cid in enumerate(entry.clips["clip_id"].astype(str))}
    missing = [ref_ids[j] for j in needed if ref_ids[j] not in pos]
    if missing:
        raise Tile2AudioError(
            f"embedding set {entry.name!r} lacks {len(missing)} clip(s) of the probe splits, "
            f"e.g. {', '.join(missing[:5])}; embed every clip of the manifest first"
        )
    ref_of_entry = np.full(len(entry.clips), -1, dtype=np.int64)
    for j, cid in enumerate(ref_ids):
        if cid in pos:
            ref_of_entry[pos[cid]] = j
    if level == "tile":
        X, rows = entry.tile_matrix()
        owner = ref_of_entry[rows]
    else:
        X, owner = entry.pooled(pooling), ref_of_entry
    keep = np.isin(owner, needed)
    return np.asarray(X, dtype=np.float64)[keep], owner[keep]


def _non_finite_clips(X: np.ndarray, owner: np.ndarray) -> set:
    """Reference rows of clips with any non-finite feature value."""
    bad = ~np.isfinite(X).all(axis=1)
    return set(owner[bad].tolist())


def _drop(split: Split, bad: np.ndarray) -> Split:
    """The split without the rows in ``bad``."""
    f = lambda a: a[~np.isin(a, bad)]  # noqa: E731
    return Split(split.name, f(split.train), f(split.valid), f(split.test))


def _probe_names(config: ProbeConfig) -> list[str]:
    """The probes to run."""
    return ["logreg", "knn_cosine", "knn_euclidean"] + (["svm"] if config.svm else [])


def _evaluate(entry, probe, data, splits, labels, config, predicted=None) -> dict:
    """One row of the result table: one entry, one probe, over every split; fills ``predicted`` (row -> label)."""
    y = data.y
    folds, chosen = [], []
    for s in splits:
        c = choose_c(probe, data, s, config) if probe in PROBES_WITH_C else None
        chosen.append(c)
        clips, pred = _fit_predict(probe, c if c is not None else 1.0, data, s.fit, s.test, config)
        folds.append(_fold_metrics(y[clips], pred, len(labels)))
        if predicted is not None:
            predicted.update((int(j), labels[p]) for j, p in zip(clips, pred))
    row = {
        "name": entry.name,
        "kind": entry.kind,
        "label_free": entry.label_free_result,
        "probe": probe,
        "pooling": (entry.meta.get("pooling") or config.pooling) if config.level == "clip" else "tile-score-mean",
        "level": config.level,
        "dim": int(data.X.shape[1]),
        "n_folds": len(splits),
        "chosen_c": chosen if probe in PROBES_WITH_C else None,
    }
    row.update(_summarise(folds, labels))
    return row


def run_probes(entries: Sequence, config: ProbeConfig = ProbeConfig(), progress: bool = True) -> dict:
    """Evaluate every embedding set with every probe on the same splits.

    Parameters
    ----------
    entries : list of tile2audio.embed.EmbeddingSet
        The splits are built once from the first entry's clip table; the others are
        aligned to it on ``clip_id`` (an entry lacking a clip of the splits is an error).
        Labels are taken from the first entry.
    config : ProbeConfig
    progress : bool
        Show a tqdm bar over (entry, probe, fold).

    Returns
    -------
    dict
        ``protocol``, ``n_folds``, ``labels`` (class order of confusion matrices),
        ``n_clips`` (clips in the splits), ``dropped_clips`` (non-finite features),
        ``splits`` (name and sizes of each), ``config``, ``notes`` (the warnings of
        :func:`make_splits`, e.g. a lowered ``n_splits``) and ``rows``: one dict per
        (entry, probe) with ``name, kind, label_free, probe, pooling, level, dim,
        n_folds, chosen_c (list per fold, or None for k-NN), accuracy, accuracy_std,
        macro_f1, macro_f1_std, fold_accuracy, fold_macro_f1, per_class_f1 (dict),
        confusion (list of lists)``; and ``predictions``: entry name -> {clip_id: the
        logistic probe's predicted label} for every test clip (each clip is a test clip
        once across folds), what the report's confusion listening and projector read.
    """
    if not entries:
        raise Tile2AudioError("run_probes needs at least one embedding set")
    ref = _table(entries[0].clips)
    ref_ids = ref["clip_id"].to_numpy()
    notes: list = []
    splits = make_splits(ref, config, notes)
    needed = np.unique(np.concatenate([np.concatenate([s.fit, s.test]) for s in splits]))
    labels = sorted(set(ref["label"].to_numpy()[needed]))
    code = {lab: i for i, lab in enumerate(labels)}
    y = np.array([code.get(lab, -1) for lab in ref["label"]], dtype=np.int64)

    datasets, bad = [], set()
    for e in entries:
        X, owner = _aligned(e, ref_ids, needed, config.level, config.pooling)
        if X.shape[1] == 0:
            raise Tile2AudioError(f"embedding set {e.name!r} has features of dimension 0; embed its clips again")
        datasets.append(ProbeData(X, owner, y, len(labels)))
        bad |= _non_finite_clips(X, owner)
    if bad:
        bad_ids = sorted(ref_ids[list(bad)])
        log.warning("dropping %d clip(s) with non-finite features from every entry: %s",
                    len(bad_ids), ", ".join(bad_ids[:10]) + (" ..." if len(bad_ids) > 10 else ""))
        splits = [_drop(s, np.array(sorted(bad))) for s in splits]
        why = (f" after dropping the {len(bad)} of {len(needed)} clips whose features are NaN or inf in "
               + ", ".join(repr(e.name) for e, d in zip(entries, datasets) if _non_finite_clips(d.X, d.owner)))
        for s in splits:
            check_sides(ref, s, why)

    probes = _probe_names(config)
    rows, predictions = [], {}
    with tqdm(total=len(entries) * len(probes), desc="probes", disable=not show_progress(progress)) as bar:
        for e, data in zip(entries, datasets):
            with threadpool_limits(1 if data.X.size < SMALL_PROBLEM else None):
                for probe in probes:
                    bar.set_postfix_str(f"{e.name}:{probe}")
                    predicted = predictions.setdefault(e.name, {}) if probe == "logreg" else None
                    rows.append(_evaluate(e, probe, data, splits, labels, config, predicted))
                    bar.update()
    return {
        "protocol": resolve_protocol(ref, config.protocol),
        "n_folds": len(splits),
        "labels": labels,
        "n_clips": int(len(needed) - len(bad)),
        "dropped_clips": sorted(ref_ids[list(bad)].tolist()) if bad else [],
        "splits": [{"name": s.name, "train": len(s.train), "valid": len(s.valid), "test": len(s.test)}
                   for s in splits],
        "config": {"pooling": config.pooling, "level": config.level, "fixed_c": config.fixed_c,
                   "c_grid": list(config.c_grid), "knn_k": config.knn_k, "seed": config.seed},
        "notes": notes,
        "rows": rows,
        "predictions": {name: {str(ref_ids[j]): lab for j, lab in sorted(p.items())} for name, p in predictions.items()},
    }


def probe_directories(paths: Sequence, out_dir, config: ProbeConfig = ProbeConfig(), progress: bool = True) -> dict:
    """``tile2audio probe``: probe embedding directories on the same splits; write probe.json.

    Parameters
    ----------
    paths : sequence of paths
        Embedding directories written by ``tile2audio embed``; the first defines the clips.
    out_dir : path
        Receives ``probe.json`` (the :func:`run_probes` result).
    """
    from pathlib import Path

    from . import atomic
    from .embed import load_embeddings

    atomic.ensure_dir(out_dir, "probe output folder")  # before the work, not after it
    result = run_probes([load_embeddings(p) for p in paths], config, progress=progress)
    atomic.write_json(Path(out_dir) / "probe.json", result)
    return result
