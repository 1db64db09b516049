"""Learning curve: train on a fraction of an experiment's unlabelled clips, probe on all of them.

    python experiments/learning_curve.py NAME experiments/urbansound.yaml --fractions 0.25,0.5,1 --seeds 0

Each fraction is one recorded trial (``experiments/trial.py``, ``sampler.clip_fraction``,
with every seed of ``--seeds``), so the probe's splits and clips are the same for every
point; only the audio the encoder trains on shrinks. Writes ``experiments/NAME.png``
(macro-F1 and accuracy of the trained encoder against the fraction, with the random-weight
twin and the MFCC statistics as flat references) and prints the figures.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trial import run_seeds

from tile2audio.plots import pyplot, save_png

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name")
    p.add_argument("experiment")
    p.add_argument("--fractions", default="0.25,0.5,1")
    p.add_argument("--seeds", default="0")
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()
    fractions = [float(x) for x in args.fractions.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    points = []
    for i, f in enumerate(fractions):
        name = f"{args.name}-f{f:g}"
        reuse = None if i == 0 else f"{args.name}-f{fractions[0]:g}-s{seeds[0]}"
        rec = run_seeds(name, args.experiment, args.set + [f"sampler.clip_fraction={f}"], seeds,
                        note=f"learning curve: {f:.0%} of the clips for training", reuse=reuse)
        points.append((f, rec["results"]))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [f for f, _ in points]
    for kind, style in (("trained", "o-"), ("random", "s--"), ("mfcc", "^:")):
        ys = [r[kind]["macro_f1"] for _, r in points if kind in r]
        if ys:
            ax.plot(xs[: len(ys)], ys, style, label=kind)
    ax.set_xlabel("fraction of the unlabelled clips used for training")
    ax.set_ylabel("macro-F1 (clip-level logistic probe)")
    ax.set_title(args.name)
    ax.legend()
    save_png(fig, HERE / f"{args.name}.png")
    print(json.dumps([{"fraction": f, **{k: round(v["macro_f1"], 4) for k, v in r.items()}} for f, r in points]))


if __name__ == "__main__":
    main()
