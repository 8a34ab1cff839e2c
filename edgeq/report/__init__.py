"""`edgeq report`: turn manifests and bench/fleet results into one HTML page and a Markdown summary.

The HTML is self-contained: inline CSS, charts as base64 PNG data URIs, no scripts, no URLs, so it
opens offline and can be mailed or attached to CI. The Markdown beside it (same stem, .md) carries the
same tables but no images, so it pastes cleanly into a PR or issue; the charts live in the HTML only.

  inputs.py    load manifests (manifest.read_manifest) and bench/fleet results; join results to
               manifests by hash; speed-ups
  fields.py    tolerant field access and cell formatting ("n/a" for anything missing)
  charts.py    matplotlib figures (imported only when a report is built)
  sections.py  what the report says, as sections of paragraphs, tables and images
  render.py    those sections as HTML and as Markdown
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import __version__
from ..errors import EdgeqError, OutputExistsError
from ..files import check_output, write_all
from .charts import latency_figure
from .fields import fmt_ms, text
from .inputs import Inputs, SpeedUp, collect_inputs, speedups
from .render import to_html, to_markdown
from .sections import all_sections, cards

__all__ = ["ReportResult", "build_report", "collect_inputs", "fmt_ms", "latency_figure"]


@dataclass(frozen=True)
class ReportResult:
    html: Path
    markdown: Path
    manifests: int
    runs: int
    failed_runs: int
    fleets: int
    images: int
    speedups: tuple[SpeedUp, ...]

    def to_json(self) -> dict:
        return {"schema": "edgeq.report/1", "html": str(self.html), "markdown": str(self.markdown),
                "manifests": self.manifests, "runs": self.runs, "failed_runs": self.failed_runs,
                "fleets": self.fleets, "images": self.images,
                "speedups": [asdict(s) for s in self.speedups]}


def _check_outputs(inputs: list[Path], out_html: Path, out_md: Path, force: bool) -> None:
    if not inputs:
        raise EdgeqError("no inputs; pass manifests (*.edgeq.json) and bench/fleet results (--json)")
    if out_html.suffix.lower() not in (".html", ".htm"):
        raise EdgeqError(f"{out_html}: the report must end in .html (the Markdown summary goes beside it)")
    ins = {p.resolve() for p in inputs}
    for o in (out_html, out_md):
        if o.resolve() in ins:  # checked first: even a missing input may never be named as -o
            raise OutputExistsError(f"{o}: is one of the inputs; choose another -o")
        check_output(o, inputs, force)


def build_report(inputs: list[Path], out_html: Path, *, title: str | None = None,
                 force: bool = False) -> ReportResult:
    """Write OUT.html (self-contained) and OUT.md (same stem) from manifests and run results.

    An existing report is replaced only with `force`; an input file never is."""
    inputs = [Path(p) for p in inputs]
    out_html = Path(out_html)
    out_md = out_html.with_suffix(".md")
    _check_outputs(inputs, out_html, out_md, force)

    inp: Inputs = collect_inputs(inputs)
    sps = speedups(inp.manifests, inp.runs)
    sections = all_sections(inp, sps)
    summary = cards(inp, sps)
    models = sorted({m.name for m in inp.manifests} or {text(r.data.get("model")) for r in inp.runs})
    title = title or f"edgeq report: {', '.join(models) or 'benchmarks'}"
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sub = (f"Generated {now} by edgeq {__version__} from {len({p.resolve() for p in inputs})} input file(s): "
           f"{len(inp.manifests)} manifest(s), {len(inp.runs)} run(s), {len(inp.fleets)} fleet result(s).")

    write_all([(out_md, to_markdown(title, sub, summary, sections)),
               (out_html, to_html(title, sub, summary, sections))])
    return ReportResult(out_html, out_md, len(inp.manifests), sum(not r.failed for r in inp.runs),
                        sum(r.failed for r in inp.runs), len(inp.fleets),
                        sum(1 for s in sections for b in s.blocks if b[0] == "img"), tuple(sps))
