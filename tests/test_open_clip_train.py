"""`python -m helip.open_clip_train`: HELIP inside an unchanged open_clip_train run.

Each open_clip_train run is a subprocess (open_clip_train's ``main`` installs logging handlers on the root
logger, so in-process runs would leak into each other and into pytest). The model is helip-tiny-vit continued
from a checkpoint, on a 32-pair TSV of 32x32 images; ``scale=(1.0, 1.0)`` makes open_clip_train's training crop
the whole (already 32x32) image, which is the image ``helip train``'s transform gives.
"""
import os
import re
import subprocess
import sys
import time

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from helip import open_clip_train as plug
from helip.errors import ConfigError
from helip.io import fingerprint
from helip.mining.store import HardPairs, save_hard_pairs
from helip.models import CONFIG_DIR, load_model, register_configs

N, BATCH = 32, 16

from helip.app.cli import main as helip_main
from helip.training.config import TrainConfig


def _write(root, n, seed=0):
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True)
    caps = [f"a {['red', 'blue', 'green'][i % 3]} thing number {i}" for i in range(n)]
    with open(root / "pairs.tsv", "w") as f:
        f.write("filepath\ttitle\n")
        for i, c in enumerate(caps):
            path = root / "img" / f"{i:03d}.png"
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
            f.write(f"{path}\t{c}\n")
    import webdataset as wds

    (root / "shards").mkdir()
    for s in range(2):  # the same pairs, in the same order, as two WebDataset shards
        with wds.TarWriter(str(root / "shards" / f"{s:05d}.tar")) as sink:
            for i in range(s * n // 2, (s + 1) * n // 2):
                sink.write({"__key__": f"{i:09d}", "png": (root / "img" / f"{i:03d}.png").read_bytes(),
                            "txt": caps[i]})
    return caps


def _hard_pairs(out, caps, k=6, seed=1):
    rng = np.random.default_rng(seed)
    n = len(caps)
    idx = np.stack([rng.permutation(np.delete(np.arange(n), i))[:k] for i in range(n)]).astype(np.int32)
    scores = -np.sort(-rng.random((n, k)), axis=1).astype(np.float32)  # best first, as mined
    save_hard_pairs(out, HardPairs(idx, scores, {"fingerprint": fingerprint(caps)}))
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("octrain")
    caps = _write(root, N)
    register_configs()
    torch.manual_seed(3)
    torch.save(open_clip.create_model("helip-tiny-vit").state_dict(), root / "start.pt")
    _hard_pairs(root / "hp", caps)
    _hard_pairs(root / "hp_other", caps[:24])  # mined for another (shorter) table
    return root


def _argv(root, name, epochs=1, extra=()):
    return ["--train-data", str(root / "pairs.tsv"), "--model", "helip-tiny-vit", "--pretrained",
            str(root / "start.pt"), "--batch-size", str(BATCH), "--epochs", str(epochs), "--lr", "1e-3",
            "--wd", "0.1", "--warmup", "2", "--seed", "0", "--workers", "0", "--precision", "fp32",
            "--device", "cpu", "--log-every-n-steps", "1", "--logs", str(root / "logs"), "--name", name,
            "--aug-cfg", "scale=(1.0,1.0)", *extra]


def _octrain(argv, stock=False, wait_for=None):
    """Run ``python -m helip.open_clip_train argv`` (or stock open_clip_train); ``wait_for``: kill once the
    run's log holds that text (an interrupted run)."""
    if stock:  # open_clip_train's own main; OpenCLIP's public add_model_config makes the tiny model known
        cmd = [sys.executable, "-c", f"import sys, open_clip; open_clip.add_model_config({str(CONFIG_DIR)!r}); "
                                     f"from open_clip_train.main import main; main(sys.argv[1:])", *argv]
    else:
        cmd = [sys.executable, "-m", "helip.open_clip_train", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny model: one thread is fastest and leaves CI's cores alone
    if wait_for is None:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    log = _log_path(argv)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            if log.is_file() and wait_for in log.read_text():
                break
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()


def _log_path(argv):
    from pathlib import Path

    return Path(argv[argv.index("--logs") + 1]) / argv[argv.index("--name") + 1] / "out.log"


def _losses(run_dir, epoch=None):
    """Per-step (contrastive, hnml or None) from open_clip_train's out.log (5 significant digits)."""
    out = []
    for line in (run_dir / "out.log").read_text().splitlines():
        m = re.search(r"Train Epoch: (\d+) .*Contrastive_loss: (\S+) ", line)
        if m and (epoch is None or int(m.group(1)) == epoch):
            h = re.search(r"Hnml_loss: (\S+) ", line)
            out.append((float(m.group(2)), float(h.group(1)) if h else None))
    return out


def _weights(path):
    sd = torch.load(path, map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd)
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _same_weights(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= atol, worst


@pytest.fixture()
def one_thread():
    """helip train in this process with one thread, like the open_clip_train subprocesses (tiny model)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def helip_run(data):
    """Two epochs through the plug-in (a checkpoint after each)."""
    r = _octrain(_argv(data, "helip", epochs=2, extra=["--helip-hard-pairs", str(data / "hp")]))
    assert r.returncode == 0, r.stderr[-3000:]
    return data / "logs" / "helip"


def test_plugin_trains_as_helip_train(data, helip_run, tmp_path, one_thread):
    steps = 2 * N // (BATCH // 2)  # one target + one partner per group: an epoch is N / (B/2) batches
    assert helip_main(["train", "--data", str(data / "pairs.tsv"), "--model", "helip-tiny-vit", "--pretrained",
                 str(data / "start.pt"), "--batch-size", str(BATCH), "--steps", str(steps), "--lr", "1e-3",
                 "--weight-decay", "0.1", "--warmup-steps", "2", "--seed", "0", "--workers", "0",
                 "--precision", "fp32", "--device", "cpu", "--log-every", "1", "--hard-pairs", str(data / "hp"),
                 "--out", str(tmp_path / "ht")]) == 0
    import json

    ref = [json.loads(line) for line in (tmp_path / "ht" / "train_log.jsonl").read_text().splitlines()]
    got = _losses(helip_run)
    assert len(got) == len(ref) == steps
    for (c, h), r in zip(got, ref):  # the same batches and losses, step after step
        assert c == pytest.approx(r["contrastive"], rel=2e-4) and h == pytest.approx(r["hnml"], rel=2e-4)
    assert len({round(c, 3) for c, _ in got}) > 1 and all(h > 0 for _, h in got)  # it trains, HNML is active
    # the same weights at the end, and the plug-in's checkpoint loads in helip and in stock OpenCLIP
    ckpt = helip_run / "checkpoints" / "epoch_2.pt"
    trained = _weights(ckpt)
    _same_weights(trained, _weights(tmp_path / "ht" / "model.pt"), atol=1e-5)
    _same_weights(trained, load_model("helip-tiny-vit", str(ckpt)).model.state_dict(), atol=0)
    _same_weights(trained, open_clip.create_model("helip-tiny-vit", pretrained=str(ckpt)).state_dict(), atol=0)
    assert not torch.equal(trained["text_projection"], _weights(data / "start.pt")["text_projection"])


def test_resume_latest_continues_an_interrupted_run(data, helip_run):
    cut = _argv(data, "cut", epochs=2, extra=["--helip-hard-pairs", str(data / "hp")])
    _octrain(cut, wait_for="Start epoch 1")  # killed once epoch 1's checkpoint is written
    ckpts = data / "logs" / "cut" / "checkpoints"
    assert [p.name for p in ckpts.glob("*.pt")] == ["epoch_1.pt"]
    r = _octrain([*cut, "--resume", "latest"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming checkpoint" in (data / "logs" / "cut" / "out.log").read_text()
    # epoch 1 of the resumed run is epoch 1 of the uninterrupted one: same batches, losses, final weights
    assert _losses(data / "logs" / "cut", epoch=1) == _losses(helip_run, epoch=1) != []
    _same_weights(_weights(ckpts / "epoch_2.pt"), _weights(helip_run / "checkpoints" / "epoch_2.pt"))


def test_webdataset_shards_give_the_csv_batches(data, helip_run):
    """The same pairs as shards (read by index, not streamed): the same batches, losses and weights."""
    argv = _argv(data, "wds", epochs=2, extra=["--helip-hard-pairs", str(data / "hp"), "--dataset-type", "webdataset"])
    argv[argv.index("--train-data") + 1] = str(data / "shards" / "{00000..00001}.tar")
    r = _octrain(argv)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _losses(data / "logs" / "wds") == _losses(helip_run)
    _same_weights(_weights(data / "logs" / "wds" / "checkpoints" / "epoch_2.pt"),
                  _weights(helip_run / "checkpoints" / "epoch_2.pt"))


def test_accum_freq_sees_the_partners_of_all_micro_batches(data, tmp_path, one_thread):
    """--accum-freq 2: the loss of the first step equals helip train's with --accum-steps 2 (the same 32 pairs,
    the mask spanning both micro-batches). Later steps differ: open_clip_train lets every recomputed micro-batch
    add the logit scale's gradient, helip train only the last (see helip.training.Trainer)."""
    r = _octrain(_argv(data, "accum", extra=["--accum-freq", "2", "--helip-hard-pairs", str(data / "hp")]))
    assert r.returncode == 0, r.stderr[-3000:]
    assert helip_main(["train", "--data", str(data / "pairs.tsv"), "--model", "helip-tiny-vit", "--pretrained",
                 str(data / "start.pt"), "--batch-size", str(BATCH), "--accum-steps", "2", "--steps", "1",
                 "--lr", "1e-3", "--weight-decay", "0.1", "--warmup-steps", "2", "--seed", "0", "--precision",
                 "fp32", "--device", "cpu", "--log-every", "1", "--hard-pairs", str(data / "hp"),
                 "--out", str(tmp_path / "ht")]) == 0
    import json

    ref = json.loads((tmp_path / "ht" / "train_log.jsonl").read_text().splitlines()[0])
    (c, h), *_ = _losses(data / "logs" / "accum")
    assert c == pytest.approx(ref["contrastive"], rel=2e-4) and h == pytest.approx(ref["hnml"], rel=2e-4)


def test_without_hard_pairs_it_is_open_clip_train(data):
    stock, ours = _argv(data, "stock"), _argv(data, "ours")
    assert _octrain(stock, stock=True).returncode == 0
    assert _octrain(ours).returncode == 0
    got, ref = _losses(data / "logs" / "ours"), _losses(data / "logs" / "stock")
    assert len(got) == N // BATCH and got == ref and all(h is None for _, h in got)
    _same_weights(_weights(data / "logs" / "ours" / "checkpoints" / "epoch_1.pt"),
                  _weights(data / "logs" / "stock" / "checkpoints" / "epoch_1.pt"), atol=0)


def test_hard_pairs_of_another_table_one_line(data, capsys):
    argv = _argv(data, "other", extra=["--helip-hard-pairs", str(data / "hp_other")])
    assert plug.main(argv) == 2  # refused before open_clip_train starts
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has 24 rows" in err and f"has {N} pairs" in err
    assert not (data / "logs" / "other").exists()


def test_refusals_are_one_line(data, monkeypatch, capsys):
    # another open_clip_torch version
    monkeypatch.setattr(plug, "version", lambda name: "9.9.9")
    with pytest.raises(ConfigError, match=r"tested with open_clip_torch 3\.3\.0, not 9\.9\.9"):
        plug.check_open_clip_version()
    monkeypatch.undo()
    # synthetic data; resampled shards
    with pytest.raises(ConfigError, match="CSV/TSV or WebDataset"):
        plug.check_open_clip_args(["--dataset-type", "synthetic", "--train-data", "x"])
    with pytest.raises(ConfigError, match="--dataset-resampled"):
        plug.check_open_clip_args(["--train-data", str(data / "shards" / "{00000..00001}.tar"),
                                   "--dataset-resampled"])
    # a HELIP option without hard pairs: exit status 2 before open_clip_train starts
    assert plug.main(["--helip-hnml-weight", "0.5", "--train-data", "x.csv"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--helip-hnml-weight needs --helip-hard-pairs" in err


def test_defaults_are_helip_train_defaults():
    d, cfg = plug.HelipOptions(), TrainConfig()
    for name in ("hard_per_target", "top_k", "hard_fraction", "hard_temperature", "hard_temperature_mode",
                 "hnml_weight", "hnml_margin"):
        assert getattr(d, name) == getattr(cfg, name), name
