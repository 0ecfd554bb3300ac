"""`helip report`: results.json -> report.html with PNG plots and a gallery of mined pairs.

The report is one self-contained HTML page (gallery thumbnails inline) with the
plots written beside it as PNG files: a metrics table of every variant, zero-shot
accuracy per task, training-loss curves, and mined hard pairs next to their
targets so a reader can judge whether "hard" means what it should.
"""
from __future__ import annotations

import base64
import html
import io
import logging
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from PIL import Image

from ..errors import ConfigError
from ..io import save_text, save_with

try:
    import matplotlib
except ImportError as e:  # the application extra; the library does without it
    raise ConfigError(f"the report's plots need matplotlib ({e}); install helip's application extra: "
                      f"pip install 'helip[app]'.") from e
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger(__name__)

RETRIEVAL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


def _variants(results: Dict) -> List[str]:
    return [k for k, v in results.items() if isinstance(v, dict) and "zeroshot" in v]


def _save_fig(fig, path: Path) -> str:
    save_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path.name


def plot_zeroshot(results: Dict, path: Path) -> str:
    variants = _variants(results)
    tasks = list(results[variants[0]]["zeroshot"]) + ["mean"]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(tasks)), 3.6))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        vals = [results[v]["zeroshot"][t] for t in tasks[:-1]] + [results[v]["zeroshot_mean"]]
        ax.bar(np.arange(len(tasks)) + i * width, vals, width, label=v)
    ax.set_xticks(np.arange(len(tasks)) + width * (len(variants) - 1) / 2)
    ax.set_xticklabels(tasks, rotation=20, ha="right")
    ax.set_ylabel("top-1 accuracy (test)")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("Zero-shot classification")
    return _save_fig(fig, path)


def plot_losses(histories: Dict[str, List[dict]], path: Path) -> Optional[str]:
    if not any(histories.values()):
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for name, hist in histories.items():
        if not hist:
            continue
        steps = [h["step"] for h in hist]
        ax.plot(steps, [h["contrastive"] for h in hist], label=f"{name}: contrastive")
        if "hnml" in hist[0]:
            ax.plot(steps, [h["hnml"] for h in hist], "--", label=f"{name}: HNML (weighted)")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title("Continued training")
    return _save_fig(fig, path)


def _thumb(image: np.ndarray, scale: int = 3) -> str:
    im = Image.fromarray(np.asarray(image)).resize((image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def gallery_html(images: np.ndarray, captions: List[str], hard_indices: np.ndarray, hard_scores: np.ndarray,
                 n_targets: int = 8, n_hard: int = 4, seed: int = 0) -> str:
    """An HTML table: target thumbnail + caption, then its top hard pairs with their scores."""
    rng = np.random.default_rng(seed)
    rows = []
    for t in rng.choice(len(captions), size=min(n_targets, len(captions)), replace=False):
        cells = [f'<td class="target"><img src="{_thumb(images[t])}"><div>{html.escape(captions[t])}</div></td>']
        for j, s in zip(hard_indices[t][:n_hard], hard_scores[t][:n_hard]):
            if j < 0:
                continue
            cells.append(f'<td><img src="{_thumb(images[j])}"><div>{html.escape(captions[j])}</div>'
                         f'<div class="score">score {s:.3f}</div></td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return "<table class='gallery'>" + "".join(rows) + "</table>"


def metrics_table(results: Dict) -> str:
    variants = _variants(results)
    tasks = list(results[variants[0]]["zeroshot"])
    head = ["variant", "zero-shot mean"] + [f"zs: {t}" for t in tasks] + ["linear probe"] + list(RETRIEVAL_KEYS)
    body = []
    for v in variants:
        r = results[v]
        vals = [r["zeroshot_mean"]] + [r["zeroshot"][t] for t in tasks] + [r["linear_probe"]] + \
               [r["retrieval"][k] for k in RETRIEVAL_KEYS]
        body.append("<tr><th>" + html.escape(v) + "</th>" + "".join(f"<td>{100 * x:.1f}</td>" for x in vals) + "</tr>")
    return ("<table class='metrics'><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
            + "".join(body) + "</table>")


_CSS = """body{font-family:sans-serif;margin:2em;max-width:1200px}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 6px;font-size:13px}
.metrics td{text-align:right}.gallery td{vertical-align:top;width:150px}.gallery .target{background:#eef}
.gallery img{image-rendering:pixelated;width:96px}.score{color:#666}"""


def write_report(out: Path, results: Dict, histories: Optional[Dict[str, List[dict]]] = None,
                 train_split=None, hard=None) -> Path:
    """Write ``out/report.html`` and its PNG plots; returns the HTML path."""
    out = Path(out)
    parts = ["<h1>helip report</h1>"]
    meta = results.get("meta", {})
    if meta:
        parts.append(f"<p>Model <code>{html.escape(str(meta.get('model')))}</code>, seed {meta.get('seed')}, "
                     f"numbers on the <b>{html.escape(str(meta.get('reported_split', 'test')))}</b> split "
                     f"(accuracies and recalls in %).</p>")
    parts.append("<h2>Metrics</h2>" + metrics_table(results))
    parts.append(f"<img src='{plot_zeroshot(results, out / 'zeroshot.png')}'>")
    if histories:
        name = plot_losses(histories, out / "losses.png")
        if name:
            parts.append(f"<h2>Training</h2><img src='{name}'>")
    if train_split is not None and hard is not None:
        parts.append("<h2>Mined hard pairs</h2><p>Each row: a target (shaded), then its best hard pairs.</p>")
        parts.append(gallery_html(train_split.images, train_split.captions, hard.indices, hard.scores))
    if meta.get("timings_seconds"):
        parts.append("<h2>Stage timings (s)</h2><pre>" + html.escape(str(meta["timings_seconds"])) + "</pre>")
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>helip report</title><style>{_CSS}</style>" \
           f"</head><body>{''.join(parts)}</body></html>\n"
    return save_text(out / "report.html", page)


# ---------------------------------------------------------------------------- benchmark results (helip eval --zeroshot ...)

BENCHMARK_FORMAT = "helip-eval/benchmarks-1"  # helip.evaluate.suite.RESULTS_FORMAT
# (task, metric key, label) of every column of the comparison table; the first per task is its headline
BENCHMARK_COLUMNS = {
    "zeroshot": [("top1", "top-1"), ("top5", "top-5"), ("mean_per_class_recall", "mean per-class recall")],
    "linear_probe": [("accuracy", "accuracy")],
    "retrieval": [("i2t_r1", "i2t R@1"), ("i2t_r5", "i2t R@5"), ("i2t_r10", "i2t R@10"),
                  ("t2i_r1", "t2i R@1"), ("t2i_r5", "t2i R@5"), ("t2i_r10", "t2i R@10")],
}
HEADLINE = {"zeroshot": ["top1"], "linear_probe": ["accuracy"], "retrieval": ["i2t_r1", "t2i_r1"]}
TASK_TITLES = {"zeroshot": "Zero-shot classification", "linear_probe": "Linear probe", "retrieval": "Retrieval"}


def is_benchmark(results: Dict) -> bool:
    return results.get("meta", {}).get("format") == BENCHMARK_FORMAT


def merge_results(items: List[tuple]) -> Dict:
    """Merge several results.json of one kind (``[(label, results)]``); clashing variant names get the label."""
    from ..errors import InputError

    for label, r in items:
        if not isinstance(r, dict) or not all(isinstance(v, dict) for v in r.values()):
            raise InputError(f"--results {label}: not a helip results.json (a JSON object of variants, each an "
                             f"object); pass the results.json that `helip eval` or `helip demo` wrote.")
    kinds = {is_benchmark(r) for _, r in items}
    if len(kinds) > 1:
        from ..errors import ConfigError

        raise ConfigError("--results mixes built-in-world and benchmark results; report them separately.")
    merged: Dict = {}
    names = [v for _, r in items for v in r if v != "meta"]
    for label, r in items:
        for v, body in r.items():
            if v == "meta":
                continue
            merged[f"{label}:{v}" if names.count(v) > 1 else v] = body
    merged["meta"] = dict(items[0][1].get("meta", {}))
    if len(items) > 1:
        merged["meta"]["sources"] = [label for label, _ in items]
    return merged


def _benchmark_variants(results: Dict) -> List[str]:
    return [k for k, v in results.items() if k != "meta" and isinstance(v, dict)]


def _datasets(results: Dict, task: str) -> List[str]:
    seen: List[str] = []
    for v in _benchmark_variants(results):
        for d in results[v].get(task, {}):
            if d not in seen:
                seen.append(d)
    return seen


def _value(results: Dict, v: str, task: str, d: str, key: str) -> Optional[float]:
    x = results[v].get(task, {}).get(d, {}).get(key)
    return None if x is None or (isinstance(x, float) and np.isnan(x)) else float(x)


def benchmark_table(results: Dict, markdown: bool = False) -> str:
    """Variants as rows, every (task, dataset, metric) as a column, in %."""
    variants = _benchmark_variants(results)
    cols = [(t, d, k, f"{t.replace('_', ' ')} {d}: {label}") for t, spec in BENCHMARK_COLUMNS.items()
            for d in _datasets(results, t) for k, label in spec]
    cols = [c for c in cols if any(_value(results, v, c[0], c[1], c[2]) is not None for v in variants)]

    def cell(v, c):
        x = _value(results, v, c[0], c[1], c[2])
        return "-" if x is None else f"{100 * x:.2f}"

    if markdown:
        lines = ["| variant | " + " | ".join(c[3] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += ["| " + v + " | " + " | ".join(cell(v, c) for c in cols) + " |" for v in variants]
        return "\n".join(lines) + "\n"
    head = "<tr><th>variant</th>" + "".join(f"<th>{html.escape(c[3])}</th>" for c in cols) + "</tr>"
    body = "".join("<tr><th>" + html.escape(v) + "</th>" + "".join(f"<td>{cell(v, c)}</td>" for c in cols)
                   + "</tr>" for v in variants)
    return f"<table class='metrics'>{head}{body}</table>"


def _headline_entries(results: Dict, task: str) -> List[tuple]:
    return [(d, k, d if len(HEADLINE[task]) == 1 else f"{d} {dict(BENCHMARK_COLUMNS[task])[k]}")
            for d in _datasets(results, task) for k in HEADLINE[task]]


def plot_benchmark_task(results: Dict, task: str, path: Path) -> Optional[str]:
    """Per-dataset grouped bars, one bar per variant, of the task's headline metric."""
    entries = _headline_entries(results, task)
    if not entries:
        return None
    variants = _benchmark_variants(results)
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(entries) * max(1, len(variants)) / 2 + 2), 3.6))
    width = 0.8 / len(variants)
    x = np.arange(len(entries))
    for i, v in enumerate(variants):
        vals = [_value(results, v, task, d, k) for d, k, _ in entries]
        ax.bar(x + i * width, [100 * (y or 0) for y in vals], width, label=v)
    ax.set_xticks(x + width * (len(variants) - 1) / 2)
    ax.set_xticklabels([lab for _, _, lab in entries], rotation=20, ha="right")
    metric = {"zeroshot": "top-1 accuracy", "linear_probe": "test accuracy", "retrieval": "recall@1"}[task]
    ax.set_ylabel(f"{metric} (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title(TASK_TITLES[task])
    return _save_fig(fig, path)


def plot_benchmark_delta(results: Dict, baseline: str, path: Path) -> Optional[str]:
    """Before vs after: each variant's headline metrics minus the baseline's, in percentage points."""
    others = [v for v in _benchmark_variants(results) if v != baseline]
    entries = [(t, d, k, f"{t.replace('_', ' ')}: {lab}") for t in HEADLINE for d, k, lab in _headline_entries(results, t)]
    if not others or not entries:
        return None
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(entries) * len(others) / 2 + 2), 3.6))
    width = 0.8 / len(others)
    x = np.arange(len(entries))
    for i, v in enumerate(others):
        deltas = []
        for t, d, k, _ in entries:
            a, b = _value(results, v, t, d, k), _value(results, baseline, t, d, k)
            deltas.append(100 * (a - b) if a is not None and b is not None else 0.0)
        ax.bar(x + i * width, deltas, width, label=f"{v} - {baseline}")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x + width * (len(others) - 1) / 2)
    ax.set_xticklabels([lab for *_, lab in entries], rotation=25, ha="right")
    ax.set_ylabel("change (percentage points)")
    ax.legend(fontsize=8)
    ax.set_title(f"Before ({baseline}) vs after")
    return _save_fig(fig, path)


def write_benchmark_report(out: Path, results: Dict, baseline: Optional[str] = None) -> Path:
    """``out/report.html`` + ``out/comparison.md`` + per-task PNGs (+ delta.png against ``baseline``)."""
    out = Path(out)
    variants = _benchmark_variants(results)
    if not variants:
        from ..errors import InputError

        raise InputError("the results hold no evaluated variant.")
    baseline = baseline or variants[0]
    if baseline not in variants:
        from ..errors import ConfigError

        raise ConfigError(f"--baseline {baseline!r} is not one of the variants: {', '.join(variants)}.")
    parts = ["<h1>helip evaluation report</h1>",
             "<p>Accuracies and recalls in %. " + ", ".join(
                 f"<b>{html.escape(v)}</b>: <code>{html.escape(str(results[v].get('model')))}</code> "
                 f"<code>{html.escape(str(results[v].get('pretrained')))}</code>" for v in variants) + "</p>",
             "<h2>Comparison</h2>" + benchmark_table(results)]
    save_text(out / "comparison.md", benchmark_table(results, markdown=True))
    for task in HEADLINE:
        name = plot_benchmark_task(results, task, out / f"{task}.png")
        if name:
            parts.append(f"<h2>{TASK_TITLES[task]}</h2><img src='{name}'>")
    delta = plot_benchmark_delta(results, baseline, out / "delta.png")
    if delta:
        parts.append(f"<h2>Before vs after</h2><img src='{delta}'>")
    skipped = [(v, t, d, r.get("n_skipped")) for v in variants for t in HEADLINE
               for d, r in results[v].get(t, {}).items() if r.get("n_skipped")]
    if skipped:
        parts.append("<h2>Skipped images</h2><ul>" + "".join(
            f"<li>{html.escape(v)} {t} {html.escape(d)}: {n} images did not decode</li>" for v, t, d, n in skipped)
            + "</ul>")
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>helip evaluation</title><style>{_CSS}</style>" \
           f"</head><body>{''.join(parts)}</body></html>\n"
    return save_text(out / "report.html", page)
