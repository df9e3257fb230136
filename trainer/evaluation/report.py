"""`hylo report RUN_DIR`: a one-page summary of a run from its metrics.jsonl — report.png and report.html.

Panels: training loss (and flagged spikes), tokens/s, held-out loss and the last perplexity-by-position curve,
recall accuracies (MQAR, passkey), per-layer gradient and linear-state norms, and heat-maps of the last sink
statistics (layer x head) and of the last passkey grid (length x depth).  Panels without data are left out.
"""

from __future__ import annotations

import html
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from hylo.trainer.errors import ConfigError


def read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] in logging order (a resumed run's repeated steps keep their last value)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: is '{run_dir}' a hylo run directory (run.dir)?")
    series: dict[str, dict[int, float]] = defaultdict(dict)
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
        except ValueError:
            print(f"[hylo] report: skipping unreadable line {number} of {path}", file=sys.stderr)
            continue
        for tag, value in row.items():
            if tag != "step" and isinstance(value, (int, float)):
                series[tag][row["step"]] = float(value)
    return {tag: sorted(points.items()) for tag, points in series.items()}


def _last_grid(metrics, pattern: str) -> tuple[np.ndarray, list, list] | None:
    """A 2-D grid from the tags matching `pattern` (two groups: row key, column key) at their last step."""
    cells = {}
    for tag, points in metrics.items():
        match = re.fullmatch(pattern, tag)
        if match:
            cells[(match.group(1), match.group(2))] = points[-1][1]
    if not cells:
        return None
    rows = sorted({r for r, _ in cells}, key=float)
    cols = sorted({c for _, c in cells}, key=float)
    grid = np.array([[cells.get((r, c), np.nan) for c in cols] for r in rows])
    return grid, rows, cols


def plot_heatmap(grid: np.ndarray, rows: list, cols: list, title: str, path: Path | None = None, ax=None):
    """Draw (or, with `path`, save as a PNG) a labelled heat-map of a [0, 1] grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(1 + 0.6 * len(cols), 1 + 0.4 * len(rows)))
    image = ax.imshow(grid, vmin=0, vmax=max(1.0, float(np.nanmax(grid))), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), [str(c) for c in cols], fontsize=7)
    ax.set_yticks(range(len(rows)), [str(r) for r in rows], fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.figure.colorbar(image, ax=ax)
    if own and path is not None:
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def render(run_dir: Path, out_dir: Path | None = None) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = read_metrics(run_dir)
    out_dir = out_dir or run_dir
    panels = []

    def curves(tags: list[str], title: str, log: bool = False):
        found = [t for t in tags if t in metrics]
        if found:
            panels.append(("lines", title, found, log))

    curves(["train/loss", "eval/loss"], "loss")
    curves(["train/tokens_per_sec"], "tokens/s")
    curves(["eval/mqar_accuracy", "eval/passkey_accuracy"], "recall accuracy")
    curves(sorted(t for t in metrics if t.startswith("grads/")), "gradient norm per layer", log=True)
    curves(sorted(t for t in metrics if re.fullmatch(r"states/layer\d+/norm", t)), "linear-state norm", log=True)
    ppl = sorted(t for t in metrics if t.startswith("eval/ppl_by_position/"))
    if ppl:
        panels.append(("positions", "perplexity by position (last eval)", ppl, False))
    sinks = _last_grid(metrics, r"sinks/layer(\d+)/first_token_mass/head(\d+)")
    if sinks:
        panels.append(("grid", "first-token attention mass (layer x head)", sinks, False))
    passkey = _last_grid(metrics, r"eval/passkey/len(\d+)/depth([\d.]+)")
    if passkey:
        panels.append(("grid", "passkey accuracy (length x depth)", passkey, False))
    if not panels:
        raise ConfigError(f"{run_dir / 'metrics.jsonl'} holds no metrics yet")

    cols = 2
    fig, axes = plt.subplots(-(-len(panels) // cols), cols, figsize=(11, 3.2 * -(-len(panels) // cols)),
                             squeeze=False)
    for ax, (kind, title, data, log) in zip(axes.flat, panels, strict=False):
        if kind == "lines":
            for tag in data:
                steps, values = zip(*metrics[tag], strict=True)
                ax.plot(steps, values, label=tag, linewidth=1)
            if title == "loss" and "train/loss_spike_zscore" in metrics:
                spikes = dict(metrics["train/loss"])
                xs = [s for s, _ in metrics["train/loss_spike_zscore"] if s in spikes]
                ax.scatter(xs, [spikes[s] for s in xs], color="red", zorder=3, label="loss spike")
            ax.set_xlabel("step", fontsize=8)
            if log:
                ax.set_yscale("log")
            ax.legend(fontsize=6)
        elif kind == "positions":
            lows = [int(t.rsplit("/", 1)[1].split("-")[0]) for t in data]
            ax.plot(lows, [metrics[t][-1][1] for t in data], marker="o", linewidth=1)
            ax.set_xlabel("position", fontsize=8)
        else:
            plot_heatmap(*data, title, ax=ax)
        ax.set_title(title, fontsize=9)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(str(run_dir), fontsize=10)
    fig.tight_layout()
    png = out_dir / "report.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)

    last = {tag: points[-1] for tag, points in metrics.items() if "/" in tag and tag.count("/") == 1}
    rows = "\n".join(f"<tr><td>{html.escape(t)}</td><td>{s}</td><td>{v:.6g}</td></tr>"
                     for t, (s, v) in sorted(last.items()))
    page = out_dir / "report.html"
    page.write_text(f"<!doctype html><meta charset='utf-8'><title>hylo report: {html.escape(str(run_dir))}</title>"
                    f"<h1>{html.escape(str(run_dir))}</h1><img src='{png.name}' style='max-width:100%'>"
                    f"<h2>Last values</h2><table border=1 cellpadding=3><tr><th>metric</th><th>step</th>"
                    f"<th>value</th></tr>{rows}</table>\n")
    return png, page


def run(args) -> int:
    """`hylo report` (arguments: trainer/arguments.py)."""
    png, page = render(Path(args.run_dir), Path(args.out) if args.out else None)
    print(f"[hylo] report: {png} and {page}")
    return 0
