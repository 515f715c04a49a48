"""The figures of a run folder (learning curve, alignment), on matplotlib's file-only
Agg backend: commands run without a display, and matplotlib is imported on first use."""
from __future__ import annotations

from pathlib import Path


def pyplot():
    """`matplotlib.pyplot` on the file-only Agg backend (commands run without a display);
    imported on first use, so commands that draw nothing never load matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def learning_curve(run_dir: Path, history: list, title: str):
    """`learning_curve.png`: running train accuracy and test accuracy per epoch."""
    if not history:
        return
    plt = pyplot()
    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ep, [h["train_acc"] for h in history], "o-", label="train (running)")
    ax.plot(ep, [h["test_acc"] for h in history], "s-", label="test")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "learning_curve.png", dpi=110)
    plt.close(fig)


def alignment(run_dir: Path, history: list, title: str):
    """`alignment.png`: per-parameter cosine (EP vs truncated BPTT) and the angle
    between the full gradients, against the training step."""
    recs = [r for h in history for r in h.get("alignment", [])]
    if not recs:
        return
    plt = pyplot()
    steps = [r["step"] for r in recs]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name in recs[0]["cosine"]:
        a1.plot(steps, [r["cosine"][name] for r in recs], label=name)
    a1.set_xlabel("training step")
    a1.set_ylabel("cosine(EP, truncated BPTT)")
    a1.set_ylim(-1.05, 1.05)
    a1.grid(alpha=0.3)
    a1.legend(fontsize=6, ncol=2)
    a2.plot(steps, [r["angle"] for r in recs], "k-")
    a2.set_xlabel("training step")
    a2.set_ylabel("angle between full gradients (°)")
    a2.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(run_dir / "alignment.png", dpi=110)
    plt.close(fig)
