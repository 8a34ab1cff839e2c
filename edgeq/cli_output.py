"""What the CLI prints: tables and summary lines for each command's result (the --json path prints
the result itself). Commands in cli.py parse, make one library call, and hand the result here."""

from __future__ import annotations

import json
import sys

import click


def emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def table(title: str, columns: list[str], rows: list[list]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*["" if v is None else str(v) for v in r])
    Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160).print(t)


def fmt(x, digits=4):
    return "n/a" if x is None else f"{x:.{digits}f}"


def print_convert(result) -> None:
    m = result.manifest
    if m.get("plan"):
        rows = plan_rows(m["plan"]["ops"])
        if rows:  # an all-int8 plan is said by the summary line alone
            device = m["plan"].get("device")
            table(f"Precision plan {f'for {device}' if device else '(no device)'} (ops not int8)",
                  ["#", "op", "precision", "runs on", "reason"], rows)
        click.echo(f"plan: {m['plan']['summary']}")
    if m.get("size_goal"):
        print_size_goal(m["size_goal"])
    if m.get("optimize"):
        print_optimize(m["optimize"])
    if m.get("budget"):
        print_budget(m["budget"])
    if m["source"].get("description"):
        click.echo(f"source: {m['source']['description']}")
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(m["op_summary"].items()))
    click.echo(f"ops by precision: {counts}")
    if m.get("fidelity"):
        table(f"Fidelity vs float ({m['fidelity']['samples']} {m['fidelity'].get('inputs', 'held-out')} samples)",
              ["output", "cosine", "rel L2", "max abs", "top-1 agree"],
              [row for o in m["fidelity"]["outputs"] for row in
               [[o["name"], fmt(o["cosine"]), fmt(o["rel_l2"]), fmt(o["max_abs"]), fmt(o["top1_agreement"], 3)]]
               + [[f"  {o['name']}[{p['start']}:{p['stop']}]", fmt(p["cosine"]), fmt(p["rel_l2"]), "", ""]
                  for p in o.get("parts", ())]])
    fs = m.get("fidelity_source")
    if fs:
        twin = " held-out samples; int8: the twin judged above" if fs.get("quantized_model") else " samples"
        table(f"Fidelity vs the {fs['reference']} model ({fs['quantized']['samples']}{twin})",
              ["output", "float .tflite cosine", "int8 cosine", "int8 top-1 agree"],
              [[q["name"], fmt(f["cosine"]), fmt(q["cosine"]), fmt(q["top1_agreement"], 3)]
               for f, q in zip(fs["float"]["outputs"], fs["quantized"]["outputs"])])
    v = m.get("verification")
    if v and v.get("delegation"):
        d = v["delegation"]
        click.echo(f"ran under {v['runtime']}: {d['delegated']}/{d['nodes']} nodes delegated in "
                   f"{d['partitions']} partition(s)" + (f"; builtin kernels: {', '.join(d['builtin_ops'][:6])}"
                                                         if d["builtin_ops"] else ""))
    c = m.get("calibration") or {}
    if c.get("kind") not in (None, "none", "random"):
        judged = c.get("judged_model_count")
        click.echo(f"calibration: {c['count']} samples; fidelity judged on {c['eval_count']} held-out samples"
                   + (f" by a twin calibrated on the other {judged} (too few samples for both: the written model "
                      "is calibrated on all of them)" if judged is not None else ""))
    s = m["sizes"]
    for w in result.warnings:
        click.secho(f"warning: {w}", fg="yellow", err=True)
    size = _size_ratio(s["ratio"], "float")
    if s.get("source_bytes"):  # a float16 or sparse .tflite: against the file given too
        size += f"; {_size_ratio(s['source_bytes'] / max(s['quantized_bytes'], 1), 'the file given')}"
    click.echo(f"wrote {result.output} ({s['quantized_bytes']:,} bytes, {size}) and {result.manifest_path}")


def _size_ratio(ratio: float, than: str) -> str:
    # below 1 (a tiny model's quantization overhead, a source already stored small) it is larger
    return f"{ratio:.2f}x smaller than {than}" if ratio >= 1 else f"{1 / ratio:.2f}x larger than {than}"


def plan_rows(ops: list[dict]) -> list[list]:
    """The plan table's rows (ops not int8), one per op kind with the same precision, placement and
    reason, listing its op indices (plan.grouped_entries)."""
    from .plan import grouped_entries, index_list

    off = [e for e in ops if e["precision"] not in ("int8", "other")]
    return [[index_list([e["index"] for e in es]), *key]
            for key, es in grouped_entries(off, ("op", "precision", "placement", "reason"))]


def print_size_goal(g: dict) -> None:
    """--max-size: each scheme tried (most accurate first), its size and held-out fidelity."""
    table(f"--max-size {g['max_bytes'] / 1e6:.2f} MB: schemes tried, most accurate first",
          ["scheme", "MB", "worst cosine (held-out)", "fits"],
          [[s["scheme"], f"{s['bytes'] / 1e6:.2f}", fmt(s["cosine"]), "yes" if s["bytes"] <= g["max_bytes"] else "no"]
           for s in g["tried"]])
    click.echo(f"size goal: chose {g['chosen']}" + (f" ({g['why']})" if g.get("why") else ""))


def print_optimize(o: dict) -> None:
    """The accuracy level: each step, what it changed and its error before/after on calibration samples."""
    from .level_summary import level_lines, level_table

    steps = level_table(o)
    if steps is not None:
        table(*steps)
    for line in level_lines(o):
        click.echo(line)


def print_budget(b: dict) -> None:
    """The accuracy target: met as converted, or the budget loop's probes and the moves it kept."""
    if b.get("applied") is False:
        click.echo(f"fidelity floor: not applied ({b.get('why')})")
        return
    reqs = "; ".join(f"{r['output']} {r['metric']} {'<=' if r['metric'] == 'rel_l2' else '>='} {r['bound']:g}"
                     for r in b.get("requirements", []))
    title = "fidelity floor" if b.get("floor") else "accuracy budget"
    if b.get("loop"):
        table(f"Budget loop ({title}: {reqs})", ["step", "plan probed", "float", "hybrid", b["metric"], "bytes", "met"],
              [[s["step"], s.get("probe", ""), s.get("float", 0), s.get("hybrid", 0), fmt(s["value"]), s["bytes"],
                "yes" if s.get("met") else "no"] for s in b["steps"]])
        if b.get("moves"):
            # int4 layers measured alone at 8 bits carry their gain; the others the noise they ranked by.
            table("Moves kept (tier 1 weight-less, 2 matmuls; most rounding noise first; int4 layers: "
                  "gain alone at 8 bits, most per byte first)",
                  ["what", "tier", "ops", "noise / gain"],
                  [[mv["what"], mv["tier"], len(mv["ops"]),
                    f"+{mv['gain']:.4f}" if mv.get("gain") is not None else fmt(mv["noise"])] for mv in b["moves"]])
        moved = b.get("moved", {})
        click.echo(f"{title}: met after moving {moved.get('ops', 0)} ops ({moved.get('float', 0)} float, "
                   f"{moved.get('hybrid', 0)} hybrid) in {b.get('probes')} probes, {b.get('seconds')} s")
    else:
        click.echo(f"{title}: {reqs}: met as converted ({b['metric']} {fmt(b['steps'][0]['value'])})")
    for line in _met_by_bound(b):
        click.echo(line)


def _met_by_bound(b: dict) -> list[str]:
    """A met floor whose top-1 is itself below the bound (met by its upper confidence bound, on few
    samples: BirdNET with --class-output printed "top1 >= 0.9 ... met" beside top-1 0.842 on 19)."""
    if not b.get("met") or not b.get("steps"):
        return []
    chosen = next((s for s in b["steps"] if s.get("step") == b.get("chosen_step")), b["steps"][0])
    out = []
    for r in b.get("requirements", []):
        v = (chosen.get("values") or {}).get(r["output"])
        if r.get("upper_confidence_bound") and isinstance(v, (int, float)) and v < r["bound"]:
            out.append(f"{r['output']} {r['metric']} {v:.3f} is below {r['bound']:g}, met within sampling error "
                       "(its 95% upper confidence bound on these few held-out samples): give more data for a "
                       "firm answer")
    return out


def print_bench(r: dict) -> None:
    s = r["runs"]
    rt = r["runtime"]
    table(f"{r['model']} on {r.get('host') or r['device']['machine']} — {rt['name']} {rt['version']}, "
          f"{r['threads']} thread(s), delegate {r['delegate']}" + (" (EMULATED)" if r.get("emulated") else ""),
          ["init ms", "first ms", "warmup avg ms", "runs", "min", "median", "mean", "p95", "max", "std",
           "peak RSS MB"],
          [[fmt(r["init_ms"], 2), fmt(r["first_inference_ms"], 3), fmt(r["warmup"]["avg_ms"], 3), s["count"],
            fmt(s["min_ms"], 3), fmt(s["median_ms"], 3), fmt(s["mean_ms"], 3), fmt(s["p95_ms"], 3),
            fmt(s["max_ms"], 3), fmt(s["std_ms"], 3), fmt(r["memory_mb"]["peak_rss"], 1)]])
    source = r.get("input_source")
    if source:
        n = r.get("input_samples")
        what = r.get("inputs_file") or ""
        click.echo(f"inputs: {source}" + (f" ({what}{', ' if what else ''}{n} samples)" if n and n > 1 else
                                          f" ({what})" if what else ""))
    for label, cov in (("", r.get("delegate_coverage")), ("app ", (r.get("app") or {}).get("delegate_coverage"))):
        if cov:
            click.echo(f"{label}delegate coverage: {coverage_text(cov)}")


def coverage_text(cov: dict) -> str:
    nodes = (f"{cov.get('delegated')}/{cov.get('total')} nodes" if cov.get("total") is not None
             else "node count not logged")
    execution = {"none": "NOT EXECUTED by the delegate: everything ran on the CPU", "complete": "complete",
                 "partial": f"partial ({cov.get('kernels') or '?'} delegate kernels)"}.get(cov.get("execution"))
    return f"{nodes} on {cov.get('delegate')}" + (f", {execution}" if execution else "")


def print_profile(r: dict) -> None:
    print_bench(r)
    if r.get("app_vs_benchmark"):
        table("app vs benchmark_model", ["metric", "benchmark_model", "app", "diff ms", "diff %"],
              [[k, fmt(v.get("benchmark_model"), 3), fmt(v.get("app"), 3), fmt(v.get("diff_ms"), 3),
                fmt(v.get("diff_pct"), 1)] for k, v in r["app_vs_benchmark"].items()])


def print_flash(r: dict) -> None:
    click.echo(f"{r['action']}: {r['host']} slot {r['slot']} now at {r['version']} "
               f"(previous: {r['previous'] or 'none'}) in {r['path']}")
    for n in r.get("notes", []):
        click.echo(f"note: {n}")


def print_demo(r: dict, runs: int) -> None:
    print_convert(r["convert_result"])
    rows = [[name, b["threads"], fmt(b["runs"]["median_ms"], 4), fmt(b["runs"]["p95_ms"], 4), f"{b['model_bytes']:,}",
             fmt(b["memory_mb"]["peak_rss"], 1)] for name, b in r["bench"].items()]
    table(f"Latency on this host ({r['host']}, {runs} runs)",
          ["model", "threads", "median ms", "p95 ms", "bytes", "peak RSS MB"], rows)
    click.echo(r["summary"])


def print_fleet(result) -> None:
    from rich.console import Console
    Console(soft_wrap=True).print(result.table())
