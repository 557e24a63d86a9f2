"""
Loss curves of one or several runs from their metrics.jsonl: train and validation loss against
tokens (or iterations) on top, the learning rate below, runs overlaid.

    python plot.py out-shakespeare-char
    python plot.py out-a out-b --out=compare.png --x=iter

Reads nothing but out_dir/metrics.jsonl, line by line, so it works on a run that is still
training: a half-written last line is skipped. Needs matplotlib (pip install -e .[plot]). An existing
--out is replaced only when it is a PNG picture; a run's own files are never written.
"""

from dataclasses import dataclass, field
from pathlib import Path

from homegpt.errors import UserError
from configurator import run
from homegpt.runs import read_metrics
from homegpt.fileio import atomic_write, check_file_target

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"  # the first eight bytes of every PNG: the only kind of file --out replaces


@dataclass
class PlotConfig:
    run_dirs: list = field(default_factory=list)  # out_dirs holding metrics.jsonl
    out: str = "loss.png"  # the PNG written (an existing file is replaced only when it is a PNG)
    x: str = "tokens"  # x axis: 'tokens' (comparable across batch sizes) or 'iter'


def _series(records, x, y):
    pts = [(r[x], r[y]) for r in records if r.get(x) is not None and r.get(y) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def run_names(run_dirs):
    """Legend names: each out_dir's folder name, or the path as given when two names collide."""
    names = [Path(d).resolve().name for d in run_dirs]
    return [n if names.count(n) == 1 else str(d) for n, d in zip(names, run_dirs)]


def plot_runs(run_dirs, out, x="tokens"):
    """Draw the runs and write the PNG to out (atomically); returns the matplotlib Figure."""
    if x not in ("tokens", "iter"):
        raise UserError(f"x must be 'tokens' or 'iter', got {x!r}")
    if not run_dirs:
        raise UserError("no runs to plot: pass one or more out_dirs")
    check_file_target(out, "--out", PNG_MAGIC, "PNG picture")  # a picture replaces a picture, nothing else
    try:
        from matplotlib.figure import Figure  # a bare Figure draws with Agg: no display, no pyplot state
    except ImportError as e:
        raise SystemExit("plot.py needs matplotlib: pip install -e .[plot]") from e
    runs = [(name, read_metrics(d)) for name, d in zip(run_names(run_dirs), run_dirs)]
    fig = Figure(figsize=(9, 7), layout="constrained")
    ax_loss, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    for i, (name, recs) in enumerate(runs):
        color = f"C{i % 10}"
        xs, ys = _series(recs, x, "train_loss")
        if xs:
            ax_loss.plot(xs, ys, color=color, lw=1.2, alpha=0.8, label=f"{name} train")
        xv, yv = _series(recs, x, "val_loss")
        if xv:
            ax_loss.plot(xv, yv, color=color, lw=1.8, ls="--", marker="o", ms=3, label=f"{name} val")
        xl, yl = _series(recs, x, "lr")
        if xl:
            ax_lr.plot(xl, yl, color=color, lw=1.2, label=name)
        if not (xs or xv):
            raise UserError(f"{Path(run_dirs[i]) / 'metrics.jsonl'}: no train_loss or val_loss with '{x}' yet")
    ax_loss.set_ylabel("loss (cross-entropy, nats/token)")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize=8)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("tokens seen" if x == "tokens" else "iteration")
    if x == "tokens":
        from matplotlib.ticker import EngFormatter
        ax_lr.xaxis.set_major_formatter(EngFormatter(sep=""))  # 800k, 1.2M, 10G rather than 1e9 offsets
    ax_lr.grid(alpha=0.3)
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    _save_png(fig, out)
    return fig


def _save_png(fig, out):
    out = Path(out)
    if out.parent != Path(""):
        out.parent.mkdir(parents=True, exist_ok=True)
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write(out, [buf.getvalue()])


def main(cfg):
    plot_runs(cfg.run_dirs, cfg.out, cfg.x)
    print(f"wrote {cfg.out} ({len(cfg.run_dirs)} run(s), x = {cfg.x})")


if __name__ == "__main__":
    run(main, PlotConfig, positional="run_dirs")  # python plot.py out-a out-b --out=cmp.png
