"""Loss and active-fraction curves of training runs side by side, in one small PNG.

Usage (issue 12, "same learning"; README, speed section)::

    python experiments/precision_curves.py docs/precision_curves.png \\
        "mixed_bfloat16 + fused BN (default)=/tmp/p-fast/run" \\
        "float32 + fused BN=/tmp/p-f32/run" "float32, unfused BN (old)=/tmp/p-old/run"

Each ``label=run_dir`` names a run directory with a ``log.csv`` (one row per epoch) and a
``config.yaml``; the x axis is the optimizer step at the end of each epoch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from tile2audio import atomic  # noqa: E402


def main(argv: list[str]) -> int:
    """Plot ``argv[1:]`` (``label=run_dir``) into the PNG ``argv[0]``."""
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    out, runs = Path(argv[0]), [a.split("=", 1) for a in argv[1:]]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3), dpi=90)
    for label, run in runs:
        log = pd.read_csv(Path(run) / "log.csv")
        steps = yaml.safe_load((Path(run) / "config.yaml").read_text())["train"]["steps_per_epoch"]
        x = (log["epoch"] + 1) * steps
        axes[0].plot(x, log["loss"], marker=".", label=label)
        axes[1].plot(x, log["active_fraction"], marker=".", label=label)
    for ax, title in zip(axes, ("loss (epoch mean)", "active fraction (epoch mean)")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    with atomic.atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
