"""Rendering the sections: one self-contained HTML page (inline CSS, charts as data: URIs, no
scripts, no URLs) and a Markdown summary with the same tables and no images."""

from __future__ import annotations

import html
from typing import Any

from .sections import MODEL_PREFIX, Section

CSS = """
body{font:15px/1.45 "DejaVu Sans","Liberation Sans",Helvetica,Arial,sans-serif;color:#1d2330;
 background:#f4f6f9;margin:0}
main{max-width:1120px;margin:0 auto;padding:24px 28px 48px;background:#fff;min-height:100vh}
h1{font-size:26px;margin:0 0 4px}h2{font-size:20px;margin:34px 0 10px;padding-bottom:4px;
 border-bottom:2px solid #4c78a8}h3{font-size:16px;margin:22px 0 8px;color:#33415c}
.sub{color:#5c667a;margin:0 0 18px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:8px 0 6px}
.card{flex:1 1 160px;background:#eef3fa;border-radius:8px;padding:10px 14px}
.card b{display:block;font-size:22px;color:#1f4e89}.card span{font-size:12px;color:#5c667a}
table{border-collapse:collapse;width:100%;margin:8px 0 14px;font-size:13px}
th,td{border:1px solid #d9dee7;padding:4px 7px;text-align:left;vertical-align:top;overflow-wrap:break-word}
th{background:#e6ebf3;white-space:nowrap}.tw{overflow-x:auto}tr:nth-child(even) td{background:#f8f9fb}
img{max-width:100%;height:auto;display:block;margin:10px 0;border:1px solid #e3e6ec;border-radius:6px}
.model{border-left:4px solid #f58518;padding-left:14px;margin-top:10px}
footer{margin-top:36px;color:#8a93a3;font-size:12px}
"""

def _html_block(b) -> str:
    e = html.escape
    if b[0] == "p":
        return f"<p>{e(b[1])}</p>"
    if b[0] == "img":
        return f'<img src="data:image/png;base64,{b[1]}" alt="{e(b[2])}">'
    head = "".join(f"<th>{e(h)}</th>" for h in b[1])
    body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in b[2])
    return f'<div class="tw"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def to_html(title: str, sub: str, cards: list[tuple[str, str]], sections: list[Section]) -> str:
    e = html.escape
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title>",
             f"<style>{CSS}</style></head><body><main><h1>{e(title)}</h1><p class=\"sub\">{e(sub)}</p>",
             '<div class="cards">' + "".join(f"<div class=\"card\"><b>{e(v)}</b><span>{e(k)}</span></div>"
                                            for v, k in cards) + "</div>"]
    in_model = False
    for s in sections:
        if s.level == 2 and in_model:
            parts.append("</div>")
            in_model = False
        if s.title.startswith(MODEL_PREFIX):
            parts.append('<div class="model">')
            in_model = True
        parts.append(f"<h{s.level}>{e(s.title)}</h{s.level}>")
        parts += [_html_block(b) for b in s.blocks]
    if in_model:
        parts.append("</div>")
    parts.append(f"<footer>{e(sub)}</footer></main></body></html>")
    return "\n".join(parts)


def _md_text(v: Any) -> str:
    # Markdown renderers pass raw HTML through, and names/reasons come from input files
    return str(v).replace("<", "&lt;")


def _md_cell(v: Any) -> str:
    return _md_text(v).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_block(b) -> str:
    if b[0] == "p":
        return _md_text(b[1])
    if b[0] == "img":
        return f"*Chart in the HTML report: {_md_text(b[2])}.*"
    lines = ["| " + " | ".join(_md_cell(h) for h in b[1]) + " |", "|" + "---|" * len(b[1])]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b[2]]
    return "\n".join(lines)


def to_markdown(title: str, sub: str, cards: list[tuple[str, str]], sections: list[Section]) -> str:
    md = [f"# {_md_text(title)}", "", sub, ""]
    md += [f"- **{v}** {_md_text(k)}" for v, k in cards] + [""]
    for s in sections:
        md += ["#" * s.level + " " + _md_text(s.title), ""]
        md += [x for b in s.blocks for x in (_md_block(b), "")]
    return "\n".join(md).rstrip() + "\n"
