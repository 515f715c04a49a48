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


def integer_ticks(axis):
    """Ticks of `axis` (`ax.xaxis`, `ax.yaxis`) at integers only (epochs, steps, k), even
    when the view holds a single integer (a one-epoch run)."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def integer_epochs(ax, last_epoch: int):
    """Integer epoch ticks on `ax`'s x axis, from 1 to `last_epoch` (a little margin, so a
    curve of one epoch is a point in the middle, not on the frame)."""
    integer_ticks(ax.xaxis)
    ax.set_xlim(0.5, max(last_epoch, 1) + 0.5)


def save(fig, path, dpi: int = 110):
    """Write `fig` as a PNG at `path` atomically (drawn in memory, then a temporary file
    in the same folder renamed over `path`), and close it."""
    import io

    from ep_jax.experiments.checkpoint import atomic_write

    plt = pyplot()
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
        atomic_write(Path(path), buf.getvalue())
    finally:
        plt.close(fig)


def learning_curve_figure(history: list, title: str):
    """The figure of `learning_curve` (a matplotlib Figure): running train accuracy and
    test accuracy against the epoch, with markers and integer epoch ticks."""
    plt = pyplot()
    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ep, [h["train_acc"] for h in history], "o-", label="train (running)")
    ax.plot(ep, [h["test_acc"] for h in history], "s-", label="test")
    integer_epochs(ax, max(ep))
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def learning_curve(run_dir: Path, history: list, title: str):
    """`learning_curve.png`: running train accuracy and test accuracy per epoch."""
    if not history:
        return
    save(learning_curve_figure(history, title), Path(run_dir) / "learning_curve.png", dpi=110)


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
    save(fig, Path(run_dir) / "alignment.png", dpi=110)
