"""Benchmark report: probe tables, k-means analysis and figures, as JSON then Markdown.

``report.json`` is the machine-readable source; ``report.md`` is rendered from it by
:func:`render_markdown` and ``report.html`` by :func:`tile2audio.page.render_page`, both
printing the sections of :mod:`tile2audio.tables` (so a report can be re-rendered from
its JSON alone). Its ``listen`` part (:mod:`tile2audio.listen`: clusters and confusions
to listen to, audio excerpts in ``audio/``) also feeds the TensorBoard projector log
(:mod:`tile2audio.projector`, ``projector/``). Figures
are PNGs beside them, drawn with matplotlib's Agg backend:

``confusion.png``
    the logistic-regression confusion matrix (summed over folds) of the best trained
    entry (highest macro-F1; the best entry of any kind when none is ``trained``);
``embedding_map.png``
    a 2-D map of that entry's clip embeddings coloured by label: UMAP when umap-learn
    is installed, t-SNE otherwise (the title says which);
``embedding_map_random.png``
    the same map of its random-weight twin (the run's initial weights), shown beside
    it so a reader sees what training changed;
``kmeans_curves.png``
    elbow and silhouette curves of that entry (see :mod:`tile2audio.clusters`).

Entries whose kind is ``supervised`` (or whose ``label_free`` is false) are marked in
every table: they used labels during training, so they are a reference, not a
label-free result.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from . import atomic
from .clusters import cluster_entries
from .config import ClusterConfig, ProbeConfig, ReportConfig, to_dict
from .errors import Tile2AudioError
from .listen import listening_data, map_projection
from .page import write_page
from .plots import plot_confusion, plot_curves, plot_embedding_map
from .probes import run_probes
from .projector import write_projector
from .tables import PROBE_TITLES, sections  # noqa: F401  (PROBE_TITLES: kept importable here)

log = logging.getLogger(__name__)



# --------------------------------------------------------------------------- choice


def best_entry_name(rows: list[dict]) -> str | None:
    """Name of the entry whose logistic-regression macro-F1 is highest, trained first.

    Parameters
    ----------
    rows : probe rows (``name, kind, probe, macro_f1, accuracy``)

    Returns
    -------
    str or None
        Among ``trained`` rows if any, else among every row; None without logreg rows.
    """
    logreg = [r for r in rows if r["probe"] == "logreg"]
    pool = [r for r in logreg if r["kind"] == "trained"] or logreg
    if not pool:
        return None
    return max(pool, key=lambda r: (r["macro_f1"], r["accuracy"]))["name"]


def _entry_by_name(entries: Sequence, name: str | None):
    """The entry called ``name`` (the first entry when there is none)."""
    for e in entries:
        if e.name == name:
            return e
    return entries[0]


# --------------------------------------------------------------------------- figures


def _clean(obj):
    """JSON-safe copy: numpy to Python, NaN / inf to None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _cluster_all(entries, config: ClusterConfig, figure_entry, out_dir: Path) -> dict:
    """Cluster sweep of every entry; the figure entry also draws its curves."""
    return cluster_entries(entries, config, out_dir, figure_entry=figure_entry)


def _wrap_cluster(cluster_result: dict, figure_name: str) -> dict:
    """Accept a single sweep result or the ``{"entries": [...]}`` form."""
    if "entries" in cluster_result:
        return cluster_result
    return {"figure_entry": cluster_result.get("name", figure_name), "entries": [cluster_result]}


def _random_twin(best, entries):
    """The random-weight entry of ``best``'s run (else the first random entry), or None."""
    randoms = [e for e in entries if e.kind == "random" and e is not best]
    run = best.meta.get("run_dir")
    same = [e for e in randoms if run and e.meta.get("run_dir") == run]
    return (same or randoms or [None])[0]


def _twin_map(best, entries, probe_config, out_dir: Path) -> list[dict]:
    """The random-weight twin's map, drawn like the best entry's (same pooling and seed)."""
    twin = _random_twin(best, entries)
    if twin is None or best.kind == "random":
        return []
    try:
        _, method = plot_embedding_map(twin.pooled(probe_config.pooling), twin.clips["label"].to_numpy(),
                                       out_dir / "embedding_map_random.png", twin.name, probe_config.pooling,
                                       probe_config.seed)
    except Tile2AudioError as exc:
        log.warning("random-weight embedding map skipped: %s", exc)
        return []
    return [{"file": "embedding_map_random.png", "kind": "map_random", "method": method,
             "caption": f"{method} map of {twin.name} (the same encoder with its initial random weights): "
                        "what training changed."}]


def _figures(probe_result, cluster, best, probe_config, out_dir, entries=(), projection=None) -> list[dict]:
    """Draw the confusion matrix, the embedding maps (trained and random twin) and the k-means curves."""
    figures = []
    row = next((r for r in probe_result["rows"] if r["name"] == best.name and r["probe"] == "logreg"), None)
    if row is not None:
        plot_confusion(row["confusion"], probe_result["labels"], out_dir / "confusion.png",
                       f"{best.name}: logistic regression, summed over {row['n_folds']} fold(s)")
        figures.append({"file": "confusion.png", "kind": "confusion",
                        "caption": f"Confusion matrix of {best.name} (logistic regression, "
                                   f"{probe_result['protocol']} protocol, counts summed over folds)."})
    try:
        _, method = plot_embedding_map(best.pooled(probe_config.pooling), best.clips["label"].to_numpy(),
                                       out_dir / "embedding_map.png", best.name, probe_config.pooling,
                                       probe_config.seed, projection)
        figures.append({"file": "embedding_map.png", "kind": "map", "method": method,
                        "caption": f"{method} map of {best.name} clip embeddings, coloured by label."})
    except Tile2AudioError as exc:
        log.warning("embedding map skipped: %s", exc)
    figures += _twin_map(best, entries, probe_config, out_dir)
    fig_res = next((r for r in cluster["entries"] if r.get("name") == cluster["figure_entry"]), None)
    if fig_res is None and cluster["entries"]:
        fig_res = cluster["entries"][0]
    if fig_res is not None:
        if not (out_dir / "kmeans_curves.png").is_file() or fig_res.get("figure") != "kmeans_curves.png":
            plot_curves(fig_res, out_dir / "kmeans_curves.png", f"k-means on {fig_res.get('name', '')}")
        figures.append({"file": "kmeans_curves.png", "kind": "kmeans",
                        "caption": f"k-means elbow and silhouette curves of {fig_res.get('name', '')}."})
    return figures


def _probe_or_skip(entries, config: ProbeConfig, progress: bool) -> dict:
    """Run the probes, or an empty result with a note when the clips have fewer than two classes."""
    classes = set(entries[0].clips["label"].fillna("").astype(str)) - {""}
    if len(classes) < 2:
        why = "no labels" if not classes else "a single class"
        log.warning("%s: the report has no probe section", why)
        return {"protocol": None, "n_folds": 0, "labels": sorted(classes), "n_clips": 0, "rows": [],
                "note": f"{why}: probes skipped (k-means analysis only)"}
    return run_probes(entries, config, progress=progress)


def make_report(
    entries: Sequence,
    out_dir: str | Path,
    probe_config: ProbeConfig = ProbeConfig(),
    cluster_config: ClusterConfig = ClusterConfig(),
    title: str = "tile2audio report",
    probe_result: dict | None = None,
    cluster_result: dict | None = None,
    extra: dict | None = None,
    progress: bool = True,
    report_config: ReportConfig = ReportConfig(),
) -> Path:
    """Probe every entry, cluster them, draw the figures, write report.json, report.md and report.html.

    Parameters
    ----------
    entries : list of tile2audio.embed.EmbeddingSet
        Trained runs and baselines (``random``, ``mfcc``); the first entry's clip table
        defines the probe splits (see :func:`tile2audio.probes.run_probes`).
    out_dir : folder for report.json, report.md, cluster.json and the PNGs
    probe_config, cluster_config : settings used when the results are not given
    title : report title
    probe_result : a :func:`run_probes` result to reuse instead of probing again
    cluster_result : a :func:`~tile2audio.clusters.cluster_sweep` /
        :func:`~tile2audio.clusters.cluster_embeddings` result, or
        ``{"figure_entry": name, "entries": [result, ...]}``; None clusters every entry
    extra : dict, e.g. training time or the resolved config; copied into the report
    progress : show progress bars
    report_config : ReportConfig: report.html with its audio excerpts (:mod:`tile2audio.page`,
        :mod:`tile2audio.listen`) and the projector log (:mod:`tile2audio.projector`), each on by default

    Returns
    -------
    Path
        ``out_dir/report.md``.
    """
    if not entries:
        raise Tile2AudioError("make_report needs at least one embedding set")
    out_dir = Path(out_dir)
    atomic.ensure_dir(out_dir, "report folder")
    if probe_result is None:
        probe_result = _probe_or_skip(entries, probe_config, progress)
    best = _entry_by_name(entries, best_entry_name(probe_result["rows"]))
    if cluster_result is None:
        cluster = _cluster_all(entries, cluster_config, best, out_dir)
    else:
        cluster = _wrap_cluster(cluster_result, best.name)
    listen = _listen(best, _random_twin(best, entries), probe_result, cluster, out_dir,
                     (probe_config, cluster_config, report_config))
    figures = _figures(probe_result, cluster, best, probe_config, out_dir, entries, map_projection(listen))
    report = _clean({
        "title": title,
        "protocol": probe_result["protocol"],
        "n_folds": probe_result["n_folds"],
        "labels": probe_result["labels"],
        "n_clips": probe_result.get("n_clips"),
        "dropped_clips": probe_result.get("dropped_clips", []),
        "splits": probe_result.get("splits", []),
        "probe_note": probe_result.get("note"),
        "probe_notes": probe_result.get("notes", []),
        "best_entry": best.name,
        "entries": [{"name": e.name, "kind": e.kind, "label_free": e.label_free_result,
                     "n_clips": int(len(e.clips))} for e in entries],
        "rows": probe_result["rows"],
        "cluster": cluster,
        "figures": figures,
        "config": {"probe": to_dict(probe_config), "cluster": to_dict(cluster_config), "report": to_dict(report_config)},
        "extra": extra or {},
        "listen": listen,
    })
    atomic.write_json(out_dir / "report.json", report)
    md = out_dir / "report.md"
    atomic.write_text(md, render_markdown(report))
    if report_config.html:
        write_page(report, out_dir)
    if report_config.projector and listen:
        write_projector(report, [best, _random_twin(best, entries)], out_dir / "projector", probe_config.pooling)
    return md


def _listen(best, twin, probe_result, cluster, out_dir, configs) -> dict | None:
    """The listen part of the report data, or None (with a warning) when it cannot be made."""
    try:
        return listening_data(best, twin, probe_result, cluster, out_dir, *configs)
    except Tile2AudioError as exc:
        log.warning("listening section and projector skipped: %s", exc)
        return None


# --------------------------------------------------------------------------- markdown

#: Characters with a meaning in Markdown (GitHub flavour) inline text and table cells.
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|~&#])")


def escape_markdown(text) -> str:
    """A label, clip id or name as literal one-line Markdown text (table cells included).

    Control characters (a newline, tab, carriage return ...) are shown as their Unicode
    control pictures (``\\n`` as U+240A ␊), so a label stays on one line and on one
    table row, and Markdown's punctuation is backslash-escaped. The HTML page escapes
    the same values with :func:`html.escape` instead.

    Parameters
    ----------
    text : str, or any value (converted with ``str``)

    Returns
    -------
    str
    """
    shown = "".join(chr(0x2400 + ord(c)) if ord(c) < 32 else "\u2421" if c == "\x7f" else c for c in str(text))
    return _MD_SPECIAL.sub(lambda m: m[1] if _intraword(m) else "\\" + m[1], shown)


def _intraword(m: re.Match) -> bool:
    """True for an ``_`` between two letters or digits (``class_2``): no emphasis there, left as is."""
    s, i = m.string, m.start()
    return m[1] == "_" and 0 < i < len(s) - 1 and s[i - 1].isalnum() and s[i + 1].isalnum()


def _md_section(sec: dict) -> list[str]:
    """One :mod:`tile2audio.tables` section as Markdown lines."""
    lines = [f"## {sec['title']}", ""] + ([sec["intro"], ""] if sec["intro"] else [])
    if sec["header"]:
        bold = {tuple(b) for b in sec["bold"]}
        # Cells hold labels and names: escaped here, so a newline or a | cannot break the table.
        rows = [[f"**{escape_markdown(c)}**" if (i, j) in bold else escape_markdown(c) for j, c in enumerate(r)]
                for i, r in enumerate(sec["rows"])]
        lines += _table([escape_markdown(h) for h in sec["header"]], rows)
        for note in sec["notes"]:
            lines += [""] + [escape_markdown(n) if not n.startswith("- ") else "- " + escape_markdown(n[2:])
                             for n in note]
        lines += [""]
    return lines


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Markdown table lines."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return out + ["| " + " | ".join(re.sub(r"(?<!\\)\|", r"\\|", str(c)) for c in r) + " |" for r in rows]


def _extra_section(report: dict) -> list[str]:
    """The ``extra`` mapping (run facts, the resolved config) as a YAML block."""
    import yaml

    extra = report.get("extra") or {}
    if not extra:
        return []
    text = yaml.safe_dump(extra, sort_keys=False, default_flow_style=False, allow_unicode=True).rstrip()
    return ["## Run details", "", "```yaml", text, "```", ""]


def _figure_lines(figures: list[dict]) -> list[str]:
    """Figures one after another; the two embedding maps side by side in a table."""
    twin = next((f for f in figures if f["kind"] == "map_random"), None)
    lines = ["## Figures", ""]
    for f in figures:
        if f["kind"] == "map_random" and any(g["kind"] == "map" for g in figures):
            continue
        if f["kind"] == "map" and twin is not None:
            cap, twin_cap = escape_markdown(f["caption"]), escape_markdown(twin["caption"])
            lines += _table(["trained", "random weights (before training)"],
                            [[f"![{cap}]({f['file']})", f"![{twin_cap}]({twin['file']})"]])
            lines += ["", f"*{cap} Beside it: {twin_cap}*", ""]
            continue
        cap = escape_markdown(f["caption"])
        lines += [f"![{cap}]({f['file']})", "", f"*{cap}*", ""]
    return lines


def render_markdown(report: dict) -> str:
    """Render a report dict (the content of report.json) as Markdown.

    Parameters
    ----------
    report : dict written by :func:`make_report`

    Returns
    -------
    str
    """
    lines = [f"# {escape_markdown(report['title'])}", "",
             "Entries: " + ", ".join(f"{escape_markdown(e['name'])} ({e['kind']}"
                                     f"{'' if e['label_free'] else ', uses labels'})"
                                     for e in report.get("entries", [])) + ".", ""]
    for sec in sections(report):
        lines += _md_section(sec)
    if report.get("figures"):
        lines += _figure_lines(report["figures"])
    lines += _extra_section(report)
    return "\n".join(lines).rstrip() + "\n"
