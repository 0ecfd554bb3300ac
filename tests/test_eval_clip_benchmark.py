"""helip's zero-shot and retrieval numbers agree with CLIP_benchmark's own evaluate functions.

Same model (helip-tiny-vit trained for 6 steps on generated colour squares, fixed seed),
same generated images, same class names and templates; CLIP_benchmark gets
its inputs the way its CLI builds them (torchvision ImageFolder for
classification, (image, [captions]) batches for retrieval), fp32 (amp off).
"""
import numpy as np
import pytest
import torch
import torchvision

from _evaldata import TEMPLATES, classification_items, retrieval_items, trained_checkpoint, write_folder, \
    write_retrieval_files, write_wds
from helip.evaluate import DatasetSpec, ModelSpec, SuiteConfig, run_suite
from helip.evaluate.features import FeatureConfig, encode_images, model_identity, zeroshot_weights
from helip.evaluate.datasets import open_classification
from helip.models import load_model

_WHY = "clip-benchmark is not installed; `make install` adds it (pip install --no-deps clip-benchmark==1.6.2)"
cb_zs = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification", reason=_WHY)
cb_ret = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval", reason=_WHY)



def _accuracy_numpy2(output, target, topk=(1,)):
    """CLIP_benchmark 1.6.2's ``accuracy``, verbatim but for ``.item()``: its ``float(array of shape (1,))``
    is a TypeError under NumPy >= 2.x, which this venv has. Top-k logic unchanged."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    n = len(target)
    return [float(correct[:k].reshape(-1).float().sum(0, keepdim=True).cpu().numpy().item()) / n for k in topk]


CFG = SuiteConfig(features=FeatureConfig(batch_size=16, workers=0, progress=False, cache_dir=None))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(trained_checkpoint(tmp_path_factory.mktemp("model")))


def test_zeroshot_agrees_with_clip_benchmark(tmp_path, ckpt, monkeypatch):
    items = classification_items(n_classes=8, per_class=6, seed=3)
    folder = write_folder(tmp_path / "folder", items, 8)
    classnames = (folder / "classnames.txt").read_text().split()
    labels = {c: i for i, c in enumerate(classnames)}
    wds_items = [(im, labels[["red", "green", "blue", "yellow", "purple", "orange", "white", "cyan"][c]])
                 for im, c in items]
    shards = write_wds(tmp_path / "wds", "test", wds_items, per_shard=20, classnames=classnames, templates=TEMPLATES)
    res = run_suite([ModelSpec("helip-tiny-vit", ckpt, "m")],
                    [DatasetSpec("zeroshot", "folder", folder), DatasetSpec("zeroshot", "wds", shards)], CFG)
    lm = load_model("helip-tiny-vit", ckpt)
    model = lm.model.eval()
    loader = torch.utils.data.DataLoader(torchvision.datasets.ImageFolder(str(folder), transform=lm.preprocess),
                                         batch_size=16)
    monkeypatch.setattr(cb_zs, "accuracy", _accuracy_numpy2)
    cb = cb_zs.evaluate(model, loader, lm.tokenizer, classnames, TEMPLATES, "cpu", amp=False)
    for name in ("folder", "wds"):
        h = res["m"]["zeroshot"][name]
        assert h["n_images"] == 48 and h["n_classes"] == 8 and h["n_skipped"] == 0
        assert abs(100 * h["top1"] - 100 * cb["acc1"]) <= 0.1, (name, h, cb)
        assert abs(100 * h["top5"] - 100 * cb["acc5"]) <= 0.1, (name, h, cb)
        assert abs(100 * h["mean_per_class_recall"] - 100 * cb["mean_per_class_recall"]) <= 0.1, (name, h, cb)
    # stronger than equal summaries: the same logits, image by image
    cb_w = cb_zs.zero_shot_classifier(model, lm.tokenizer, classnames, TEMPLATES, "cpu", amp=False)
    cb_logits, cb_true = cb_zs.run_classification(model, cb_w, loader, "cpu", amp=False)
    mid, fc = model_identity(lm), FeatureConfig(workers=0, progress=False)
    f = encode_images(lm, open_classification(folder).images, mid, fc)
    w = zeroshot_weights(lm, classnames, [t.replace("{c}", "{}") for t in TEMPLATES], mid, fc)
    ours = torch.from_numpy(f.features) @ torch.from_numpy(w)
    assert np.array_equal(np.asarray([int(a) for a in f.annotations]), cb_true.numpy())
    torch.testing.assert_close(100 * ours, cb_logits, atol=1e-3, rtol=1e-4)
    assert len(set(ours.argmax(1).tolist())) > 1  # not a constant classifier: the comparison is not vacuous


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, items, transform):
        self.items, self.transform = items, transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.transform(self.items[i][0]), self.items[i][1]


def _collate(batch):  # CLIP_benchmark's image_captions_collate_fn
    images, texts = zip(*batch)
    return torch.stack(images), list(texts)


def test_retrieval_agrees_with_clip_benchmark(tmp_path, ckpt):
    items = retrieval_items(n_images=30, captions_per_image=5, seed=4)
    files = write_retrieval_files(tmp_path / "files", items)
    shards = write_wds(tmp_path / "wds", "test", items, per_shard=8, retrieval=True)
    res = run_suite([ModelSpec("helip-tiny-vit", ckpt, "m")],
                    [DatasetSpec("retrieval", "csv", files / "captions.csv"),
                     DatasetSpec("retrieval", "wds", shards)], CFG)
    lm = load_model("helip-tiny-vit", ckpt)
    loader = torch.utils.data.DataLoader(_Pairs(items, lm.preprocess), batch_size=8, collate_fn=_collate)
    cb = cb_ret.evaluate(lm.model.eval(), loader, lm.tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
    for name in ("csv", "wds"):
        h = res["m"]["retrieval"][name]
        assert h["n_images"] == 30 and h["n_captions"] == 150
        for k in (1, 5, 10):
            assert abs(100 * h[f"t2i_r{k}"] - 100 * cb[f"image_retrieval_recall@{k}"]) <= 0.1, (name, k, h, cb)
            assert abs(100 * h[f"i2t_r{k}"] - 100 * cb[f"text_retrieval_recall@{k}"]) <= 0.1, (name, k, h, cb)
    h = res["m"]["retrieval"]["csv"]
    assert 0 < h["i2t_r10"] < 1 and 0 < h["t2i_r10"] < 1  # informative numbers, not all-or-nothing
