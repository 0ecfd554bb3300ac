"""Pair datasets: every format gives the same pairs, shards are indexed once, unusable pairs are skipped."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from helip.app import worlds as world
from helip.data.sources import PairDataset, UnreadableImage, open_pairs
from helip.errors import InputError

CAPTIONS = ["a red circle", "two blue squares, one above the other", "a small green star",
            "an empty, caption-like \"quoted\" title", "a yellow cross", "un caractère accentué"]


def _images(n=len(CAPTIONS), size=12):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def _png(a):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def write_dataset(root, captions=CAPTIONS, images=None, shards=2, corrupt=()):
    """The same pairs as a TSV, a CSV, a JSONL and WebDataset shards (written by webdataset's TarWriter,
    as img2dataset writes them). Pair indices in ``corrupt`` get bytes that are not an image."""
    import webdataset as wds

    images = images if images is not None else _images(len(captions))
    root.mkdir(parents=True, exist_ok=True)
    (root / "img").mkdir(exist_ok=True)
    data = [b"not an image at all" if i in corrupt else _png(a) for i, a in enumerate(images)]
    for i, d in enumerate(data):
        (root / "img" / f"{i:03d}.png").write_bytes(d)
    with open(root / "pairs.tsv", "w") as f:
        f.write("title\tfilepath\n")
        for i, c in enumerate(captions):
            f.write(f"{c}\timg/{i:03d}.png\n")
    import csv
    with open(root / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "title"])
        for i, c in enumerate(captions):
            w.writerow([str(root / "img" / f"{i:03d}.png"), c])  # absolute paths work too
    with open(root / "pairs.jsonl", "w") as f:
        for i, c in enumerate(captions):
            f.write(json.dumps({"image": f"img/{i:03d}.png", "caption": c}) + "\n")
    (root / "shards").mkdir(exist_ok=True)
    per = -(-len(captions) // shards)
    for s in range(shards):
        with wds.TarWriter(str(root / "shards" / f"{s:05d}.tar")) as sink:
            for i in range(s * per, min(len(captions), (s + 1) * per)):
                sink.write({"__key__": f"{i:09d}", "png": data[i], "txt": captions[i],
                            "json": {"key": f"{i:09d}", "caption": captions[i], "status": "success"}})
    return root


def _specs(root, shards=2):
    last = f"{shards - 1:05d}"
    return [str(root / "pairs.tsv"), str(root / "pairs.csv"), str(root / "pairs.jsonl"),
            str(root / "shards" / f"{{00000..{last}}}.tar")]


def test_every_format_yields_the_same_pairs(tmp_path):
    root = write_dataset(tmp_path / "d")
    images = _images()
    for spec in _specs(root):
        src = open_pairs(spec)
        assert len(src) == len(CAPTIONS), spec
        assert src.captions() == CAPTIONS, spec
        for i in (4, 0, 5, 2, 1, 3):  # random order: access by index
            assert np.array_equal(np.asarray(src.image(i)), images[i]), (spec, i)
        assert src.fingerprint() == open_pairs(_specs(root)[0]).fingerprint()


def test_world_source_is_the_world():
    src = open_pairs("world", n_train=7, world_seed=3)
    split = world.generate(7, 3, "train")
    assert src.captions() == split.captions
    assert np.array_equal(np.asarray(src.image(6)), split.images[6])


def test_shard_index_is_cached_beside_the_shard_and_rebuilt_when_the_shard_changes(tmp_path, monkeypatch):
    root = write_dataset(tmp_path / "d")
    spec = _specs(root)[-1]
    open_pairs(spec)
    index = root / "shards" / "00000.tar.helip-index.json"
    assert index.is_file() and json.loads(index.read_text())["keys"][0] == "000000000"
    import helip.data.sources as sources

    def no_rebuild(shard):
        raise AssertionError(f"{shard} re-indexed although its index is current")
    monkeypatch.setattr(sources, "build_shard_index", no_rebuild)
    assert open_pairs(spec).captions() == CAPTIONS
    monkeypatch.undo()
    # the shard is rewritten with other captions: the stale index must not be used
    write_dataset(tmp_path / "d", captions=[c.upper() for c in CAPTIONS])
    os.utime(root / "shards" / "00000.tar", ns=(1, 1))
    assert open_pairs(spec).captions() == [c.upper() for c in CAPTIONS]


def test_corrupt_image_and_empty_caption_are_found_and_replaced(tmp_path):
    caps = list(CAPTIONS)
    caps[1] = "   "
    root = write_dataset(tmp_path / "d", captions=caps, corrupt={3})
    src = open_pairs(_specs(root)[-1])
    assert src.empty_captions().tolist() == [1]
    with pytest.raises(UnreadableImage, match="key 000000003"):
        src.image(3)
    ds = PairDataset(src, preprocess=lambda im: np.asarray(im), tokenizer=lambda caps: [c for c in caps])
    image, caption = ds[3]  # replaced by the next usable pair, 4
    assert caption == CAPTIONS[4] and np.array_equal(image, _images()[4])
    assert ds[1][1] == CAPTIONS[2]
    assert ds.replaced == 2 and ds.bad == {1, 3}


def test_pair_dataset_gives_model_tensors(tmp_path):
    from helip.models import load_model

    root = write_dataset(tmp_path / "d")
    lm = load_model("helip-tiny-vit")
    ds = PairDataset(open_pairs(_specs(root)[0]), lm.preprocess, lm.tokenizer)
    image, tokens = ds[2]
    assert image.shape == (3, 32, 32) and tokens.shape == (32,)
    assert tokens.tolist() == lm.tokenizer([CAPTIONS[2]])[0].tolist()


def test_csv_separator_and_columns(tmp_path):
    root = write_dataset(tmp_path / "d")
    src = open_pairs(str(root / "pairs.tsv"), csv_separator="\\t")  # as typed on a shell: --csv-separator "\t"
    assert src.captions() == CAPTIONS
    with pytest.raises(InputError, match="no column 'caption'"):
        open_pairs(str(root / "pairs.tsv"), csv_caption_key="caption")


def test_shards_read_from_dataloader_workers(tmp_path):
    import torch

    root = write_dataset(tmp_path / "d")
    src = open_pairs(_specs(root)[-1])
    src.image(5)  # the parent holds an open shard; forked workers must not share its file offset
    ds = PairDataset(src, preprocess=lambda im: torch.from_numpy(np.asarray(im).copy()), tokenizer=lambda c: c)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, sampler=[5, 0, 3, 1, 4, 2])
    got = torch.cat([images for images, _ in loader]).numpy()
    assert np.array_equal(got, np.stack([_images()[i] for i in [5, 0, 3, 1, 4, 2]]))
