"""The report's charts: matplotlib figures (Agg, imported only when a chart is drawn), embedded in
the HTML as base64 PNG."""

from __future__ import annotations

import base64
import io

from .fields import as_list, fmt_ms, get, num
from .inputs import Manifest, Run, RunRole, SpeedUp

PALETTE = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#eeca3b", "#9d755d"]
FLOAT_GREY = "#8c8c8c"


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg: no display needed
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _tidy(ax, grid_axis: str = "x") -> None:
    ax.grid(axis=grid_axis, alpha=0.3)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def png_b64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no tool URL inside the file
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _color_for(precision: str, order: list[str]) -> str:
    """Float grey; converted precisions orange, green, ... in sorted order, the same in every report."""
    if precision.split(" #")[0].endswith("float"):
        return FLOAT_GREY
    converted = [p for p in order if not p.split(" #")[0].endswith("float")]
    return PALETTE[(converted.index(precision) + 1) % len(PALETTE)]


def _box_stats(r: Run) -> dict:
    """Box plot stats of one run; a result without timings_ms is drawn from its summary
    (box = p5..p95, whiskers = min..max) so it still appears."""
    if r.timings:
        import numpy as np
        from matplotlib import cbook

        s = cbook.boxplot_stats(np.asarray(r.timings))[0]
    else:
        med = r.median
        s = {"med": med, "fliers": []}
        for key, field in (("q1", "p5_ms"), ("q3", "p95_ms"), ("whislo", "min_ms"), ("whishi", "max_ms")):
            s[key] = num(get(r.data, "runs", field)) or med
    s["med"] = r.median  # the median the device reported is the one we print
    s["label"] = f"{r.device}\n{r.precision}"
    return s


def latency_figure(runs: list[Run]):
    """Horizontal box plot of each run's timed inferences, median written beside each box.

    Returns (figure or None, [(run, median label)] in drawing order, top to bottom)."""
    runs = [r for r in runs if not r.failed and (r.timings or r.median is not None)]
    if not runs:
        return None, []
    import numpy as np
    from matplotlib.patches import Patch

    runs.sort(key=lambda r: (r.device, r.role is not RunRole.FLOAT, r.precision))
    stats = [_box_stats(r) for r in runs]
    precs = sorted({r.precision for r in runs})
    fig = _figure(9.5, 0.9 + 0.62 * len(runs))
    ax = fig.add_subplot()
    texts: list[tuple[Run, str]] = []
    y = np.arange(1, len(stats) + 1)
    bp = ax.bxp(stats, positions=y, orientation="horizontal", widths=0.55, patch_artist=True,
                showfliers=True, flierprops={"markersize": 2, "alpha": 0.4},
                medianprops={"color": "black", "linewidth": 1.6})
    rng = np.random.default_rng(0)  # jitter only; fixed so the picture is reproducible
    hi = max(max(s["whishi"], max(s["fliers"], default=0)) for s in stats)
    for yi, r, s, box in zip(y, runs, stats, bp["boxes"]):
        box.set_facecolor(_color_for(r.precision, precs))
        box.set_alpha(0.75)
        if r.timings:
            ax.scatter(r.timings, yi + rng.uniform(-0.18, 0.18, len(r.timings)), s=3, color="black",
                       alpha=0.25, linewidths=0, zorder=3)
        label = f"median {fmt_ms(s['med'])} ms"
        texts.append((r, label))
        ax.annotate(label, (max(s["whishi"], max(s["fliers"], default=0)), yi), xytext=(6, 0),
                    textcoords="offset points", va="center", fontsize=9, fontweight="bold")
    fig.legend(handles=[Patch(facecolor=_color_for(p, precs), alpha=0.75, label=p) for p in precs],
               loc="outside upper right", ncols=min(len(precs), 4), fontsize=9, frameon=False)
    ax.invert_yaxis()  # first device at the top, like the tables
    lo = min(min(s["whislo"], min(s["fliers"], default=s["whislo"])) for s in stats)
    if lo > 0 and hi / lo > 20:  # a desktop and a Pi on one linear axis squash the fast boxes flat
        ax.set_xscale("log")
        ax.set_xlim(lo / 1.5, hi * 4)
    else:
        ax.set_xlim(0, (hi * 1.3) or 1.0)
    ax.set_xlabel("inference latency (ms), timed runs")
    ax.set_title("Latency per device and precision", loc="left", fontsize=12)
    _tidy(ax)
    return fig, texts


def budget_steps(m: Manifest) -> list[dict]:
    """The accuracy budget loop's steps that carry a drop (the budget is defined on the drop)."""
    return [s for s in as_list(get(m.data, "budget", "steps")) if isinstance(s, dict) and num(s.get("drop")) is not None]


def budget_figure(m: Manifest):
    """The budget loop's metric drop at each step as bars against the allowed drop (dashed), the
    metric written on each bar; None under two steps (a budget met as converted needs no chart)."""
    steps = budget_steps(m)
    if len(steps) < 2:
        return None
    metric = str(get(m.data, "budget", "metric") or "metric")
    max_drop = num(get(m.data, "budget", "max_drop"))
    drops = [num(s["drop"]) for s in steps]
    x = list(range(len(steps)))
    fig = _figure(9.5, 3.2)
    ax = fig.add_subplot()
    # A step's own verdict where it has one: under the floor outputs have other bounds, and a step can
    # miss on one while the charted output is within the max drop.
    within = [s["met"] if isinstance(s.get("met"), bool) else max_drop is not None and d <= max_drop
              for s, d in zip(steps, drops)]
    ax.bar(x, drops, width=0.6, color=[PALETTE[2] if ok else PALETTE[1] for ok in within])
    for xi, s, d in zip(x, steps, drops):
        value = num(s.get("value"))
        if value is not None:
            ax.annotate(f"{metric} {value:.4f}", (xi, d), xytext=(0, 3), textcoords="offset points",
                        ha="center", va="bottom", fontsize=8, fontweight="bold")
    if max_drop is not None:
        ax.axhline(max_drop, color="black", linewidth=1, linestyle="--", label=f"budget: max drop {max_drop:g}")
        ax.legend(fontsize=8, loc="upper right", frameon=False)
    ax.set_ylim(0, max(drops + [max_drop or 0]) * 1.3 or 1.0)
    moved = [len(as_list(s.get("moved"))) for s in steps]
    # A step's `moved` is the whole plan it probed (ops out of the first precision), not what it added.
    ax.set_xticks(x, [f"step {s.get('step', i)}\n{n} op(s) moved" for i, (s, n) in enumerate(zip(steps, moved))],
                  fontsize=8)
    ax.set_ylabel(f"{metric} drop vs float")
    ax.set_title(f"Accuracy budget, {m.name}: drop per step (ops moved to a wider precision)", loc="left",
                 fontsize=12)
    _tidy(ax, "y")
    return fig


def speed_size_figure(manifests: list[Manifest], sps: list[SpeedUp]):
    """Left: model size float vs converted. Right: speed-up per device (× over float)."""
    sized = [(m, *m.sizes) for m in manifests if all(v for v in m.sizes)]
    if not sized and not sps:
        return None
    fig = _figure(9.5, 0.9 + 0.45 * max(len(sized), len(sps), 3))
    panels = fig.subplots(1, 2 if sized and sps else 1, squeeze=False)[0]
    if sized:
        ax = panels[0]
        y = list(range(len(sized)))
        fb = [f / 1024 for _, f, _ in sized]
        qb = [q / 1024 for _, _, q in sized]
        ax.barh([v - 0.2 for v in y], fb, height=0.38, color=FLOAT_GREY, label="float")
        ax.barh([v + 0.2 for v in y], qb, height=0.38, color=PALETTE[1], label="converted")
        for yi, (m, f, q) in zip(y, sized):
            ax.annotate(f"{f / q:.2f}× smaller", (q / 1024, yi + 0.2), xytext=(4, 0),
                        textcoords="offset points", va="center", fontsize=8, fontweight="bold")
        ax.set_yticks(y, [m.name for m, _, _ in sized], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, max(fb + qb) * 1.45)
        ax.set_xlabel("model size (KiB)")
        ax.legend(fontsize=8, loc="lower right", frameon=False)
        ax.set_title("Size", loc="left", fontsize=12)
    if sps:
        ax = panels[-1]
        y = list(range(len(sps)))
        vals = [s.speedup for s in sps]
        ax.barh(y, vals, height=0.6, color=[PALETTE[2] if v >= 1 else PALETTE[3] for v in vals])
        for yi, v in zip(y, vals):
            ax.annotate(f"{v:.2f}×", (v, yi), xytext=(4, 0), textcoords="offset points", va="center",
                        fontsize=9, fontweight="bold")
        ax.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_yticks(y, [f"{s.device}\n{s.model}" for s in sps], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, max(vals + [1.0]) * 1.3)
        ax.set_xlabel("speed-up over float (median latency ratio)")
        ax.set_title("Speed-up", loc="left", fontsize=12)
    for ax in panels:
        _tidy(ax)
    return fig
