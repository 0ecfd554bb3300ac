"""Bad real-data input through `helip embed`: one clear line on stderr, exit status 2, nothing written."""
import numpy as np
import pytest

from helip.app.cli import main
from helip.data.sources import open_pairs
from helip.errors import StaleError

from test_sources import write_dataset


def _run_error(capsys, argv):
    rc = main([*argv, "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


@pytest.fixture()
def data(tmp_path):
    return write_dataset(tmp_path / "d")


def test_missing_shard(tmp_path, capsys, data):
    err = _run_error(capsys, ["embed", "--model", "helip-tiny-vit", "--data",
                              str(data / "shards" / "{00000..00003}.tar"),
                              "--out", str(tmp_path / "e")])
    assert "00002.tar does not exist" in err and "2 of the 4 shards" in err
    assert not (tmp_path / "e").exists()


def test_csv_without_the_named_columns(tmp_path, capsys, data):
    err = _run_error(capsys, ["embed", "--model", "helip-tiny-vit", "--data", str(data / "pairs.tsv"),
                              "--csv-img-key", "image",
                              "--out", str(tmp_path / "e")])
    assert "no column 'image'" in err and "--csv-img-key" in err and "title, filepath" in err
    assert not (tmp_path / "e").exists()


def test_unknown_model_with_real_data(tmp_path, capsys, data):
    err = _run_error(capsys, ["embed", "--data", str(data / "pairs.jsonl"), "--model", "ViT-Q-99",
                              "--out", str(tmp_path / "e")])
    assert "OpenCLIP does not know the model 'ViT-Q-99'" in err


def test_unknown_data_kind_and_malformed_jsonl(tmp_path, capsys, data):
    err = _run_error(capsys, ["embed", "--model", "helip-tiny-vit", "--data", str(data / "pairs.parquet"), "--out",
                              str(tmp_path / "e")])
    assert "--data" in err and ".jsonl" in err
    (data / "bad.jsonl").write_text('{"image": "img/000.png", "caption": "ok"}\n{"image": "img/001.png"}\n')
    err = _run_error(capsys, ["embed", "--model", "helip-tiny-vit", "--data", str(data / "bad.jsonl"), "--out",
                              str(tmp_path / "e")])
    assert "bad.jsonl:2" in err and "'caption'" in err


def test_hard_pairs_of_another_dataset_are_refused(tmp_path, capsys, data):
    # hard pairs mined on the TSV's pairs, checked against a dataset with other captions
    assert main(["embed", "--model", "helip-tiny-vit", "--data", str(data / "pairs.tsv"), "--out",
                 str(tmp_path / "e"), "--no-progress"]) == 0
    assert main(["mine", "--embeddings", str(tmp_path / "e"), "--out", str(tmp_path / "hp"), "--k", "2"]) == 0
    from helip.mining import load_hard_pairs

    load_hard_pairs(tmp_path / "hp", open_pairs(str(data / "pairs.jsonl")).fingerprint())  # same pairs: accepted
    other = write_dataset(tmp_path / "other", captions=[f"caption {i}" for i in range(6)])
    with pytest.raises(StaleError, match="another dataset"):
        load_hard_pairs(tmp_path / "hp", open_pairs(str(other / "pairs.jsonl")).fingerprint())
    assert np.load(tmp_path / "hp" / "hard_pairs.npy").shape == (6, 2)
