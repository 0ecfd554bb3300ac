"""`helip eval` on benchmark layouts: results, the feature cache, bad input, the report."""
import json
import shutil

import numpy as np
import pytest

from _evaldata import COLOURS, TEMPLATES, classification_items, png_bytes, retrieval_items, tiny_checkpoint, \
    write_folder, write_retrieval_files, write_wds
from helip.app.cli import main
from helip.evaluate import DatasetSpec, ModelSpec, SuiteConfig, run_suite
from helip.evaluate.features import FeatureConfig
from helip.evaluate.linear_probe import ProbeConfig, sweep_c
from helip.evaluate.prompts import resolve_prompts
from helip.errors import InputError

NO_CACHE = SuiteConfig(features=FeatureConfig(batch_size=16, workers=0, progress=False, cache_dir=None))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """One small dataset per layout, and two fixed-seed tiny checkpoints."""
    root = tmp_path_factory.mktemp("evaldata")
    items = classification_items(n_classes=6, per_class=4, seed=0)
    write_folder(root / "zs_folder", items, 6)
    sorted_names = sorted(COLOURS[:6])
    write_wds(root / "zs_wds", "test", [(im, sorted_names.index(COLOURS[c])) for im, c in items], per_shard=7,
              classnames=sorted_names, templates=TEMPLATES)
    for split, seed in (("train", 5), ("test", 6)):
        write_folder(root / "lp" / split, classification_items(6, 5, seed), 6, classnames=False, templates=False)
    write_retrieval_files(root / "ret", retrieval_items(12, 3, seed=1))
    tiny_checkpoint(root / "a" / "model.pt", seed=0)
    tiny_checkpoint(root / "b" / "model.pt", seed=1)
    return root


def _eval(data, out, *extra, models=None):
    models = models or data
    return main(["eval", "--model", "helip-tiny-vit", "--pretrained", str(models / "a" / "model.pt"), "--pretrained",
                 str(models / "b" / "model.pt"),
                 "--zeroshot", f"colours={data / 'zs_folder'}", "--zeroshot", f"colours_wds={data / 'zs_wds'}",
                 "--linear-probe", f"colours_lp={data / 'lp'}", "--retrieval", f"captions={data / 'ret' / 'captions.csv'}",
                 "--probe-c-min", "0.01", "--probe-c-max", "100", "--probe-refine-steps", "1",
                 "--workers", "0", "--no-progress", "--device", "cpu", "--out", str(out), *extra])


def test_eval_all_tasks_two_checkpoints_cache_and_report(data, tmp_path, monkeypatch, capsys):
    cache, models = tmp_path / "cache", tmp_path / "models"
    for v in ("a", "b"):
        shutil.copytree(data / v, models / v)
    assert _eval(data, tmp_path / "r1.json", "--cache-dir", str(cache), models=models) == 0
    r1 = json.loads((tmp_path / "r1.json").read_text())
    assert set(r1) == {"a", "b", "meta"}  # names derived from the checkpoints' directories
    for v in ("a", "b"):
        zs = r1[v]["zeroshot"]
        assert zs["colours"]["n_images"] == 24 and zs["colours"]["n_classes"] == 6
        for k in ("top1", "top5", "mean_per_class_recall"):
            assert 0 <= zs["colours"][k] <= 1
            assert zs["colours"][k] == zs["colours_wds"][k]  # same images and labels in both layouts
        assert zs["colours"]["top1"] <= zs["colours"]["top5"]
        lp = r1[v]["linear_probe"]["colours_lp"]
        assert lp["n_train"] + lp["n_val"] == 30 and lp["n_test"] == 30
        # the sweep covers --probe-c-min..--probe-c-max, widened where the best C sat at an edge
        assert lp["C_range"][0] <= min(0.01, lp["C"]) and lp["C"] <= lp["C_range"][1] and lp["C_range"][1] >= 100
        ret = r1[v]["retrieval"]["captions"]
        assert ret["n_images"] == 12 and ret["n_captions"] == 36
        assert ret["i2t_r1"] <= ret["i2t_r5"] <= ret["i2t_r10"] and ret["t2i_r1"] <= ret["t2i_r5"] <= ret["t2i_r10"]
    assert r1["a"]["weights_sha256"] != r1["b"]["weights_sha256"]
    assert r1["meta"]["datasets"]["zeroshot/colours"]["templates"] == [t.replace("{c}", "{}") for t in TEMPLATES]
    entries = {p.name: (p / "meta.json").stat().st_mtime_ns for p in cache.iterdir()}
    assert len(entries) == 2 * 7  # per model: 5 image sets (2 zero-shot, 2 probe, 1 retrieval), 2 text sets

    # second run: everything from the cache; any image or text encoding would raise
    import open_clip

    def boom(*a, **k):
        raise AssertionError("encoded although cached")
    monkeypatch.setattr(open_clip.model.CLIP, "encode_image", boom)
    monkeypatch.setattr(open_clip.model.CLIP, "encode_text", boom)
    assert _eval(data, tmp_path / "r2.json", "--cache-dir", str(cache), models=models) == 0
    monkeypatch.undo()
    r2 = json.loads((tmp_path / "r2.json").read_text())
    assert r2["a"] == r1["a"] and r2["b"] == r1["b"]
    assert {p.name: (p / "meta.json").stat().st_mtime_ns for p in cache.iterdir()} == entries

    # a changed model at the same path invalidates its entries; the unchanged one still reads its own
    tiny_checkpoint(models / "a" / "model.pt", seed=7)
    assert _eval(data, tmp_path / "r3.json", "--cache-dir", str(cache), models=models) == 0
    r3 = json.loads((tmp_path / "r3.json").read_text())
    assert r3["a"]["weights_sha256"] != r1["a"]["weights_sha256"]
    assert r3["a"]["retrieval"] != r1["a"]["retrieval"] and r3["b"] == r1["b"]
    new = {p.name for p in cache.iterdir()} - set(entries)
    assert len(new) == 7

    # report: two results files, comparison table, per-task bars, before vs after
    capsys.readouterr()
    assert main(["report", "--results", str(tmp_path / "r1.json"), "--results", str(tmp_path / "r3.json"),
                 "--out", str(tmp_path / "report"), "--baseline", "r1:a"]) == 0
    table = (tmp_path / "report" / "comparison.md").read_text()
    assert "r1:a" in table and "r3:a" in table and "zeroshot colours_wds: top-1" in table
    assert len(table.strip().splitlines()) == 2 + 4
    for png in ("zeroshot.png", "linear_probe.png", "retrieval.png", "delta.png"):
        assert (tmp_path / "report" / png).stat().st_size > 0
    assert main(["report", "--results", str(tmp_path / "r1.json"), "--out", str(tmp_path / "rep2"),
                 "--baseline", "nope"]) == 2
    assert "is not one of the variants" in capsys.readouterr().err


def _run(specs, **kw):
    cfg = SuiteConfig(features=NO_CACHE.features, **kw)
    return run_suite([ModelSpec("helip-tiny-vit", None, "m")], specs, cfg)


def test_empty_class_folder(data, tmp_path):
    shutil.copytree(data / "zs_folder", tmp_path / "zs")
    (tmp_path / "zs" / "zzz_empty").mkdir()
    with pytest.raises(InputError, match="class folder .*zzz_empty has no images"):
        _run([DatasetSpec("zeroshot", "x", tmp_path / "zs")])


def test_classnames_length_mismatch_both_layouts(data, tmp_path, capsys):
    shutil.copytree(data / "zs_folder", tmp_path / "zs")
    (tmp_path / "zs" / "classnames.txt").write_text("red\ngreen\nblue\n")
    rc = main(["eval", "--model", "helip-tiny-vit", "--pretrained", str(data / "a" / "model.pt"), "--zeroshot",
               f"x={tmp_path / 'zs'}",
               "--out", str(tmp_path / "r.json"), "--workers", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "has 3 class names but" in err and "6 class folders" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r.json").exists()
    shutil.copytree(data / "zs_wds", tmp_path / "wds")
    (tmp_path / "wds" / "classnames.txt").write_text("a\nb\nc\n")  # labels go up to 5
    with pytest.raises(InputError, match="has label [345] but there are 3 class names"):
        _run([DatasetSpec("zeroshot", "x", tmp_path / "wds")])
    # names of the folders, but not in the sorted order that defines the labels
    (tmp_path / "zs" / "classnames.txt").write_text("\n".join(COLOURS[:6]) + "\n")
    with pytest.raises(InputError, match="another order"):
        _run([DatasetSpec("zeroshot", "x", tmp_path / "zs")])


def test_template_without_placeholder_and_missing_templates(data, tmp_path):
    shutil.copytree(data / "zs_folder", tmp_path / "zs")
    (tmp_path / "zs" / "zeroshot_classification_templates.txt").write_text("a photo of a {}.\na photo.\n")
    with pytest.raises(InputError, match="template 2 of .* must contain exactly one"):
        _run([DatasetSpec("zeroshot", "x", tmp_path / "zs")])
    (tmp_path / "zs" / "zeroshot_classification_templates.txt").unlink()
    with pytest.raises(InputError, match="no prompt templates"):
        _run([DatasetSpec("zeroshot", "x", tmp_path / "zs")])
    # built-in ImageNet: 1000 names and CLIP's 80 templates; 6 folders do not match them
    (tmp_path / "zs" / "classnames.txt").unlink()
    p = resolve_prompts("imagenet", [tmp_path / "nothing"])
    assert len(p["classnames"]) == 1000 and len(p["templates"]) == 80 and p["classnames"][0] == "tench"
    with pytest.raises(InputError, match="1000 class names but .* 6 class folders"):
        _run([DatasetSpec("zeroshot", "imagenet", tmp_path / "zs")])


def test_undecodable_images_are_counted_or_refused(data, tmp_path, capsys):
    shutil.copytree(data / "zs_folder", tmp_path / "zs")
    (tmp_path / "zs" / "red" / "broken.png").write_bytes(b"not a png")
    items = [(png_bytes(im), c) for im, c in classification_items(6, 4, seed=0)]
    items[3] = (b"\x89PNG garbage", items[3][1])
    write_wds(tmp_path / "wds", "test", items, per_shard=7, classnames=sorted(COLOURS[:6]), templates=TEMPLATES)
    ret_items = retrieval_items(12, 3, seed=1)
    write_retrieval_files(tmp_path / "ret", ret_items)
    (tmp_path / "ret" / "images" / "0005.png").write_bytes(b"truncated")
    specs = [DatasetSpec("zeroshot", "folder", tmp_path / "zs"), DatasetSpec("zeroshot", "wds", tmp_path / "wds"),
             DatasetSpec("retrieval", "ret", tmp_path / "ret" / "captions.jsonl")]
    for spec in specs:  # default: at most 1% may fail; 1 of 25 / 24 / 12 is refused
        with pytest.raises(InputError, match="1 of (25|24|12) images do not decode .*--max-bad-fraction"):
            _run([spec])
    r = _run(specs, max_bad_fraction=0.1)["m"]
    assert r["zeroshot"]["folder"]["n_skipped"] == 1 and r["zeroshot"]["folder"]["n_images"] == 24
    assert r["zeroshot"]["wds"]["n_skipped"] == 1 and r["zeroshot"]["wds"]["n_images"] == 23
    assert r["retrieval"]["ret"]["n_skipped"] == 1 and r["retrieval"]["ret"]["n_images"] == 11
    assert r["retrieval"]["ret"]["n_captions"] == 33 and r["retrieval"]["ret"]["n_captions_skipped"] == 3
    rc = main(["eval", "--model", "helip-tiny-vit", "--pretrained", str(data / "a" / "model.pt"), "--zeroshot",
               f"x={tmp_path / 'zs'}",
               "--out", str(tmp_path / "r.json"), "--workers", "0", "--no-cache"])
    assert rc == 2 and "do not decode" in capsys.readouterr().err


def test_bad_flags_and_files(data, tmp_path, capsys):
    ckpt = str(data / "a" / "model.pt")
    for args, msg in ((["--zeroshot", "nopath"], "write NAME=PATH"),
                      (["--zeroshot", f"x={data / 'nothing'}"], "is not a directory"),
                      (["--zeroshot-templates", "y=openai"], "no --zeroshot y=PATH"),
                      (["--retrieval", f"r={data / 'zs_folder' / 'classnames.txt'}"], "unknown format"),
                      (["--model", "a", "--model", "b"], "2 --model for 1 --pretrained"),
                      (["--model"], "give --model")):  # no --model at all: the demo's model is not a default
        model = [] if "--model" in args else ["--model", "helip-tiny-vit"]
        args = [a for a in args if a != "--model"] if args == ["--model"] else args
        rc = main(["eval", "--pretrained", ckpt, "--out", str(tmp_path / "r.json"), *model, *args])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, (args, err)
    (tmp_path / "bad.csv").write_text("path,text\nx.png,hello\n")
    with pytest.raises(InputError, match="no image column"):
        _run([DatasetSpec("retrieval", "r", tmp_path / "bad.csv")])


def test_c_sweep_finds_the_best_decade():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8))
    y = (x[:, 0] + 0.3 * rng.normal(size=300) > 0).astype(int)
    c, acc, tried = sweep_c(x[:200], y[:200], x[200:], y[200:], ProbeConfig(c_min=1e-4, c_max=1e2, refine_steps=2))
    assert acc == max(tried.values()) and tried[c] == acc
    assert 7 + 4 >= len(tried) >= 7 and acc > 0.8 and c > 1e-4  # a tiny C underfits
