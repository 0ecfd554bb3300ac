"""The stage commands one by one, as the README and docs/ show them, on a tiny world."""
import json

import numpy as np

from helip.app.cli import main
from helip.mining import load_hard_pairs


def test_stage_commands_chain(tmp_path):
    world = ["--n-train", "256"]
    pre = tmp_path / "pre"
    assert main(["pretrain", *world, "--out", str(pre), "--steps", "3", "--batch-size", "32", "--warmup-steps", "1"]) == 0
    ckpt = str(pre / "model.pt")
    assert main(["embed", "--data", "world", "--model", "helip-tiny-vit", *world, "--pretrained", ckpt, "--out",
                 str(tmp_path / "emb")]) == 0
    meta = json.loads((tmp_path / "emb" / "meta.json").read_text())
    assert meta["n"] == 256 and np.load(tmp_path / "emb" / "image.npy").shape == (256, meta["dim"])
    assert main(["mine", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "hard"), "--k", "8",
                 "--csv", str(tmp_path / "hard.csv")]) == 0
    hard = load_hard_pairs(tmp_path / "hard", meta["fingerprint"])
    assert hard.indices.shape == (256, 8)
    assert len((tmp_path / "hard.csv").read_text().splitlines()) == 256
    for name, extra in (("helip", ["--hard-pairs", str(tmp_path / "hard")]), ("baseline", [])):
        assert main(["train", "--data", "world", "--model", "helip-tiny-vit", *world, "--pretrained", ckpt,
                     "--out", str(tmp_path / name), "--steps", "2", "--batch-size", "32", "--top-k", "8", *extra]) == 0
    logs = [json.loads(line) for line in (tmp_path / "helip" / "train_log.jsonl").read_text().splitlines()]
    assert logs[-1]["step"] == 2 and "hnml" in logs[-1] and logs[-1]["partners_per_sample"] > 0
    base_logs = [json.loads(line) for line in (tmp_path / "baseline" / "train_log.jsonl").read_text().splitlines()]
    assert "hnml" not in base_logs[-1]
    results = tmp_path / "results.json"
    assert main(["eval", "--model", "helip-tiny-vit",
                 "--pretrained", str(tmp_path / "helip" / "model.pt"), "--name", "helip",
                 "--pretrained", str(tmp_path / "baseline" / "model.pt"), "--name", "baseline",
                 "--out", str(results), "--n-probe-train", "200", "--n-val", "100", "--n-test", "100"]) == 0
    r = json.loads(results.read_text())
    assert set(r) >= {"helip", "baseline"} and 0 <= r["helip"]["zeroshot_mean"] <= 1
    assert main(["report", "--results", str(results), "--out", str(tmp_path / "report")]) == 0
    assert "helip" in (tmp_path / "report" / "report.html").read_text()
