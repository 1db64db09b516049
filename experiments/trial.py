"""Run one recorded trial of an experiment and render the trial table.

    python experiments/trial.py NAME experiments/emotify30.yaml --set train.epochs=8 ...
    python experiments/trial.py --render

A trial runs ``tile2audio run`` with the given overrides into ``runs/trials/NAME`` and
writes ``experiments/results/NAME.json``: the experiment, the overrides, the resolved
config, the training time and the clip-level logistic-probe figures of the trained
encoder, its random-weight twin and the MFCC statistics (same splits). ``--render``
rewrites the table between the markers in ``experiments/README.md``.
``--seeds 0,1,2`` runs the setting once per training seed (``train.seed``; the probe's
splits stay fixed), into ``runs/trials/NAME-sK``, and records one NAME.json with every
seed's figures and their mean and std: the table shows the mean, and decisions are made
on it (one seed moves a probe on 400 clips by about 0.03).
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

import numpy as np

from tile2audio import atomic
from tile2audio.config import load_experiment, to_dict
from tile2audio.pipeline import ExperimentLayout, Stages, run_experiment, stage_fingerprints
from tile2audio.runs import read_run

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BEGIN, END = "<!-- trials:begin -->", "<!-- trials:end -->"


def reuse_cache(cfg, out: Path, other: Path) -> bool:
    """Hard-link ``other``'s manifest and cache into ``out`` if its fingerprints match."""
    fps, done = stage_fingerprints(cfg), Stages(other).done
    if out.exists() or any(done.get(s) != fps[s] for s in ("manifest", "features")):
        return False
    mine, theirs = ExperimentLayout(out), ExperimentLayout(other)
    out.mkdir(parents=True)
    shutil.copy2(theirs.manifest, mine.manifest)
    shutil.copytree(theirs.cache, mine.cache, copy_function=os.link)
    stages = Stages(out)
    for s in ("manifest", "features"):
        stages.mark(s, fps[s])
    return True


def run_trial(name: str, experiment: str, overrides: list[str], note: str = "", reuse: str | None = None,
              write: bool = True) -> dict:
    """Run the experiment with overrides and record the result JSON (``write``)."""
    if not any(o.startswith("probe.baselines=") for o in overrides):
        # Trials compare with MFCC statistics and the random twin; openSMILE's ComParE set
        # (6373-d) alone costs minutes per probe, so it is measured once, not per trial.
        overrides = overrides + ["probe.baselines=[mfcc]"]
    cfg = load_experiment(experiment, overrides)
    out = Path("runs") / "trials" / name
    if reuse and not reuse_cache(cfg, out, Path("runs") / "trials" / reuse):
        print(f"not reusing {reuse}: other data or feature settings, or {out} exists")
    started = time.time()
    run_experiment(cfg, out, progress=False)
    layout = ExperimentLayout(out)
    probe = json.loads(layout.probe_json.read_text())
    rows = [r for r in probe["rows"] if r["probe"] == "logreg"]
    record = {
        "name": name, "experiment": Path(experiment).stem, "overrides": overrides, "note": note,
        "recorded": round(time.time()),
        "train_seconds": read_run(layout.run).get("train_seconds"),
        "wall_seconds": round(time.time() - started, 1),
        "protocol": probe.get("protocol"),
        "results": {r["kind"]: {k: r[k] for k in ("accuracy", "accuracy_std", "macro_f1", "macro_f1_std")}
                    for r in rows},
        "config": to_dict(cfg),
        "auto": read_run(layout.run).get("auto", {}),
    }
    if write:
        atomic.write_json(RESULTS / f"{name}.json", record)
    return record


def run_seeds(name: str, experiment: str, overrides: list[str], seeds: list[int], note: str = "",
              reuse: str | None = None) -> dict:
    """Run the setting once per seed (the first seed's cache is reused) and record mean and std."""
    per_seed = []
    for i, seed in enumerate(seeds):
        source = reuse if i == 0 else f"{name}-s{seeds[0]}"
        per_seed.append(run_trial(f"{name}-s{seed}", experiment, overrides + [f"train.seed={seed}"], note,
                                  source, write=False))
    results = {}
    for kind in per_seed[0]["results"]:
        cell = {}
        for metric in ("accuracy", "macro_f1"):
            values = np.array([r["results"][kind][metric] for r in per_seed if kind in r["results"]])
            cell[metric], cell[f"{metric}_std"] = float(values.mean()), float(values.std())
            cell[f"{metric}_seeds"] = [round(float(v), 4) for v in values]
        results[kind] = cell
    record = {
        "name": name, "experiment": Path(experiment).stem, "overrides": overrides, "note": note,
        "recorded": round(time.time()), "seeds": seeds,
        "train_seconds": float(np.mean([r["train_seconds"] or 0 for r in per_seed])),
        "wall_seconds": round(sum(r["wall_seconds"] for r in per_seed), 1),
        "protocol": per_seed[0]["protocol"], "results": results,
        "config": per_seed[0]["config"], "auto": per_seed[0]["auto"],
    }
    atomic.write_json(RESULTS / f"{name}.json", record)
    return record


def render() -> str:
    """The Markdown table of every recorded trial, oldest first."""
    records = sorted((json.loads(p.read_text()) for p in RESULTS.glob("*.json") if not p.name.startswith("layers-")),
                     key=lambda r: (r["experiment"], r.get("recorded", 0), r["name"]))
    lines = ["| trial | data | changes | seeds | train s | trained acc / F1 | random acc / F1 | MFCC acc / F1 | note |",
             "| --- | --- | --- | --- | ---: | --- | --- | --- | --- |"]
    for r in records:
        def cell(k, r=r):
            if k not in r["results"]:
                return "–"
            c = r["results"][k]
            if "seeds" in r:  # mean over seeds, with the std of the headline figures
                return f"{c['accuracy']:.3f}±{c['accuracy_std']:.3f} / {c['macro_f1']:.3f}±{c['macro_f1_std']:.3f}"
            return f"{c['accuracy']:.3f} / {c['macro_f1']:.3f}"
        seeds = ",".join(str(x) for x in r.get("seeds", [r["config"]["train"]["seed"]]))
        lines.append(f"| {r['name']} | {r['experiment']} | {' '.join(r['overrides']) or 'defaults'} | {seeds} | "
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
    p.add_argument("--seeds", help="comma-separated training seeds, e.g. 0,1,2: record their mean and std")
    p.add_argument("--render", action="store_true")
    args = p.parse_args()
    if args.name and args.experiment and args.seeds:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
        rec = run_seeds(args.name, args.experiment, args.set, seeds, args.note, args.reuse_cache)
        print(json.dumps({k: rec[k] for k in ("name", "train_seconds", "results")}, indent=1))
    elif args.name and args.experiment:
        rec = run_trial(args.name, args.experiment, args.set, args.note, args.reuse_cache)
        print(json.dumps({k: rec[k] for k in ("name", "train_seconds", "results")}, indent=1))
    write_table()


if __name__ == "__main__":
    main()
