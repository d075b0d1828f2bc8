#!/usr/bin/env python3
"""Renders the JSON objects a benchmark prints (one per line on stdin) as Markdown tables:
an object with a "rows" list becomes one table with a column per key; any other object a
two-column table of its (flattened) measures. Other lines pass through unchanged."""
import json
import sys


def fmt(v):
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def flatten(obj, prefix=""):
    for k, v in obj.items():
        if isinstance(v, dict):
            yield from flatten(v, f"{prefix}{k}.")
        elif not isinstance(v, list):
            yield f"{prefix}{k}", v


def render(obj):
    rows = obj.get("rows")
    lines = []
    head = [(k, v) for k, v in flatten(obj)]
    if isinstance(rows, list) and rows:
        if head:
            lines.append(", ".join(f"{k} {fmt(v)}" for k, v in head))
            lines.append("")
        cols = list(dict(flatten(rows[0])))
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + " ---: |" * len(cols))
        for r in rows:
            flat = dict(flatten(r))
            lines.append("| " + " | ".join(fmt(flat.get(c, "")) for c in cols) + " |")
    else:
        lines.append("| measure | value |")
        lines.append("| --- | ---: |")
        lines.extend(f"| {k} | {fmt(v)} |" for k, v in head)
    return "\n".join(lines)


def main():
    for line in sys.stdin:
        text = line.strip()
        try:
            obj = json.loads(text) if text.startswith("{") else None
        except json.JSONDecodeError:
            obj = None
        print(render(obj) if isinstance(obj, dict) else line.rstrip("\n"))


if __name__ == "__main__":
    main()
