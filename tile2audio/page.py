"""``report.html``: the report as one self-contained page that plays the clips.

:func:`render_page` reads the same report dict as :func:`tile2audio.report.render_markdown`
(the content of report.json): the tables of :mod:`tile2audio.tables` and the figures,
plus the ``listen`` part made by :mod:`tile2audio.listen`:

- **Listen to the clusters**: for k = the number of classes and the k the silhouette
  picks, each cluster's size, majority label, label purity and its clips nearest the
  centroid, each with a player, its label and its distance;
- **Listen to the confusions**: the largest off-diagonal cells of the logistic probe's
  confusion matrix, with clips of each (true and predicted label, a player);
- **Embedding map**: the projection of embedding_map.png as an SVG, coloured by label
  or by cluster; hovering a point shows its clip id, a click plays its excerpt.

The page is one file: the template (``tile2audio/templates/report.html``, package data)
holds the CSS and a small inline script, with no CDN, so it works offline. Audio and
images are linked by relative paths (``audio/*.ogg``, ``*.png``), so the report folder
can be zipped and sent. Every label, clip id and caption is escaped with
:func:`html.escape`; the map's data is JSON inside a ``<script type="application/json">``
with ``<`` escaped, so no clip id can end the script.
"""

from __future__ import annotations

import html
import json
import re
import string
from importlib import resources
from pathlib import Path

from . import atomic

TEMPLATE = "templates/report.html"


def _esc(value) -> str:
    """HTML-escaped text of any value."""
    return html.escape("" if value is None else str(value))


def _inline(text: str) -> str:
    """Escaped text with Markdown ``**bold**`` turned into ``<b>``."""
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", _esc(text))


def _table(header: list, rows: list, bold=()) -> str:
    """An HTML table of cell strings."""
    bold = {tuple(b) for b in bold}
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{'<b>' + _esc(c) + '</b>' if (i, j) in bold else _esc(c)}</td>"
                                    for j, c in enumerate(r)) + "</tr>" for i, r in enumerate(rows))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _section_html(sec: dict, anchor: str) -> str:
    """One :mod:`tile2audio.tables` section."""
    out = [f'<h2 id="{anchor}">{_esc(sec["title"])}</h2>']
    if sec["intro"]:
        out.append(f"<p>{_inline(sec['intro'])}</p>")
    if sec["header"]:
        out.append(_table(sec["header"], sec["rows"], sec["bold"]))
    for note in sec["notes"]:
        bullets = [n[2:] for n in note if n.startswith("- ")]
        if bullets:
            out.append("<ul>" + "".join(f"<li>{_inline(b)}</li>" for b in bullets) + "</ul>")
        else:
            out.append("<p class=\"note\">" + " ".join(_inline(n) for n in note) + "</p>")
    return "\n".join(out)


def _player(clip: dict) -> str:
    """An ``<audio>`` player of a clip's excerpt, or its note when there is none."""
    if clip.get("audio"):
        return f'<audio controls preload="metadata" src="{_esc(clip["audio"])}"></audio>'
    return f'<span class="missing">{_esc(clip.get("note") or "no audio excerpt")}</span>'


def _clip_html(clip: dict, detail: str) -> str:
    """A clip: id, detail (label and distance, or true / predicted), player."""
    return (f'<div class="clip"><span><code>{_esc(clip["clip_id"])}</code></span>'
            f'<span class="dist">{detail}</span>{_player(clip)}</div>')


def _clusters_html(listen: dict) -> str:
    """The cluster listening section."""
    out = ['<h2 id="listen-clusters">Listen to the clusters</h2>',
           f"<p>k-means on the clip embeddings of <b>{_esc(listen['entry'])}</b> (the k-means table's "
           "standardised features and seed). Each cluster lists the clips nearest its centroid "
           "(Euclidean distance in the standardised space); purity is the share of its labelled clips "
           "that carry the majority label.</p>"]
    if not listen["clusterings"]:
        out.append('<p class="note">No k-means solution to listen to (too few clips).</p>')
    for sol in listen["clusterings"]:
        out.append(f'<h3>k = {sol["k"]} ({_esc(", ".join(sol["why"]))})</h3><div class="clusters">')
        for c in sol["clusters"]:
            purity = "no labels" if c["purity"] is None else f"majority {_esc(c['majority'])}, purity {c['purity']:.2f}"
            clips = "".join(_clip_html(n, f"{_esc(n['label'] or '(no label)')} · d = {n['distance']:.2f}")
                            for n in c["nearest"])
            out.append(f'<div class="cluster" data-k="{sol["k"]}" data-cluster="{c["cluster"]}">'
                       f'<h4>cluster {c["cluster"]} · {c["size"]} clips · {purity}</h4>{clips}</div>')
        out.append("</div>")
    return "\n".join(out)


def _confusions_html(listen: dict) -> str:
    """The confusion listening section."""
    out = ['<h2 id="listen-confusions">Listen to the confusions</h2>']
    if listen.get("confusion_note"):
        out.append(f'<p class="note">{_esc(listen["confusion_note"])}</p>')
    if listen["confusions"]:
        out.append("<p>The largest off-diagonal cells of the logistic probe's confusion matrix (summed over "
                   "folds), with clips the probe got wrong that way.</p><div class=\"clusters\">")
        for cell in listen["confusions"]:
            clips = "".join(_clip_html(c, f"true {_esc(c['label'])} → predicted {_esc(c['predicted'])}")
                            for c in cell["clips"])
            out.append(f'<div class="cluster"><h4>{_esc(cell["true"])} → {_esc(cell["predicted"])}: '
                       f'{cell["count"]} clips</h4>{clips}</div>')
        out.append("</div>")
    return "\n".join(out)


def map_data(listen: dict) -> dict:
    """What the page's script draws: coordinates, ids, labels, audio paths and the colour views."""
    pts = listen["points"]
    views = [{"name": "label", "values": pts["label"]}]
    views += [{"name": f"cluster (k = {k})", "values": pts[f"cluster_k{k}"]} for k in listen["ks"]
              if f"cluster_k{k}" in pts]
    return {"clip_id": pts["clip_id"], "label": pts["label"], "x": pts["x"], "y": pts["y"],
            "audio": pts["audio"], "views": views}


def _map_html(listen: dict) -> str:
    """The interactive embedding map (drawn by the template's script)."""
    views = map_data(listen)["views"]
    radios = " ".join(f'<label><input type="radio" name="map-view" value="{i}"{" checked" if i == 0 else ""}> '
                      f'{_esc(v["name"])}</label>' for i, v in enumerate(views))
    return (f'<h2 id="map-section">Embedding map</h2><p>{_esc(listen["map_method"])} of the '
            f'{_esc(listen["map_pooling"])}-pooled clip embeddings of <b>{_esc(listen["entry"])}</b> (the projection '
            'of embedding_map.png). Hover a point for its clip id; click it to play the clip.</p>'
            f'<p>Colour by: {radios}</p><div id="map-legend" class="legend"></div>'
            '<svg id="map" viewBox="0 0 640 480" width="640" height="480" role="img" '
            'aria-label="embedding map"></svg><div id="map-info"></div>'
            '<audio id="map-player" controls preload="none"></audio>')


def _figures_html(figures: list[dict]) -> str:
    """The PNG figures; the trained and random-weight maps side by side."""
    out = ['<h2 id="figures">Figures</h2>']
    twin = next((f for f in figures if f["kind"] == "map_random"), None)

    def fig(f):
        return (f'<figure><img src="{_esc(f["file"])}" alt="{_esc(f["caption"])}">'
                f'<figcaption>{_esc(f["caption"])}</figcaption></figure>')

    for f in figures:
        if f["kind"] == "map_random" and any(g["kind"] == "map" for g in figures):
            continue
        out.append(f'<div class="pair">{fig(f)}{fig(twin)}</div>' if f["kind"] == "map" and twin else fig(f))
    return "\n".join(out)


def _details_html(report: dict) -> str:
    """The ``extra`` mapping as a YAML block."""
    import yaml

    extra = report.get("extra") or {}
    if not extra:
        return ""
    text = yaml.safe_dump(extra, sort_keys=False, default_flow_style=False, allow_unicode=True).rstrip()
    return f'<h2 id="details">Run details</h2><pre>{_esc(text)}</pre>'


def render_page(report: dict) -> str:
    """Render a report dict (the content of report.json) as one HTML page.

    Parameters
    ----------
    report : dict written by :func:`tile2audio.report.make_report`

    Returns
    -------
    str
        The page; its audio and images are paths relative to the report folder.
    """
    from .tables import sections

    listen = report.get("listen")
    entries = ", ".join(f"{e['name']} ({e['kind']}{'' if e['label_free'] else ', uses labels'})"
                        for e in report.get("entries", []))
    parts = [f"<h1>{_esc(report['title'])}</h1>", f"<p>Entries: {_esc(entries)}.</p>"]
    links = [("probes", "Probes"), ("listen-clusters", "Listen to the clusters"),
             ("listen-confusions", "Confusions"), ("map-section", "Map"), ("figures", "Figures")]
    parts.append("<nav>" + "".join(f'<a href="#{a}">{t}</a>' for a, t in links) + "</nav>")
    for i, sec in enumerate(sections(report)):
        parts.append(_section_html(sec, "probes" if i == 0 else f"table-{i}"))
    data = None
    if listen:
        parts += [_clusters_html(listen), _confusions_html(listen)]
        if listen.get("map_method"):
            parts.append(_map_html(listen))
            data = map_data(listen)
    else:
        parts.append('<h2 id="listen-clusters">Listen to the clusters</h2>'
                     '<p class="note">No listening data in this report (see the log).</p>')
    if report.get("figures"):
        parts.append(_figures_html(report["figures"]))
    parts.append(_details_html(report))
    # "<" escaped: no clip id can close the script element.
    payload = json.dumps(data, ensure_ascii=False).replace("<", "\\u003c")
    template = string.Template(resources.files("tile2audio").joinpath(TEMPLATE).read_text(encoding="utf-8"))
    return template.substitute(title=_esc(report["title"]), body="\n".join(p for p in parts if p), data=payload)


def write_page(report: dict, out_dir: str | Path) -> Path:
    """Write ``out_dir/report.html`` (atomically) from a report dict.

    Parameters
    ----------
    report : dict written by :func:`tile2audio.report.make_report`
    out_dir : the report folder (the page links ``audio/`` and the PNGs inside it)

    Returns
    -------
    Path
    """
    path = Path(out_dir) / "report.html"
    atomic.write_text(path, render_page(report))
    return path
