"""The run report card: what a run folder holds (config, environment, data, time per stage, loss
curves, evals, samples) as markdown and HTML with plots (PNG with matplotlib, the [report] extra;
plain SVG without it), for one run or several side by side."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl; a line that is not a whole JSON object (the last one,
    cut short by a crash) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


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
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="14">{title}</text>',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="black"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="black"/>',
    ]
    for i in range(5):
        y = y_min + y_span * i / 4
        x = x_min + x_span * i / 4
        parts.append(f'<text x="{left - 5}" y="{top + (1 - i / 4) * plot_h + 4:.1f}" text-anchor="end">{y:.3g}</text>')
        parts.append(f'<text x="{left + i / 4 * plot_w:.1f}" y="{top + plot_h + 16}" '
                     f'text-anchor="middle">{x:.0f}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 5}" text-anchor="middle">step</text>')
    parts.append(f'<text x="14" y="{top + plot_h / 2}" transform="rotate(-90 14 {top + plot_h / 2})" '
                 f'text-anchor="middle">{y_label}</text>')
    for index, (name, values) in enumerate(series.items()):
        color = colors[index % len(colors)]
        path = " ".join(xy(x, y) for x, y in values)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{path}"/>')
        parts.append(f'<text x="{left + plot_w - 5}" y="{top + 15 + 15 * index}" '
                     f'text-anchor="end" fill="{color}">{name}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


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


# --------------------------------------------------------------------------- report card


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def find_training_dir(run_dir: str | Path) -> Path:
    """The folder with metrics.jsonl: the run folder itself, or a speedrun's `pretrain/` (a base
    model's speedrun: `sft/`)."""
    run_dir = Path(run_dir)
    for candidate in (run_dir, run_dir / "pretrain", run_dir / "sft"):
        if (candidate / "metrics.jsonl").is_file() or (candidate / "config.json").is_file():
            return candidate
    raise ValueError(f"{run_dir}: no training run here (expected metrics.jsonl or pretrain/metrics.jsonl)")


def read_evals(run_dir: str | Path) -> list[dict[str, Any]]:
    """The eval summaries (`xiaolm eval ...` writes them to RUN/evals/*.json), sorted by name."""
    run_dir = Path(run_dir)
    files = sorted({*run_dir.glob("evals/*.json"), *run_dir.glob("pretrain/evals/*.json")})
    return [e for e in (_read_json(f) for f in files) if isinstance(e, dict) and e.get("kind") in ("mcq", "ppl")]


def collect_run(run_dir: str | Path) -> dict[str, Any]:
    """Everything a report card shows, from the files a run leaves in its folder."""
    run_dir = Path(run_dir)
    train_dir = find_training_dir(run_dir)
    return {
        "name": run_dir.resolve().name,
        "dir": run_dir,
        "train_dir": train_dir,
        "config": _read_json(train_dir / "config.json") or {},
        "run_info": _read_json(train_dir / "run_info.json") or {},
        "summary": _read_json(run_dir / "summary.json") or {},
        "metrics": read_metrics(train_dir),
        "evals": read_evals(run_dir),
    }


def _series(metrics: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    return [(m["step"], m[key]) for m in metrics if isinstance(m.get(key), (int, float))]


def _expert_series(metrics: list[dict[str, Any]]) -> list[dict[str, list[tuple[float, float]]]]:
    """Per MoE layer: {"expert i": [(step, fraction of tokens routed to expert i)]}."""
    layers: list[dict[str, list[tuple[float, float]]]] = []
    for m in metrics:
        for layer, loads in enumerate(m.get("expert_load") or []):
            while len(layers) <= layer:
                layers.append({})
            for expert, load in enumerate(loads):
                layers[layer].setdefault(f"expert {expert}", []).append((m["step"], load))
    return layers


def write_plots(runs: list[dict[str, Any]], out_dir: str | Path) -> list[str]:
    """loss, bits-per-byte and (for MoE runs) expert-load plots: PNG with matplotlib, else SVG.
    One run: its train and val curves; several: one line per run. Returns the file names."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    several = len(runs) > 1
    charts: list[tuple[str, str, str, dict[str, list[tuple[float, float]]]]] = []  # name, title, y, series
    loss: dict[str, list[tuple[float, float]]] = {}
    bpb: dict[str, list[tuple[float, float]]] = {}
    for run in runs:
        prefix = f"{run['name']} " if several else ""
        loss[prefix + "train"] = _series(run["metrics"], "loss")
        loss[prefix + "val"] = _series(run["metrics"], "val_loss")
        bpb[prefix + "val"] = _series(run["metrics"], "val_bpb")
    charts.append(("loss", "loss", "nats / token", {k: v for k, v in loss.items() if v}))
    charts.append(("bpb", "validation bits per byte", "bits / byte", {k: v for k, v in bpb.items() if v}))
    if not several:
        for layer, series in enumerate(_expert_series(runs[0]["metrics"])):
            charts.append((f"expert_load_{layer}", f"expert load, MoE layer {layer}", "fraction of tokens", series))
        charts.append(("aux_loss", "MoE load-balancing loss", "aux loss",
                       {"aux": _series(runs[0]["metrics"], "aux_loss")}))
    charts = [c for c in charts if any(c[3].values())]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the [report] extra is missing: plain SVG
        written = []
        for name, title, y_label, series in charts:
            (out_dir / f"{name}.svg").write_text(svg_line_chart(series, title, y_label))
            written.append(f"{name}.svg")
        return written
    written = []
    for name, title, y_label, series in charts:
        figure, axes = plt.subplots(figsize=(6.4, 3.6), dpi=100)
        for label, points in series.items():
            xs, ys = zip(*points)
            axes.plot(xs, ys, label=label, marker="o" if len(points) < 20 else None, markersize=3)
        axes.set_title(title)
        axes.set_xlabel("step")
        axes.set_ylabel(y_label)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(out_dir / f"{name}.png")
        plt.close(figure)
        written.append(f"{name}.png")
    return written


def eval_rows(evals: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(language-model rows, multiple-choice rows) for the report tables."""
    ppl = [{"eval": e["name"], "tokens": e["num_tokens"], "loss": e["loss"], "perplexity": e["perplexity"],
            "bits_per_byte": e["bpb"]} for e in evals if e["kind"] == "ppl"]
    mcq = []
    for e in evals:
        if e["kind"] != "mcq":
            continue
        # subjects, then categories in brackets, then the overall line
        named = [*e["subjects"].items(), *((f"[{name}]", s) for name, s in e["categories"].items())]
        for name, s in named:
            mcq.append({"eval": e["name"], "subject": name, "questions": s["num_questions"],
                        "accuracy": _pct(s["accuracy"]), "chance": _pct(s["chance"])})
        o = e["overall"]
        mcq.append({"eval": e["name"], "subject": "**overall**", "questions": o["num_questions"],
                    "accuracy": _pct(o["accuracy"]), "chance": _pct(o["chance"])})
    return ppl, mcq


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _last(metrics: list[dict[str, Any]], key: str) -> Any:
    values = [m[key] for m in metrics if key in m]
    return values[-1] if values else None


def render_report(run_dir: str | Path) -> Path:
    """Write RUN/report.md and RUN/report.html (with the plots beside them); return the markdown path."""
    run = collect_run(run_dir)
    out = Path(run_dir)
    plots = write_plots([run], out)
    summary, info, config = run["summary"], run["run_info"], run["config"]
    model, train = config.get("model", summary.get("model", {})), config.get("train", summary.get("train", {}))
    metrics = run["metrics"]
    lines = [f"# xiaolm run report: {run['name']}", ""]
    lines += ["## Model", ""]
    num_parameters = summary.get("num_parameters") or (count_parameters(model) if model else None)
    if num_parameters:
        lines.append(f"{num_parameters:,} parameters.")
    if model:
        lines += ["", markdown_table([{k: v for k, v in model.items()}])]
    lines += ["", "## Environment", "", markdown_table([{k: info.get(k) for k in
              ("git_commit", "xiaolm", "torch", "python", "device", "device_name", "num_threads", "precision",
               "precision_reason", "world_size") if k in info}])]
    if summary.get("corpus"):
        lines += ["", "## Data", "", f"Corpus `{summary['corpus']['path']}`:", "",
                  markdown_table(summary["corpus"]["sources"])]
    if summary.get("tokens"):
        lines += ["", markdown_table([{"split": k, **v} for k, v in summary["tokens"].items()])]
    if summary.get("timings_s"):
        lines += ["", "## Time per stage", "",
                  markdown_table([{"stage": k, "seconds": v} for k, v in summary["timings_s"].items()])]
    lines += ["", "## Training", ""]
    if train:
        lines.append(f"{_last(metrics, 'step') or 0} steps of {train.get('batch_size')} x {train.get('seq_len')} "
                     f"tokens (x{train.get('grad_accum_steps')} accumulation), lr {train.get('lr')}; "
                     f"{_last(metrics, 'tokens') or 0:,} tokens in {_last(metrics, 'elapsed_s') or 0:.0f} s.")
    tok_per_s = sorted(m["tok_per_s"] for m in metrics if "tok_per_s" in m)
    if tok_per_s:
        lines.append(f"Training throughput: median {tok_per_s[len(tok_per_s) // 2]:,.0f} tokens/s.")
    mfu = sorted(m["mfu"] for m in metrics if "mfu" in m)
    if mfu:
        lines.append(f"Model FLOPs utilisation: median {100 * mfu[len(mfu) // 2]:.1f}% of the measured "
                     f"{info.get('precision', '')} matmul peak.")
    val_rows = [{"step": m["step"], "val_loss": m["val_loss"], "val_bpb": m.get("val_bpb")}
                for m in metrics if "val_loss" in m]
    if val_rows and train.get("num_eval_batches"):
        lines += ["", f"Validation during training: the first {train['num_eval_batches']} batches of "
                      f"{train.get('batch_size')} x {train.get('seq_len')} tokens of the held-out set (on each "
                      "process), not all of it (`xiaolm eval ppl` measures it whole)."]
    lines += ["", markdown_table(val_rows), ""]
    lines += [f"![{Path(name).stem}]({name})" for name in plots]
    ppl, mcq = eval_rows(run["evals"])
    if ppl or mcq:
        lines += ["", "## Evals", ""]
        if ppl:
            lines += ["Language modelling on held-out text (bits-per-byte compares across tokenizers):", "",
                      markdown_table(ppl), ""]
        if mcq:
            lines += ["Multiple choice (accuracy against chance, the mean of 1 / number of options):", "",
                      markdown_table(mcq), ""]
    if summary.get("samples"):
        lines += ["", "## Samples", "",
                  "Prompt, then the model's continuation (temperature 0.8, top-p 0.95, seed 0):", ""]
        for sample in summary["samples"]:
            lines.append(f"- **{sample['prompt']}**{sample['completion'].replace(chr(10), ' ')}")
    for section in summary.get("extra_sections", []):  # written by later stages (e.g. speedrun's chat stages)
        lines += ["", f"## {section['title']}", "", section["markdown"]]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text, encoding="utf-8")
    (out / "report.html").write_text(markdown_to_html(text, f"xiaolm: {run['name']}"), encoding="utf-8")
    return out / "report.md"


def compare_runs(run_dirs: list[str | Path], out_dir: str | Path) -> Path:
    """Runs side by side: one column per run; loss and bpb curves overlaid. Writes compare.md/.html."""
    runs = [collect_run(d) for d in run_dirs]
    names = [r["name"] for r in runs]
    if len(set(names)) < len(names):  # same folder names: tell them apart by position
        for index, r in enumerate(runs):
            r["name"] = f"{index + 1}:{r['name']}"
    out = Path(out_dir)
    plots = write_plots(runs, out)

    def row(label: str, value: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
        return {"": label, **{r["name"]: value(r) for r in runs}}

    def model_field(key: str) -> Callable[[dict[str, Any]], Any]:
        return lambda r: r["config"].get("model", {}).get(key)

    rows = [
        row("parameters", lambda r: r["summary"].get("num_parameters")),
        row("hidden x layers", lambda r: f"{model_field('hidden_size')(r)} x {model_field('num_layers')(r)}"),
        row("vocab", model_field("vocab_size")),
        row("steps", lambda r: _last(r["metrics"], "step")),
        row("tokens", lambda r: _last(r["metrics"], "tokens")),
        row("train seconds", lambda r: _last(r["metrics"], "elapsed_s")),
        row("last train loss", lambda r: _last(r["metrics"], "loss")),
        row("val loss", lambda r: _last(r["metrics"], "val_loss")),
        row("val bits/byte", lambda r: _last(r["metrics"], "val_bpb")),
        row("device", lambda r: r["run_info"].get("device")),
        row("git commit", lambda r: (r["run_info"].get("git_commit") or "")[:10]),
    ]
    for kind, key, label in (("ppl", "bpb", "bits/byte"), ("mcq", "overall", "accuracy")):
        for name in sorted({e["name"] for r in runs for e in r["evals"] if e["kind"] == kind}):
            def value(r: dict[str, Any], name: str = name) -> Any:
                found = [e for e in r["evals"] if e["name"] == name]
                if not found:
                    return None
                return found[0]["bpb"] if kind == "ppl" else _pct(found[0]["overall"]["accuracy"])
            rows.append(row(f"{name} {label}", value))
    lines = ["# xiaolm runs compared", "", "Runs: " + ", ".join(f"`{r['dir']}`" for r in runs), "",
             markdown_table(rows), ""] + [f"![{Path(name).stem}]({name})" for name in plots]
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(text, encoding="utf-8")
    (out / "compare.html").write_text(markdown_to_html(text, "xiaolm: runs compared"), encoding="utf-8")
    return out / "compare.md"


def markdown_to_html(text: str, title: str) -> str:
    """The markdown these reports use (headings, tables, images, list items, paragraphs) as HTML."""
    import html
    import re

    def inline(s: str) -> str:
        s = html.escape(s)
        s = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", r'<img alt="\1" src="\2">', s)
        s = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", s)
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", s)

    body: list[str] = []
    table: list[list[str]] = []

    def flush_table() -> None:
        if table:
            head, rows = table[0], table[2:]
            body.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in rows)
                        + "</table>")
            table.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            table.append([c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
            continue
        flush_table()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.startswith("- "):
            body.append(f"<li>{inline(line[2:])}</li>")
        elif line.strip():
            body.append(f"<p>{inline(line)}</p>")
    flush_table()
    style = ("body{font-family:sans-serif;max-width:960px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def evals_dir(checkpoint_or_run: str | Path) -> Path:
    """Where evals of a model go: RUN/evals for a run folder or one of its checkpoints (the report
    card reads them there); MODEL/evals for a folder outside a run."""
    path = Path(checkpoint_or_run)
    if path.parent.name == "checkpoints":
        path = path.parent.parent
    return path / "evals"


def count_parameters(model_config: dict[str, Any]) -> int | None:
    """Parameters of a model config, built on the meta device (no memory, no init)."""
    import torch

    from xiaolm.config import ModelConfig, from_dict
    from xiaolm.model.transformer import Transformer

    try:
        config = from_dict(ModelConfig, model_config)
    except (TypeError, ValueError):  # a config from another version of xiaolm
        return None
    with torch.device("meta"):
        return Transformer(config).num_parameters()
