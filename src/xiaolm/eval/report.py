"""The run report: markdown with loss curves drawn as SVG (no plotting library needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def svg_line_chart(series: dict[str, list[tuple[float, float]]], title: str, y_label: str,
                   width: int = 640, height: int = 320) -> str:
    """A plain SVG line chart of one or more (x, y) series sharing axes."""
    points = [p for values in series.values() for p in values]
    if not points:
        return ""
    x_min, x_max = min(p[0] for p in points), max(p[0] for p in points)
    y_min, y_max = min(p[1] for p in points), max(p[1] for p in points)
    x_span, y_span = (x_max - x_min) or 1.0, (y_max - y_min) or 1.0
    left, right, top, bottom = 60, 20, 30, 40
    plot_w, plot_h = width - left - right, height - top - bottom

    def xy(x: float, y: float) -> str:
        return f"{left + (x - x_min) / x_span * plot_w:.1f},{top + (1 - (y - y_min) / y_span) * plot_h:.1f}"

    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="14">{title}</text>',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="black"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="black"/>',
    ]
    for i in range(5):
        y = y_min + y_span * i / 4
        x = x_min + x_span * i / 4
        parts.append(f'<text x="{left - 5}" y="{top + (1 - i / 4) * plot_h + 4:.1f}" text-anchor="end">{y:.3g}</text>')
        parts.append(f'<text x="{left + i / 4 * plot_w:.1f}" y="{top + plot_h + 16}" text-anchor="middle">{x:.0f}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 5}" text-anchor="middle">step</text>')
    parts.append(f'<text x="14" y="{top + plot_h / 2}" transform="rotate(-90 14 {top + plot_h / 2})" '
                 f'text-anchor="middle">{y_label}</text>')
    for index, (name, values) in enumerate(series.items()):
        color = colors[index % len(colors)]
        path = " ".join(xy(x, y) for x, y in values)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{path}"/>')
        parts.append(f'<text x="{left + plot_w - 5}" y="{top + 15 + 15 * index}" text-anchor="end" fill="{color}">{name}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def write_curves(run_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Write loss.svg (train and val loss) and bpb.svg (val bits-per-byte); return their names."""
    metrics = read_metrics(run_dir)
    train = [(m["step"], m["loss"]) for m in metrics if isinstance(m.get("loss"), float)]
    val = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    bpb = [(m["step"], m["val_bpb"]) for m in metrics if "val_bpb" in m]
    written = []
    out_dir = Path(out_dir)
    if train or val:
        (out_dir / "loss.svg").write_text(svg_line_chart({"train": train, "val": val}, "loss", "nats / token"))
        written.append("loss.svg")
    if bpb:
        (out_dir / "bpb.svg").write_text(svg_line_chart({"val": bpb}, "validation bits per byte", "bits / byte"))
        written.append("bpb.svg")
    return written


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(k)) for k in keys) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value).replace("|", "\\|").replace("\n", " ")
