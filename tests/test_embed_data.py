"""`helip embed` on real-data formats: resumable after a kill, skipped pairs recorded and never mined."""
import json

import numpy as np
import torch
import pytest

import helip.embed as embed_mod
from helip.app.cli import main
from helip.data.sources import open_pairs
from helip.embed import EmbedConfig, build_encoders, embed_source, load_embeddings, load_skipped
from helip.models import load_model

from test_sources import CAPTIONS, write_dataset


def _many(n):
    """n distinct captions (the shard fixture's images are random noise, so every pair differs)."""
    return [f"{CAPTIONS[i % len(CAPTIONS)]} number {i}" for i in range(n)]


@pytest.fixture(scope="module")
def lm():
    return load_model("helip-tiny-vit")


def _files(d):
    meta = json.loads((d / "meta.json").read_text())
    meta.pop("seconds")
    return {name: (d / name).read_bytes() for name in ("image.npy", "text.npy", "skipped.json")}, meta


def test_embed_resumed_after_a_kill_gives_the_same_files(tmp_path, monkeypatch, lm):
    caps = _many(24)
    caps[7] = ""
    root = write_dataset(tmp_path / "d", captions=caps, images=None, shards=3, corrupt={20})
    src = open_pairs(str(root / "shards" / "{00000..00002}.tar"))
    cfg = EmbedConfig(batch_size=4, chunk_size=8, progress=False, max_bad_fraction=0.1)
    enc = build_encoders(lm)
    embed_source(src, enc, tmp_path / "full", cfg)

    real_save, calls = embed_mod._save_chunk, []

    def killed_after_one(path, *a):
        if len(calls) == 1:
            raise KeyboardInterrupt("simulated kill")
        calls.append(path)
        real_save(path, *a)
    monkeypatch.setattr(embed_mod, "_save_chunk", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        embed_source(src, enc, tmp_path / "resumed", cfg)
    assert not (tmp_path / "resumed" / "meta.json").exists()  # an interrupted directory never looks complete
    assert len(list((tmp_path / "resumed" / ".partial").glob("chunk_*.npz"))) == 1

    saved = []
    monkeypatch.setattr(embed_mod, "_save_chunk", lambda path, *a: (saved.append(path), real_save(path, *a)))
    embed_source(src, enc, tmp_path / "resumed", cfg)
    assert len(saved) == 3 - 1  # only the unfinished chunks were encoded again
    assert _files(tmp_path / "resumed") == _files(tmp_path / "full")
    assert not (tmp_path / "resumed" / ".partial").exists()

    img, txt, meta = load_embeddings(tmp_path / "full", src.fingerprint())
    assert img.dtype == np.float16 and img.shape == (24, 64) and meta["skipped"]["count"] == 2
    assert load_skipped(tmp_path / "full").tolist() == [7, 20]
    assert not img[[7, 20]].any() and not txt[[7, 20]].any()
    norms = np.linalg.norm(np.asarray(img, dtype=np.float32), axis=1)
    assert np.allclose(np.delete(norms, [7, 20]), 1, atol=1e-2)
    # the vectors are the model's: pair 0 encoded directly gives the same row
    with torch.no_grad():
        direct = lm.model.encode_image(lm.preprocess(src.image(0))[None], normalize=True)[0].numpy()
    assert np.allclose(img[0], direct, atol=2e-3)


def test_shard_with_a_corrupt_image_and_an_empty_caption_reports_two_skipped(tmp_path, capsys):
    caps = _many(12)
    caps[2] = " "
    root = write_dataset(tmp_path / "d", captions=caps, shards=1, corrupt={9})
    shard = str(root / "shards" / "{00000..00000}.tar")
    # default --max-bad-fraction 0.01: 2 of 12 is too many, one clear line and exit 2
    assert main(["embed", "--model", "helip-tiny-vit", "--data", shard, "--out", str(tmp_path / "e0"),
                 "--batch-size", "4", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--max-bad-fraction" in err and "empty caption" in err
    assert not (tmp_path / "e0" / "meta.json").exists()

    assert main(["embed", "--model", "helip-tiny-vit", "--data", shard, "--out", str(tmp_path / "e"), "--batch-size",
                 "6",
                 "--max-bad-fraction", "0.2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "2 skipped: 1 empty captions, 1 unreadable images" in out
    skipped = json.loads((tmp_path / "e" / "skipped.json").read_text())
    assert [s["index"] for s in skipped] == [2, 9]
    assert skipped[0]["reason"] == "empty caption" and "key 000000009" in skipped[1]["reason"]

    # mining never uses them: no row for them, never a hard pair of another
    assert main(["mine", "--embeddings", str(tmp_path / "e"), "--out", str(tmp_path / "hp"), "--k", "3",
                 "--min-similarity", "-1", "--dup-threshold", "1"]) == 0
    from helip.mining import load_hard_pairs
    hp = load_hard_pairs(tmp_path / "hp", open_pairs(shard).fingerprint())
    assert (hp.indices[[2, 9]] == -1).all()
    assert not np.isin(hp.indices, [2, 9]).any()
    assert (hp.indices[[0, 1, 3, 4, 5, 6, 7, 8, 10, 11]] >= 0).all()
    assert hp.meta["excluded"] == 2 and hp.meta["n"] == 12


def test_embed_cli_on_csv_and_jsonl_gives_the_same_embeddings(tmp_path, lm):
    from helip.models import save_checkpoint

    root = write_dataset(tmp_path / "d")
    ckpt = str(save_checkpoint(lm.model, tmp_path / "model.pt"))  # one model for both runs
    for name in ("pairs.tsv", "pairs.jsonl"):
        assert main(["embed", "--model", "helip-tiny-vit", "--data", str(root / name), "--pretrained", ckpt, "--out",
                     str(tmp_path / name),
                     "--no-progress"]) == 0
    a, b = (np.load(tmp_path / name / "image.npy") for name in ("pairs.tsv", "pairs.jsonl"))
    assert a.shape == (len(CAPTIONS), 64) and np.array_equal(a, b)


def test_timm_image_encoder_random_init(tmp_path, lm):
    pytest.importorskip("timm")
    root = write_dataset(tmp_path / "d")
    src = open_pairs(str(root / "pairs.jsonl"))
    enc = build_encoders(lm, image_encoder="resnet10t", image_encoder_weights="none")
    embed_source(src, enc, tmp_path / "e", EmbedConfig(batch_size=3, progress=False))
    img, txt, meta = load_embeddings(tmp_path / "e")
    assert meta["image_encoder"] == "timm:resnet10t" and meta["text_encoder"] == "helip-tiny-vit"
    assert img.shape[1] == meta["image_dim"] == 512 and txt.shape[1] == 64 and "dim" not in meta


def _tiny_sentence_transformer(path):
    """A randomly initialised sentence-transformers model saved locally (BERT, 2 layers, a 40-word vocabulary)."""
    from sentence_transformers import SentenceTransformer
    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = sorted({w.strip(',."') for c in CAPTIONS for w in c.lower().split()} | {"number"})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *[str(i) for i in range(10)]]
    (path / "hf").mkdir(parents=True)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path / "hf")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(path / "hf")
    word = Transformer(str(path / "hf"), max_seq_length=32)
    SentenceTransformer(modules=[word, Pooling(16, "mean")]).save(str(path / "st"))
    return path / "st"


def test_sentence_transformers_text_encoder_from_a_local_dir(tmp_path, lm):
    # skipped where sentence-transformers is not installed (it is optional: importing transformers is slow)
    pytest.importorskip("sentence_transformers")
    st_dir = _tiny_sentence_transformer(tmp_path / "model")
    root = write_dataset(tmp_path / "d")
    assert main(["embed", "--model", "helip-tiny-vit", "--data", str(root / "pairs.jsonl"), "--text-encoder",
                 str(st_dir),
                 "--out", str(tmp_path / "e"), "--no-progress"]) == 0
    img, txt, meta = load_embeddings(tmp_path / "e")
    assert meta["text_encoder"] == f"sentence-transformers:{st_dir}" and txt.shape == (len(CAPTIONS), 16)
    from sentence_transformers import SentenceTransformer
    direct = SentenceTransformer(str(st_dir)).encode(CAPTIONS[:2], normalize_embeddings=True)
    assert np.allclose(txt[:2], direct, atol=2e-3)


def test_encode_images_equals_the_image_half_of_encode_pairs(lm):
    """The linear probe's image-only encoding must give exactly the features encode_pairs gives."""
    from helip.data.pairs import PairTensors
    from helip.embed import encode_images, encode_pairs

    g = torch.Generator().manual_seed(0)
    n = 70  # two batches of 64 below, the second partial
    size = lm.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    pairs = PairTensors(torch.randn(n, 3, size, size, generator=g), torch.randint(1, 400, (n, 32), generator=g),
                        [""] * n)
    lm.model.train()
    img, _ = encode_pairs(lm, pairs, batch_size=64)
    lm.model.train()  # encode_images must not depend on (nor keep) the mode it finds
    only = encode_images(lm, pairs.images, batch_size=64)
    assert lm.model.training
    assert np.array_equal(only, img) and only.shape == (n, img.shape[1])
