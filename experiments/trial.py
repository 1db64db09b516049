"""Run one recorded trial of an experiment and render the trial table.

    python experiments/trial.py NAME experiments/emotify30.yaml --set train.epochs=8 ...
    python experiments/trial.py --render

A trial runs ``tile2audio run`` with the given overrides into ``runs/trials/NAME`` and
writes ``experiments/results/NAME.json``: the experiment, the overrides, the resolved
config, the training time and the clip-level logistic-probe figures of the trained
encoder, its random-weight twin and the MFCC statistics (same splits). ``--render``
rewrites the table between the markers in ``experiments/README.md``.
``--reuse-cache OTHER`` hard-links the manifest and feature cache of trial OTHER when its
data and feature settings are the same (checked by the stage fingerprints), so a trial
pays only for training, embedding and probes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from tile2audio import atomic
from tile2audio.config import load_experiment, to_dict
from tile2audio.pipeline import _fingerprints, _Stages, run_experiment
from tile2audio.train import read_run

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BEGIN, END = "<!-- trials:begin -->", "<!-- trials:end -->"


def reuse_cache(cfg, out: Path, other: Path) -> bool:
    """Hard-link ``other``'s manifest and cache into ``out`` if its fingerprints match."""
    fps, done = _fingerprints(cfg), _Stages(other).done
    if out.exists() or any(done.get(s) != fps[s] for s in ("manifest", "features")):
        return False
    out.mkdir(parents=True)
    shutil.copy2(other / "manifest.csv", out / "manifest.csv")
    shutil.copytree(other / "cache", out / "cache", copy_function=os.link)
    stages = _Stages(out)
    for s in ("manifest", "features"):
        stages.mark(s, fps[s])
    return True


def run_trial(name: str, experiment: str, overrides: list[str], note: str = "", reuse: str | None = None) -> dict:
    """Run the experiment with overrides and record the result JSON."""
    cfg = load_experiment(experiment, overrides)
    out = Path("runs") / "trials" / name
    if reuse and not reuse_cache(cfg, out, Path("runs") / "trials" / reuse):
        print(f"not reusing {reuse}: other data or feature settings, or {out} exists")
    started = time.time()
    run_experiment(cfg, out, progress=False)
    probe = json.loads((out / "probe" / "probe.json").read_text())
    rows = [r for r in probe["rows"] if r["probe"] == "logreg"]
    record = {
        "name": name, "experiment": Path(experiment).stem, "overrides": overrides, "note": note,
        "recorded": round(time.time()),
        "train_seconds": read_run(out / "run").get("train_seconds"),
        "wall_seconds": round(time.time() - started, 1),
        "protocol": probe.get("protocol"),
        "results": {r["kind"]: {k: r[k] for k in ("accuracy", "accuracy_std", "macro_f1", "macro_f1_std")}
                    for r in rows},
        "config": to_dict(cfg),
    }
    atomic.write_json(RESULTS / f"{name}.json", record)
    return record


def render() -> str:
    """The Markdown table of every recorded trial, oldest first."""
    records = sorted((json.loads(p.read_text()) for p in RESULTS.glob("*.json")),
                     key=lambda r: (r["experiment"], r.get("recorded", 0), r["name"]))
    lines = ["| trial | data | changes | train s | trained acc / F1 | random acc / F1 | MFCC acc / F1 | note |",
             "| --- | --- | --- | ---: | --- | --- | --- | --- |"]
    for r in records:
        cell = lambda k: (f"{r['results'][k]['accuracy']:.3f} / {r['results'][k]['macro_f1']:.3f}"
                          if k in r["results"] else "–")
        lines.append(f"| {r['name']} | {r['experiment']} | {' '.join(r['overrides']) or 'defaults'} | "
                     f"{r['train_seconds'] or 0:.0f} | {cell('trained')} | {cell('random')} | {cell('mfcc')} | "
                     f"{r.get('note', '')} |")
    return "\n".join(lines)


def write_table() -> None:
    """Replace the table between the markers in experiments/README.md."""
    readme = HERE / "README.md"
    text = readme.read_text()
    if BEGIN not in text:
        text += f"\n## Trials\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    atomic.write_text(readme, f"{head}{BEGIN}\n{render()}\n{END}{tail}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", nargs="?")
    p.add_argument("experiment", nargs="?")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--note", default="")
    p.add_argument("--reuse-cache", metavar="OTHER", help="hard-link trial OTHER's feature cache")
    p.add_argument("--render", action="store_true")
    args = p.parse_args()
    if args.name and args.experiment:
        rec = run_trial(args.name, args.experiment, args.set, args.note, args.reuse_cache)
        print(json.dumps({k: rec[k] for k in ("name", "train_seconds", "results")}, indent=1))
    write_table()


if __name__ == "__main__":
    main()
