"""Small generated evaluation datasets in helip's and CLIP_benchmark's layouts (shared by the eval tests)."""
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "cyan"]
RGB = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230), "yellow": (235, 220, 50),
       "purple": (150, 60, 200), "orange": (245, 140, 30), "white": (240, 240, 240), "cyan": (60, 220, 225)}
TEMPLATES = ["a photo of a {c} thing.", "a {c} square.", "something {c}."]


def image(colour: str, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """A noisy square of ``colour`` on a dark random background: each image distinct, classes visible."""
    a = rng.integers(0, 60, size=(size, size, 3)).astype(np.int16)
    x0, y0 = rng.integers(0, size // 2, size=2)
    w = rng.integers(size // 4, size // 2)
    a[y0:y0 + w, x0:x0 + w] = np.asarray(RGB[colour]) + rng.integers(-20, 20, size=3)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def classification_items(n_classes=6, per_class=4, seed=0):
    rng = np.random.default_rng(seed)
    return [(image(COLOURS[c], rng), c) for c in range(n_classes) for _ in range(per_class)]


def write_folder(root: Path, items, n_classes, classnames=True, templates=True):
    """root/<colour>/<i>.png; optional classnames.txt and templates file inside root."""
    root.mkdir(parents=True, exist_ok=True)
    for c in range(n_classes):
        (root / COLOURS[c]).mkdir(exist_ok=True)
    for i, (im, c) in enumerate(items):
        im.save(root / COLOURS[c] / f"{i:04d}.png")
    if classnames:
        (root / "classnames.txt").write_text("\n".join(sorted(COLOURS[:n_classes])) + "\n")  # label order
    if templates:
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return root


def write_wds(root: Path, split: str, samples, per_shard=10, classnames=None, templates=None, retrieval=False):
    """CLIP_benchmark's layout: root/split/{0..n-1}.tar + nshards.txt, metadata files in root.

    ``samples``: (image or raw bytes, label int | list of captions)."""
    import webdataset as wds

    (root / split).mkdir(parents=True, exist_ok=True)
    n_shards = 0
    for s in range(0, len(samples), per_shard):
        with wds.TarWriter(str(root / split / f"{n_shards}.tar")) as w:
            for i, (im, ann) in enumerate(samples[s:s + per_shard], start=s):
                rec = {"__key__": f"s{i:07d}", "png": im if isinstance(im, bytes) else png_bytes(im)}
                if retrieval:
                    rec["txt"] = "\n".join(ann)
                else:
                    rec["cls"] = str(ann)
                w.write(rec)
        n_shards += 1
    (root / split / "nshards.txt").write_text(f"{n_shards}\n")
    if classnames is not None:
        (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    if templates is not None:
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    if retrieval:
        (root / "dataset_type.txt").write_text("retrieval\n")
    return root


def retrieval_items(n_images=12, captions_per_image=3, seed=1):
    """(image, [captions]) with distinct captions."""
    rng = np.random.default_rng(seed)
    shapes = ["square", "block", "patch", "tile", "box"]
    out = []
    for i in range(n_images):
        colour = COLOURS[i % len(COLOURS)]
        caps = [f"a {colour} {shapes[(i + j) % len(shapes)]} number {i} view {j}" for j in range(captions_per_image)]
        out.append((image(colour, rng), caps))
    return out


def write_retrieval_files(root: Path, items):
    """images/ plus captions.csv (one row per caption) and captions.jsonl (one line per image)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows, lines = ["filepath,title"], []
    for i, (im, caps) in enumerate(items):
        name = f"images/{i:04d}.png"
        im.save(root / name)
        rows += [f"{name},{c}" for c in caps]
        lines.append(json.dumps({"image": name, "captions": caps}))
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """helip-tiny-vit from a fixed-seed random init, saved as a plain state dict."""
    import torch

    from helip.models import load_model, save_checkpoint

    torch.manual_seed(seed)
    return save_checkpoint(load_model("helip-tiny-vit").model, path)


def trained_checkpoint(out: Path, steps: int = 6, seed: int = 0) -> Path:
    """helip-tiny-vit briefly trained (helip.training, plain CLIP loss) on generated colour squares and captions,
    so zero-shot predictions and retrieval ranks differ from image to image (a random init is one constant
    class)."""
    from helip.data.pairs import prepare_pairs
    from helip.models import load_model
    from helip.training import TrainConfig, train

    rng = np.random.default_rng(seed)
    shapes = ["square", "block", "patch", "tile", "box"]
    colours = [COLOURS[i] for i in rng.integers(0, len(COLOURS), size=192)]
    images = np.stack([np.asarray(image(c, rng)) for c in colours])
    captions = [f"a {c} {shapes[i % len(shapes)]}" for i, c in enumerate(colours)]
    pairs = prepare_pairs(images, captions, load_model("helip-tiny-vit"))
    cfg = TrainConfig(model="helip-tiny-vit", device="cpu", steps=steps, batch_size=32, lr=2e-3, warmup_steps=5,
                      seed=seed, hard_per_target=0, hnml_weight=0.0, progress=False, log_every=steps)
    return train(cfg, pairs, out).checkpoint
