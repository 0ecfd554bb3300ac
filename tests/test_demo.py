"""The quick demo end to end: the files it promises, the results.json schema, the cache."""
import json

import numpy as np
import open_clip
import torch

from helip.app import worlds as world
from helip.app.cli import main
from helip.data.pairs import prepare_pairs
from helip.embed import encode_pairs
from helip.models import load_model, register_configs

RETRIEVAL = {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"}


def test_demo_writes_results_and_report(quick_demo):
    out, _ = quick_demo
    results = json.loads((out / "results.json").read_text())
    tasks = {t.name for t in world.zeroshot_tasks(world.generate(50, 0, "test"))}
    for variant in ("pretrained", "baseline", "helip"):
        r = results[variant]
        assert set(r["zeroshot"]) == tasks
        assert all(0.0 <= v <= 1.0 for v in r["zeroshot"].values())
        assert abs(r["zeroshot_mean"] - np.mean(list(r["zeroshot"].values()))) < 1e-9
        assert 0.0 <= r["linear_probe"] <= 1.0
        assert set(r["retrieval"]) == RETRIEVAL
        assert all(0.0 <= v <= 1.0 for v in r["retrieval"].values())
        # recall is monotone in K
        assert r["retrieval"]["i2t_r1"] <= r["retrieval"]["i2t_r5"] <= r["retrieval"]["i2t_r10"]
    # the three variants are three different models
    assert results["baseline"]["retrieval"] != results["helip"]["retrieval"] or \
        results["baseline"]["zeroshot"] != results["helip"]["zeroshot"]
    html = (out / "report.html").read_text()
    assert "Mined hard pairs" in html and "data:image/png;base64" in html
    assert (out / "zeroshot.png").stat().st_size > 1000 and (out / "losses.png").stat().st_size > 1000
    hard = np.load(out / "hard_pairs" / "hard_pairs.npy")
    assert hard.dtype == np.int32 and (hard != np.arange(len(hard))[:, None]).all()
    # no leftover temporary files from the atomic writes
    assert not list(out.rglob("*.tmp"))


def test_demo_reuses_cached_pretrained_model(quick_demo, tmp_path):
    out, cache = quick_demo
    first = json.loads((out / "results.json").read_text())
    assert main(["demo", "--quick", "--out", str(tmp_path), "--seed", "0", "--cache-dir", str(cache)]) == 0
    second = json.loads((tmp_path / "results.json").read_text())
    assert second["meta"]["pretrained_checkpoint"] == first["meta"]["pretrained_checkpoint"]
    assert second["meta"]["timings_seconds"]["pretrain"] < first["meta"]["timings_seconds"]["pretrain"]
    # same seed, same everything: the pipeline is deterministic
    assert second["helip"]["zeroshot"] == first["helip"]["zeroshot"]


def test_checkpoint_loads_with_stock_open_clip(quick_demo):
    out, _ = quick_demo
    register_configs()
    ckpt = out / "helip" / "model.pt"
    stock = open_clip.create_model("helip-tiny-vit", pretrained=str(ckpt))
    ours = load_model("helip-tiny-vit", str(ckpt))
    split = world.generate(16, 3, "val")
    pairs = prepare_pairs(split.images, split.captions, ours)
    with torch.no_grad():
        a = stock.eval().encode_image(pairs.images, normalize=True).numpy()
    b, _ = encode_pairs(ours, pairs)
    assert np.allclose(a, b, atol=1e-6)


def test_pretraining_cache_key_ignores_partner_options_random_batches_cannot_use():
    """Pretraining draws random batches: the partner temperature and its units must not change the cache key
    (a key change re-pretrains the demo's starting model: minutes on a CPU), while real options still do."""
    from dataclasses import replace

    from helip.app.demo import DemoConfig, _pretrain_key

    cfg = DemoConfig()
    key = _pretrain_key(cfg)
    for kw in ({"hard_temperature": 0.3}, {"hard_temperature_mode": "absolute"},
               {"hard_temperature": 0.01, "hard_temperature_mode": "absolute"}):
        other = DemoConfig()
        other.pretrain = replace(other.pretrain, **kw)
        assert _pretrain_key(other) == key, kw
    other = DemoConfig()
    other.pretrain = replace(other.pretrain, steps=cfg.pretrain.steps + 1)
    assert _pretrain_key(other) != key
    other = DemoConfig()  # the continued-training options are not part of the pretraining key at all
    other.continued = replace(other.continued, hard_temperature=0.5, hard_temperature_mode="relative")
    assert _pretrain_key(other) == key
