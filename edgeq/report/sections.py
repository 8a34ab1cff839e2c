"""What the report says: its sections, built once and rendered to both HTML and Markdown (render.py),
so the two outputs cannot drift apart.

A block is ("p", text) | ("table", headers, rows) | ("img", base64 PNG, alt text); the alt text
repeats the chart's key numbers, which is what the Markdown shows in the chart's place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from .charts import budget_figure, budget_steps, latency_figure, png_b64, speed_size_figure
from .fields import NA, as_list, fmt_bytes, fmt_ms, fmt_num, get, num, text
from .inputs import Inputs, Manifest, Run, SpeedUp
from ..plan import grouped_entries, index_list

MODEL_PREFIX = "Model: "  # render.py frames a model's sections (up to the next level-2 heading) together


@dataclass(frozen=True)
class Section:
    title: str
    blocks: tuple
    level: int = 2


def _kv(rows: list[tuple[str, Any]]):
    return ("table", ("field", "value"), [(k, text(v)) for k, v in rows])


def _io_row(t: dict) -> str:
    q = ""
    if t.get("scale") is not None:
        q = f" scale={fmt_num(t.get('scale'), '.4g')} zp={text(t.get('zero_point'))}"
    shape = t.get("shape")
    shape_s = "×".join(str(x) for x in shape) if isinstance(shape, list) else text(shape)
    return f"{text(t.get('name'))}: {text(t.get('dtype'))} [{shape_s}]{q}"


def _dict(d: dict, key: str) -> dict:
    return d.get(key) if isinstance(d.get(key), dict) else {}


def _measured_ranges(d: dict) -> str | None:
    """'ranges=RULE (measured, --optimize LEVEL)' when the level's range selection is in the written
    model: the rule of the last kept step that chose one (`ranges`, or `equalize`, which measures
    them again on the equalized model), refined per tensor if `refine_ranges` was kept."""
    o = d.get("optimize")
    if not isinstance(o, dict) or not o.get("ran"):
        return None
    if o.get("superseded") and "judged_model_count" in _dict(d, "calibration"):
        return None  # the budget loop's model, recalibrated on every sample: not the level's ranges
    rule, refined = None, False
    for s in as_list(o.get("steps")):
        if not isinstance(s, dict) or not s.get("kept"):
            continue
        detail = _dict(s, "detail")
        if s.get("step") == "ranges":
            rule = detail.get("chosen") or rule
        elif s.get("step") == "equalize":
            rule = _dict(detail, "ranges").get("chosen") or rule
        elif s.get("step") == "refine_ranges":
            refined = True
    if rule is None and not refined:
        return None
    what = (text(rule) if rule else "the quantizer's own") + (", refined per tensor" if refined else "")
    return f"ranges={what} (measured, --optimize {text(o.get('level'))})"


def _calibration_fields(d: dict, cal: dict) -> list[str]:
    """kind, source, count, seed and the ranges: where the level measured them, its rule instead of
    --calibration's (range_method), which was not what the written model's ranges came from."""
    chosen = _measured_ranges(d)
    fields = [chosen if k == "range_method" and chosen else f"{k}={text(cal.get(k))}"
              for k in ("kind", "source", "count", "seed", "range_method") if k in cal]
    pixels = cal.get("pixels")
    if isinstance(pixels, dict) and pixels.get("preprocess"):  # how photos became inputs (a device app must match)
        scale = (f" (x - {_listed(pixels.get('mean'))}) / {_listed(pixels.get('std'))}"
                 if "mean" in pixels and "std" in pixels else "")
        fields.append(f"pixels={text(pixels['preprocess'])}{scale}")
    return fields


def _listed(v) -> str:
    vals = [f"{x:g}" for x in as_list(v) if isinstance(x, (int, float))]
    return vals[0] if len(vals) == 1 else "[" + ", ".join(vals) + "]"


def _model_section(m: Manifest) -> Section:
    d = m.data
    cal = _dict(d, "calibration")
    f, q = m.sizes
    info = [
        ("manifest", m.path.name), ("created", d.get("created")),
        ("output", get(d, "output", "path")), ("output size", fmt_bytes(get(d, "output", "bytes"))),
        ("output sha256", str(get(d, "output", "sha256") or NA)[:16]),
        ("source", get(d, "source", "path")), ("source format", get(d, "source", "format")),
        ("float size", fmt_bytes(f)), ("scheme", d.get("scheme")), ("device profile", d.get("device")),
        ("size ratio", (f"{f / q:.2f}× smaller" if f >= q else f"{q / f:.2f}× larger") if f and q else NA),
        ("calibration", ", ".join(_calibration_fields(d, cal)) or NA),
    ]
    for side in ("inputs", "outputs"):
        info.append((side, "; ".join(_io_row(t) for t in as_list(get(d, "io", side)) if isinstance(t, dict)) or NA))
    summ = d.get("op_summary")
    if isinstance(summ, dict):
        info.append(("ops by precision", ", ".join(f"{k}: {text(v)}" for k, v in summ.items())))
    warns = [str(w) for w in as_list(d.get("warnings"))]
    return Section(f"{MODEL_PREFIX}{m.name} ({m.scheme})", (_kv(info),) + tuple(("p", f"Warning: {w}") for w in warns))


# Plans up to this long list every op; longer ones a row per op kind, precision and reason (MiniLM
# int8 has 1272 ops: 1272 rows hid the few that were not int8).
PLAN_OPS_LISTED = 80


def _plan_section(m: Manifest) -> Section:
    plan_d = _dict(m.data, "plan")  # plan.Plan.to_json(): {"summary", "accelerator", "ops": [...], ...}
    plan = [r for r in as_list(plan_d.get("ops")) if isinstance(r, dict)]
    if not plan:
        return Section("Precision plan",
                       (("p", "No precision plan recorded (the converter applied one scheme to every op)."),), 3)
    heads = ("#", "op", "output tensor", "precision", "reason", "decided by")
    placed = bool(plan_d.get("accelerator"))  # CPU vs accelerator only matters when there is one
    if len(plan) <= PLAN_OPS_LISTED:
        rows = [tuple(text(r.get(k)) for k in ("index", "op", "output", "precision", "reason", "source"))
                + ((text(r.get("placement")),) if placed else ()) for r in plan]
    else:  # one row per op kind with the same precision, reason and decider
        keys = ("op", "precision", "reason", "source") + (("placement",) if placed else ())
        rows = []
        shown = [{**e, **{k: text(e.get(k)) for k in keys}} for e in plan]  # hashable, as the cells show them
        for key, entries in grouped_entries(shown, keys):
            ix = [e.get("index") for e in entries]
            index = (index_list(ix) if all(isinstance(i, int) for i in ix) else
                     ", ".join(text(i) for i in ix[:3]) + (f", ... ({len(ix)} ops)" if len(ix) > 3 else ""))
            output = text(entries[0].get("output")) if len(entries) == 1 else f"{len(entries)} tensors"
            rows.append((index, text(key[0]), output) + tuple(text(k) for k in key[1:]))
    blocks = [("table", heads + (("placement",) if placed else ()), rows)]
    if plan_d.get("summary"):
        blocks.insert(0, ("p", f"{plan_d['summary']}" + (f" (target: {text(plan_d.get('device'))}, "
                                                         f"accelerator {plan_d['accelerator']})" if placed else "")))
    return Section("Precision plan", tuple(blocks), 3)


MOVED_LISTED = 4  # ops named per budget step in the table; the rest are counted


def _budget_section(m: Manifest) -> Section | None:
    budget = m.data.get("budget")
    if not isinstance(budget, dict):
        return None
    title = "Fidelity floor" if budget.get("floor") is True else "Accuracy budget"
    if budget.get("applied") is False:  # the floor was skipped (--no-floor, random inputs, nothing held out)
        why = text(budget.get("why"))
        return Section(title, (("p", f"{title} not applied: {why}."),), 3)
    steps = [s for s in as_list(budget.get("steps")) if isinstance(s, dict)]
    met = {"True": "met", "False": "NOT met"}.get(str(budget.get("met")), NA)
    final = budget.get("final_drop")
    metric = text(budget.get("metric"))
    blocks: list = [("p", f"{title}: max {metric} drop {fmt_num(budget.get('max_drop'), '.4g')} — {met}"
                          + (f" (final drop {fmt_num(final, '.4f')})." if num(final) is not None else "."))]
    fig = budget_figure(m)
    if fig is not None:  # the alt text carries the drops the chart draws
        drops = " → ".join(fmt_num(s["drop"], ".4f") for s in budget_steps(m))
        blocks.append(("img", png_b64(fig), f"{title} chart for {m.name}: {metric} drop per step {drops}"))
    if steps:
        blocks.append(("table", ("step", "ops moved", metric, "drop", "size"),
                       [(text(s.get("step")), _moved_text(s.get("moved")),
                         fmt_num(next((s[k] for k in ("value", metric, "cosine") if k in s), None), ".4f"),
                         fmt_num(s.get("drop"), ".4f"), fmt_bytes(s.get("bytes"))) for s in steps]))
    refused = [str(x) for x in as_list(budget.get("refused"))]
    if refused:
        blocks.append(("p", "Could not move (device constraints): " + "; ".join(refused)))
    return Section(title, tuple(blocks), 3)


def _moved_text(moved) -> str:
    """A step's plan: how many ops it moves, the first few named (a plan may move hundreds)."""
    if not isinstance(moved, list):
        return text(moved)
    if not moved:
        return "none"
    named = "; ".join(str(x) for x in moved[:MOVED_LISTED])
    return f"{len(moved)}: {named}" + (f"; … {len(moved) - MOVED_LISTED} more" if len(moved) > MOVED_LISTED else "")


def _fidelity_section(m: Manifest) -> Section:
    fid = _dict(m.data, "fidelity")
    outs = [o for o in as_list(fid.get("outputs")) if isinstance(o, dict)]
    if not outs:
        return Section("Fidelity", (("p", "No fidelity measured (convert with calibration data to get it)."),), 3)
    return Section("Fidelity", (
        ("p", f"Compared with the float model on {text(fid.get('samples'))} samples."),
        ("table", ("output", "cosine", "rel. L2", "max abs", "top-1 agreement"),
         [(text(o.get("name")), fmt_num(o.get("cosine"), ".4f"), fmt_num(o.get("rel_l2"), ".4f"),
           fmt_num(o.get("max_abs"), ".4g"), fmt_num(o.get("top1_agreement"), ".3f")) for o in outs])), 3)


def _level_section(m: Manifest) -> Section | None:
    """The accuracy level (--optimize): each step, what it changed, its error before/after on the judging
    calibration samples and whether it was kept; the same table convert prints."""
    o = m.data.get("optimize")
    if not isinstance(o, dict):
        return None
    from ..level_summary import level_lines, level_table

    try:
        steps, lines = level_table(o), level_lines(o)
    except Exception:  # a manifest edgeq did not write this way: say so rather than fail the whole report
        return Section("Accuracy level", (("p", "Recorded, but not in a form this report reads."),), 3)
    blocks: list = []
    if steps is not None:
        title, heads, rows = steps
        blocks += [("p", title + "."), ("table", tuple(heads), [tuple(text(v) for v in r) for r in rows])]
    blocks += [("p", line) for line in lines]
    return Section("Accuracy level", tuple(blocks or [("p", "No accuracy level ran (--optimize none).")]), 3)


def manifest_sections(m: Manifest) -> list[Section]:
    return [s for s in (_model_section(m), _plan_section(m), _level_section(m), _budget_section(m),
                        _fidelity_section(m)) if s]


RUN_HEADERS = ("device", "precision", "runner · runtime", "threads · delegate",
               "runs", "median ms", "p95 ms", "mean ± std ms", "init ms", "peak RSS MB", "governor, temp.")


def _runtime(d: dict) -> str:
    rt = get(d, "runtime", "name")
    return f"{rt} {text(get(d, 'runtime', 'version'))}" if rt else NA


def _run_row(r: Run) -> tuple:
    d = r.data
    cov = d.get("delegate_coverage")
    cov_s = f" ({text(cov.get('delegated'))}/{text(cov.get('total'))} ops)" if isinstance(cov, dict) else ""
    extra = []
    if d.get("governor"):
        extra.append(str(d["governor"]))
    if num(d.get("temperature_c")) is not None:
        extra.append(f"{d['temperature_c']:.0f} °C")
    return (r.device, r.precision, f"{text(d.get('runner') or 'local')} · {_runtime(d)}",
            f"{text(d.get('threads'))} · {text(d.get('delegate'))}{cov_s}",
            text(get(d, "runs", "count")), fmt_ms(r.median), fmt_ms(get(d, "runs", "p95_ms")),
            f"{fmt_ms(get(d, 'runs', 'mean_ms'))} ± {fmt_ms(get(d, 'runs', 'std_ms'))}",
            fmt_num(d.get("init_ms"), ".1f"), fmt_num(get(d, "memory_mb", "peak_rss"), ".1f"),
            ", ".join(extra) or NA)


def latency_sections(manifests: list[Manifest], runs: list[Run], sps: list[SpeedUp]) -> list[Section]:
    ok = [r for r in runs if not r.failed]
    blocks: list = []
    if ok:
        fig, labels = latency_figure(ok)
        if fig is not None:  # the alt text repeats the drawn medians for screen readers and tests
            alt = "Latency box plot; " + "; ".join(f"{r.device} {r.precision}: {t}" for r, t in labels)
            blocks.append(("img", png_b64(fig), alt))
        blocks.append(("table", RUN_HEADERS, [_run_row(r) for r in ok]))
    else:
        blocks.append(("p", "No benchmark results given (add edgeq bench/profile --json output)."))
    out = [Section("Latency", tuple(blocks))]

    blocks = []
    fig = speed_size_figure(manifests, sps)
    if fig is not None:
        blocks.append(("img", png_b64(fig), "Size and speed-up chart"))
    sized = [m for m in manifests if all(m.sizes)]
    if sized:
        blocks.append(("table", ("model", "scheme", "float size", "converted size", "size ratio"),
                       [(m.name, m.scheme, fmt_bytes(m.sizes[0]), fmt_bytes(m.sizes[1]),
                         f"{m.sizes[0] / m.sizes[1]:.2f}×") for m in sized]))
    if sps:
        blocks.append(("table", ("device", "model", "precision", "float median ms", "converted median ms",
                                 "speed-up"),
                       [(s.device, s.model, s.precision, fmt_ms(s.float_median_ms),
                         fmt_ms(s.quant_median_ms), f"{s.speedup:.2f}×") for s in sps]))
    else:
        blocks.append(("p", "No speed-up: it needs the float model benched on the same device as a "
                            "converted one (bench the float .tflite that the manifest names as source)."))
    out.append(Section("Speed-up and size (float vs converted)", tuple(blocks)))
    return out


def fleet_sections(fleets: list[tuple[Path, dict]], runs: list[Run]) -> list[Section]:
    out = []
    for path, f in fleets:
        rows = []
        for dev in as_list(f.get("devices")):
            if not isinstance(dev, dict):
                continue
            res = _dict(dev, "result")
            run = next((r for r in runs if r.data is res), None)
            err = dev.get("error") or res.get("error")
            rows.append((text(dev.get("name")), text(dev.get("host")), text(dev.get("profile")),
                         text(dev.get("status")), run.precision if run else NA,
                         fmt_ms(get(res, "runs", "median_ms")), fmt_ms(get(res, "runs", "p95_ms")),
                         text(get(res, "device", "cpu_model")),
                         f"{text(get(res, 'runtime', 'name'))} {text(get(res, 'runtime', 'version'))}"
                         if res.get("runtime") else NA, text(err) if err else "—"))
        ok = sum(1 for r in rows if r[3] == "ok")
        model = f.get("model") or next((r.data.get("model") for r in runs if r.path == path
                                        and r.data.get("model")), None) or path.name
        blocks = (("p", f"{path.name}: model {text(model)}, {ok} of {len(rows)} devices ok."),
                  ("table", ("device", "host", "profile", "status", "precision", "median ms", "p95 ms",
                             "CPU", "runtime", "error"), rows))
        out.append(Section(f"Fleet: {text(model)}", blocks))
    return out


def failed_sections(runs: list[Run]) -> list[Section]:
    bad = [r for r in runs if r.failed]
    if not bad:
        return []
    return [Section("Failed runs", (("table", ("device", "file", "kind", "error"),
                                     [(r.device, r.path.name, text(r.data.get("kind")), text(r.data.get("error")))
                                      for r in bad]),))]


def versions_section(manifests: list[Manifest], runs: list[Run]) -> Section:
    seen: dict[tuple[str, str], list[str]] = {}

    def add(comp, ver, where):
        if comp and ver:
            places = seen.setdefault((str(comp), str(ver)), [])
            if where not in places:
                places.append(where)

    add("edgeq (this report)", __version__, "report")
    for m in manifests:
        for comp, ver in _dict(m.data, "versions").items():
            add(comp, ver, f"convert: {m.name}")
        add("edgeq", m.data.get("edgeq_version"), f"convert: {m.name}")
    for r in runs:
        if r.failed:
            continue
        add(get(r.data, "runtime", "name"), get(r.data, "runtime", "version"), r.device)
        for k in ("python", "numpy"):
            add(f"{k} (device)", get(r.data, "device", k), r.device)
        dev = _dict(r.data, "device")
        if dev.get("system"):
            rel = dev.get("release") or dev.get("android_release")
            add("os (device)", f"{dev.get('system')} {text(rel)} {text(dev.get('machine'))}", r.device)
    rows = [(c, v, ", ".join(w)) for (c, v), w in sorted(seen.items())]
    return Section("Tool and runtime versions", (("table", ("component", "version", "where"), rows),))


def all_sections(inp: Inputs, sps: list[SpeedUp]) -> list[Section]:
    """Every section in page order: per model, latency and speed-up, fleets, failures, versions."""
    out = [s for m in inp.manifests for s in manifest_sections(m)]
    out += latency_sections(inp.manifests, inp.runs, sps)
    out += fleet_sections(inp.fleets, inp.runs)
    out += failed_sections(inp.runs)
    out.append(versions_section(inp.manifests, inp.runs))
    return out


def cards(inp: Inputs, sps: list[SpeedUp]) -> list[tuple[str, str]]:
    """The summary cards at the top: (value, what it is)."""
    out = [(str(len(inp.manifests)), "converted models"),
           (str(len({r.device for r in inp.runs if not r.failed})), "devices benched")]
    if sps:
        best = max(sps, key=lambda s: s.speedup)
        out.append((f"{best.speedup:.2f}×", f"best speed-up ({best.device}, {best.precision})"))
    sized = [m.sizes[0] / m.sizes[1] for m in inp.manifests if all(m.sizes)]
    if sized:
        out.append((f"{max(sized):.2f}×", "smaller than float"))
    cosines = [c for m in inp.manifests for o in as_list(get(m.data, "fidelity", "outputs"))
               if isinstance(o, dict) and (c := num(o.get("cosine"))) is not None]
    if cosines:
        out.append((f"{min(cosines):.4f}", "worst output cosine"))
    return out
