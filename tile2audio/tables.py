"""The report's tables as plain structures, read by both renderers.

:func:`probe_section`, :func:`per_class_section` and :func:`cluster_section` turn a
report dict (the content of report.json) into a section: a title, an intro paragraph,
a table of cell strings and the notes under it. ``report.md``
(:func:`tile2audio.report.render_markdown`) and ``report.html``
(:mod:`tile2audio.page`) print the same sections, so neither shows a figure the other
lacks. Text may hold Markdown ``**bold**``; the page turns it into ``<b>``.

A section is a dict: ``title`` (str), ``intro`` (str or None), ``header`` (list of
str, empty for a section without a table), ``rows`` (list of lists of str), ``bold``
(list of [row, column] cells to show bold), ``notes`` (list of paragraphs, each a list
of lines; a line starting with ``- `` is a bullet).
"""

from __future__ import annotations

PROBE_TITLES = {"logreg": "logistic regression", "knn_cosine": "k-NN (cosine)",
                "knn_euclidean": "k-NN (Euclidean)", "svm": "linear SVM"}


def pm(mean, std) -> str:
    """``0.812 ± 0.021`` (or an em dash when missing)."""
    if mean is None:
        return "—"
    return f"{mean:.3f} ± {std:.3f}" if std is not None else f"{mean:.3f}"


def num(v, fmt: str = "{:.3f}") -> str:
    """A number formatted, or an em dash."""
    return "—" if v is None else fmt.format(v)


def entry_name(row: dict) -> str:
    """Entry name with a dagger for label-using entries."""
    return f"{row['name']} †" if not row.get("label_free", True) or row.get("kind") == "supervised" else row["name"]


def _section(title: str, intro=None, header=(), rows=(), bold=(), notes=()) -> dict:
    """A section dict (see the module docstring)."""
    return {"title": title, "intro": intro, "header": list(header), "rows": [list(r) for r in rows],
            "bold": [list(b) for b in bold], "notes": [list(n) for n in notes]}


def probe_section(report: dict) -> dict:
    """The probe table (trained runs and baselines side by side) and its notes."""
    rows = report["rows"]
    if not rows:
        return _section("Probes", report.get("probe_note") or "No probe results.")
    order = {p: i for i, p in enumerate(PROBE_TITLES)}
    best = {}
    for r in rows:
        if r.get("label_free", True) and r.get("macro_f1") is not None:
            best[r["probe"]] = max(best.get(r["probe"], -1.0), r["macro_f1"])
    intro = (f"Protocol **{report['protocol']}**, {report['n_folds']} fold(s), {report.get('n_clips')} labelled "
             f"clips, {len(report['labels'])} classes. Mean ± std over folds. Bold: best label-free macro-F1 "
             "per probe.")
    table, bold = [], []
    for i, r in enumerate(sorted(rows, key=lambda r: (order.get(r["probe"], 99), rows.index(r)))):
        if r.get("label_free", True) and r["macro_f1"] == best.get(r["probe"]):
            bold.append((i, 5))
        table.append([entry_name(r), r["kind"], PROBE_TITLES.get(r["probe"], r["probe"]), r.get("pooling", ""),
                      pm(r["accuracy"], r.get("accuracy_std")), pm(r["macro_f1"], r.get("macro_f1_std"))])
    notes = []
    if any(entry_name(r).endswith("†") for r in rows):
        notes.append(["† trained with labels (supervised triplets): not label-free, shown as a reference."])
    if report.get("dropped_clips"):
        notes.append([f"{len(report['dropped_clips'])} clip(s) with non-finite features were left out of "
                      "every entry's evaluation."])
    if report.get("probe_notes"):
        notes.append([f"- {n}" for n in report["probe_notes"]])
    return _section("Probes", intro, ["name", "kind", "probe", "pooling", "accuracy", "macro-F1"], table, bold, notes)


def per_class_section(report: dict) -> dict | None:
    """Per-class F1 of the logistic-regression probe, one column per entry (None without probes)."""
    rows = [r for r in report["rows"] if r["probe"] == "logreg"]
    if not rows:
        return None
    table = [[lab] + [num(r["per_class_f1"].get(lab)) for r in rows] for lab in report["labels"]]
    return _section("Per-class F1 (logistic regression)", None, ["class"] + [entry_name(r) for r in rows], table)


def cluster_section(report: dict) -> dict | None:
    """Chosen k per criterion and label agreement at k = number of classes (None without clusters)."""
    entries = (report.get("cluster") or {}).get("entries") or []
    if not entries:
        return None
    n_classes = next((r.get("n_classes") for r in entries if r.get("n_classes")), None)
    intro = (f"k picked by each criterion, and agreement with the labels at k = number of classes "
             f"({n_classes or 'no labels'}); matched acc. is the accuracy after the best one-to-one "
             "(Hungarian) matching of clusters to classes.")
    free = {e["name"]: e["label_free"] for e in report.get("entries", [])}
    table = []
    for r in entries:
        c, at = r["chosen"], r.get("at_n_classes") or {}
        row = {"name": r.get("name", ""), "kind": r.get("kind", ""), "label_free": free.get(r.get("name"), True)}
        table.append([entry_name(row), row["kind"], r.get("level", ""), r.get("n", ""),
                      *[num(c.get(k), "{}") for k in ("elbow", "silhouette", "calinski_harabasz",
                                                      "davies_bouldin", "gap")],
                      *[num(at.get(k)) for k in ("nmi", "ari", "purity", "accuracy")]])
    header = ["name", "kind", "level", "points", "elbow", "silhouette", "Calinski-Harabasz",
              "Davies-Bouldin", "gap", "NMI", "ARI", "purity", "matched acc."]
    notes = sorted({f"{r.get('name', '')}: {n}" for r in entries for n in r.get("notes", [])})
    return _section("k-means cluster count", intro, header, table, notes=[[f"- {n}" for n in notes]] if notes else [])


def sections(report: dict) -> list[dict]:
    """The table sections of a report, in the order both renderers print them."""
    return [s for s in (probe_section(report), per_class_section(report), cluster_section(report)) if s]
