"""Bad input through the `helip` command: one clear line on stderr, exit status 2, nothing half-written."""
import json

import numpy as np
import pytest

from helip.app.cli import main
from helip.io import fingerprint


def _embeddings(path, n_img=20, n_txt=20, captions=None, d=8, seed=0):
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / "image.npy", rng.normal(size=(n_img, d)).astype(np.float16))
    np.save(path / "text.npy", rng.normal(size=(n_txt, d)).astype(np.float16))
    caps = captions or [f"caption {i}" for i in range(n_img)]
    (path / "meta.json").write_text(json.dumps({"n": n_img, "fingerprint": fingerprint(caps)}))
    return path


def _run_error(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_mine_row_counts_differ(tmp_path, capsys):
    emb = _embeddings(tmp_path / "emb", n_img=20, n_txt=19)
    err = _run_error(capsys, ["mine", "--embeddings", str(emb), "--out", str(tmp_path / "hp"), "--k", "5"])
    assert "helip embed" in err
    assert not (tmp_path / "hp").exists()


def test_mine_k_too_large(tmp_path, capsys):
    emb = _embeddings(tmp_path / "emb", n_img=10, n_txt=10)
    err = _run_error(capsys, ["mine", "--embeddings", str(emb), "--out", str(tmp_path / "hp"), "--k", "10"])
    assert "--k 9" in err
    assert not (tmp_path / "hp" / "meta.json").exists()


def test_mine_missing_embeddings(tmp_path, capsys):
    err = _run_error(capsys, ["mine", "--embeddings", str(tmp_path / "nope"), "--out", str(tmp_path / "hp")])
    assert "helip embed" in err


def test_mine_incomplete_embeddings(tmp_path, capsys):
    emb = _embeddings(tmp_path / "emb")
    (emb / "meta.json").unlink()  # an interrupted `helip embed` leaves no meta.json
    err = _run_error(capsys, ["mine", "--embeddings", str(emb), "--out", str(tmp_path / "hp")])
    assert "meta.json" in err


def test_mine_then_csv(tmp_path, capsys):
    emb = _embeddings(tmp_path / "emb", n_img=30, n_txt=30)
    assert main(["mine", "--embeddings", str(emb), "--out", str(tmp_path / "hp"), "--k", "4",
                 "--csv", str(tmp_path / "hard.csv")]) == 0
    from helip.mining import load_hard_pairs, read_csv
    hp = load_hard_pairs(tmp_path / "hp")
    back = read_csv(tmp_path / "hard.csv", n=30)
    width = back.indices.shape[1]
    assert (back.indices == hp.indices[:, :width]).all()


def test_train_with_hard_pairs_of_another_dataset(tmp_path, capsys):
    # hard pairs mined for a dataset with other captions must be refused, not silently used
    _embeddings(tmp_path / "emb", n_img=40, n_txt=40)
    assert main(["mine", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "hp"), "--k", "3"]) == 0
    capsys.readouterr()
    err = _run_error(capsys, ["train", "--data", "world", "--model", "helip-tiny-vit", "--n-train", "40",
                              "--hard-pairs", str(tmp_path / "hp"), "--steps", "1",
                              "--batch-size", "8", "--out", str(tmp_path / "run")])
    assert "another dataset" in err
    assert not (tmp_path / "run" / "model.pt").exists()


def test_unknown_model(tmp_path, capsys):
    err = _run_error(capsys, ["embed", "--data", "world", "--model", "no-such-model", "--n-train", "10", "--out",
                              str(tmp_path / "e")])
    assert "no-such-model" in err


def test_missing_checkpoint(tmp_path, capsys):
    err = _run_error(capsys, ["embed", "--data", "world", "--model", "helip-tiny-vit", "--pretrained",
                              str(tmp_path / "missing.pt"), "--n-train", "10",
                              "--out", str(tmp_path / "e")])
    assert "missing.pt" in err


def test_help_lists_every_stage(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for stage in ("demo", "pretrain", "embed", "mine", "train", "eval", "report"):
        assert stage in out
