"""A Gantt chart of task runs, one row per thread of every worker, as a PNG (matplotlib).

Drawn on a bare ``matplotlib.figure.Figure`` rendered by the Agg canvas: no pyplot, so
no global backend is chosen and no figure is left registered anywhere. matplotlib is an
optional extra (``pip install 'aiodagger[plot]'``).
"""

from __future__ import annotations

import os
import zlib
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .records import Lane, Logs

__all__ = ["gantt"]

MAX_ROW_LABELS = 40  # past this, rows are labelled per processor, not one by one
MAX_LEGEND = 12


def _import_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError(
            "logs.gantt() draws with matplotlib, which is not installed: "
            "pip install 'aiodagger[plot]'"
        ) from None


def gantt(logs: Logs, path: str | os.PathLike[str] | IO[bytes] | None, *,
          title: str | None = None) -> Figure:
    _import_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    placed = logs.lanes()
    lanes = sorted({lane for lane, _ in placed}, key=lambda ln: (ln.worker, ln.processor, ln.row))
    row = {lane: i for i, lane in enumerate(lanes)}
    height = min(max(2.5, 0.6 + 0.28 * len(lanes)), 24.0)
    fig = Figure(figsize=(11, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = _palette()
    colors: dict[str, tuple[float, float, float, float]] = {}
    # Time zero is the first run: the wait between enable_logging() and the work is noise here.
    origin = min((run.start for _, run in placed), default=logs.origin)
    for lane, run in placed:
        color = colors.setdefault(run.name, cmap[zlib.crc32(run.name.encode()) % len(cmap)])
        ax.broken_barh(
            [(run.start - origin, max(run.stop - run.start, 1e-6))], (row[lane] - 0.4, 0.8),
            facecolors=color, edgecolors="#b00020" if not run.ok else "none",
            linewidth=1.2, hatch=None if run.ok else "//",
        )
    _label_rows(ax, lanes)
    ax.set_ylim(len(lanes) - 0.5 if lanes else 0.5, -0.5)
    ax.set_xlabel("seconds since the first run")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title or f"{len(logs.tasks)} tasks, {len(placed)} runs")
    if colors:
        handles = [Patch(facecolor=c, label=n) for n, c in list(colors.items())[:MAX_LEGEND]]
        if any(not run.ok for _, run in placed):
            handles.append(Patch(facecolor="white", edgecolor="#b00020", hatch="//", label="raised"))
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small",
                  frameon=False)
    if path is not None:
        fig.savefig(path, format="png")
    return fig


def _label_rows(ax: Axes, lanes: list[Lane]) -> None:
    if len(lanes) <= MAX_ROW_LABELS:
        ax.set_yticks(range(len(lanes)), [f"worker {ln.worker}: {ln.label}" for ln in lanes],
                      fontsize="small")
        return
    groups: dict[tuple[int, str], list[int]] = {}
    for i, ln in enumerate(lanes):
        groups.setdefault((ln.worker, ln.processor), []).append(i)
    ax.set_yticks([sum(ix) / len(ix) for ix in groups.values()],
                  [f"worker {w}: {p} ({len(ix)} rows)" for (w, p), ix in groups.items()], fontsize="small")


def _palette() -> list[tuple[float, float, float, float]]:
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return [cmap(i) for i in range(cmap.N)]
