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

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from .io import save_text, save_with  # noqa: E402

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
