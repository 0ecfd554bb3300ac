"""SLIP: checkpoint conversion equals SLIP's forward pass, the real configs fit SLIP's layout, bad input.

The reference model (tests/slip_reference.py) is written from SLIP's published
layout. The conversion is checked numerically on reduced-depth versions of the
three sizes (same widths, heads, patch size and text tower width; 2 vision and
2 text layers, 32-pixel images) and structurally, at full size on the meta
device, for the shipped configs.
"""
import json
import math

import numpy as np
import open_clip
import pytest
import timm
import torch
from slip_reference import ReferenceSLIP, save_slip_checkpoint
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer, _create_vision_transformer

from helip.app.cli import main
from helip.models import CONFIG_DIR, load_model, register_configs
from helip.slip import (HEAD_FILE, SLIP_SIZES, SlipConfig, build_slip_training, check_fits, convert_slip_checkpoint,
                        convert_state_dict, load_head, resolve_size)

WIDTH = {"S": 384, "B": 768, "L": 1024}
HEADS = {"S": 12, "B": 12, "L": 16}
DEPTH = {"S": 12, "B": 12, "L": 24}
REDUCED = dict(depth=2, img_size=32)
SMALL_VOCAB = 4096   # the equality tests feed synthetic token ids; the real tokenizer needs 49408


def _register_reduced_timm():
    for s in "SBL":
        name = f"test_slip_vit_{s.lower()}_reduced"
        if timm.is_model(name):
            continue

        def build(pretrained=False, _s=s, **kw):
            return _create_vision_transformer("vit_small_patch16_224", pretrained=False, patch_size=16,
                                              embed_dim=WIDTH[_s], num_heads=HEADS[_s], **REDUCED, **kw)
        build.__name__ = name
        register_model(build)


@pytest.fixture(scope="module")
def reduced_configs(tmp_path_factory):
    """The shipped SLIP configs with 2 vision layers, 2 text layers and 32-pixel images, registered with OpenCLIP.

    Keys S, B, L have a 4096-token vocabulary (fast); "S-full" keeps SLIP's
    49408 tokens, for tests that tokenise real captions.
    """
    register_configs()
    _register_reduced_timm()
    d = tmp_path_factory.mktemp("configs")
    names = {}
    for key, s, vocab in (("S", "S", SMALL_VOCAB), ("B", "B", SMALL_VOCAB), ("L", "L", SMALL_VOCAB),
                          ("S-full", "S", 49408)):
        size = SLIP_SIZES[s]
        cfg = json.loads((CONFIG_DIR / f"{size.config}.json").read_text())
        cfg["vision_cfg"].update(timm_model_name=f"test_slip_vit_{s.lower()}_reduced", image_size=32)
        cfg["text_cfg"].update(layers=2, vocab_size=vocab)
        path = d / f"test-{size.config}-{vocab}.json"
        path.write_text(json.dumps(cfg))
        open_clip.add_model_config(path)
        names[key] = (path.stem, path)
    return names


def _reference(s, with_head=True, seed=0, vocab=SMALL_VOCAB):
    visual = VisionTransformer(patch_size=16, embed_dim=WIDTH[s], num_heads=HEADS[s], num_classes=0, **REDUCED)
    return ReferenceSLIP(visual, WIDTH[s], vocab_size=vocab, text_layers=2, mlp_dim=64, out_dim=16,
                         with_head=with_head).randomize(seed)


def _inputs(seed=0, n=4):
    """Images, and token rows shaped like the tokenizer's: start, words, end (the largest id), zero padding."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    tokens = torch.zeros(n, 77, dtype=torch.long)
    for i, length in enumerate((3, 10, 76, 30)[:n]):
        tokens[i, 0] = SMALL_VOCAB - 2
        tokens[i, 1:length] = torch.randint(1, SMALL_VOCAB - 2, (length - 1,), generator=g)
        tokens[i, length] = SMALL_VOCAB - 1
    return images, tokens


@pytest.mark.parametrize("s", ["S", "B", "L"])
def test_converted_model_equals_slip_forward(reduced_configs, tmp_path, s):
    name, _ = reduced_configs[s]
    ref = _reference(s).eval()
    src = tmp_path / "slip.pt"
    save_slip_checkpoint(ref, src, f"SLIP_VIT{s}16")
    out = tmp_path / "converted"
    res = convert_slip_checkpoint(src, out, model=name)
    assert res.model_name == name and res.head == out / HEAD_FILE
    model = open_clip.create_model(name, pretrained=str(out / "model.pt")).eval()   # stock OpenCLIP
    images, tokens = _inputs()
    with torch.no_grad():
        for ours, theirs in ((model.encode_image(images), ref.encode_image(images)),
                             (model.encode_text(tokens), ref.encode_text(tokens)),
                             (model.get_logits(images, tokens)[0], ref.logits(images, tokens))):
            assert ours.shape == theirs.shape
            assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), (ours - theirs).abs().max()
        # the SimCLR head, in eval mode (running statistics) and train mode (batch statistics)
        head = load_head(out / HEAD_FILE).eval()
        feats = ref.visual(images)
        assert torch.allclose(head(feats), ref.image_mlp(feats), atol=1e-5, rtol=0)
        head.train(), ref.image_mlp.train()
        assert torch.allclose(head(feats), ref.image_mlp(feats), atol=1e-5, rtol=0)
    meta = json.loads((out / "slip_meta.json").read_text())
    assert meta["model"] == name and meta["slip"]["model"] == f"SLIP_VIT{s}16" and meta["slip"]["epoch"] == 40


@pytest.mark.parametrize("s", ["S", "B", "L"])
def test_shipped_configs_fit_slip_layout_at_full_size(s):
    """Full-size reference on the meta device: converted names and shapes are exactly the shipped config's."""
    register_configs()
    size = SLIP_SIZES[s]
    with torch.device("meta"):
        visual = VisionTransformer(patch_size=16, embed_dim=WIDTH[s], depth=DEPTH[s], num_heads=HEADS[s],
                                   num_classes=0)
        ref = ReferenceSLIP(visual, WIDTH[s])
        model = open_clip.create_model(size.config, device="meta")
    clip_state, head_state = convert_state_dict(dict(ref.state_dict()))
    check_fits(clip_state, size.config, "reference")   # raises on any missing/unexpected key or shape mismatch
    assert {k: v.shape for k, v in clip_state.items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert head_state["layer1.weight"].shape == (4096, WIDTH[s]) and head_state["layer3.weight"].shape == (256, 4096)
    # what shapes cannot show: heads, activation, pooling
    assert model.visual.trunk.blocks[0].attn.num_heads == HEADS[s]
    assert model.visual.trunk.global_pool == "token"
    assert model.transformer.resblocks[0].attn.num_heads == 8
    assert type(model.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert resolve_size(f"SLIP_VIT{s}16") == size and resolve_size(s.lower()) == size


def test_preprocessing_is_slips(reduced_configs):
    """SLIP models get SLIP's eval transform (ImageNet statistics), not OpenCLIP's OpenAI defaults."""
    register_configs()
    with torch.device("meta"):
        lm = load_model("SLIP-ViT-B-16", device="meta")
    norm = [t for t in lm.preprocess.transforms if type(t).__name__ == "Normalize"][0]
    assert tuple(norm.mean) == (0.485, 0.456, 0.406) and tuple(norm.std) == (0.229, 0.224, 0.225)


def _one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and match in err, err
    return err


def test_bad_input_gives_one_line_errors(reduced_configs, tmp_path, capsys):
    # an OpenCLIP checkpoint is not a SLIP checkpoint
    tiny = load_model("helip-tiny-vit").model
    torch.save(tiny.state_dict(), tmp_path / "openclip.pt")
    _one_line_error(capsys, ["convert-slip", str(tmp_path / "openclip.pt"), str(tmp_path / "o1")],
                    "not a SLIP checkpoint")
    # not a checkpoint at all
    (tmp_path / "notes.txt").write_text("hello")
    _one_line_error(capsys, ["convert-slip", str(tmp_path / "notes.txt"), str(tmp_path / "o2")],
                    "not a readable torch checkpoint")
    _one_line_error(capsys, ["convert-slip", str(tmp_path / "missing.pt"), str(tmp_path / "o3")], "does not exist")
    # a SLIP size that does not exist: in the checkpoint's args, or on the command line
    ref = _reference("B", with_head=False)
    save_slip_checkpoint(ref, tmp_path / "huge.pt", "SLIP_VITH14")
    _one_line_error(capsys, ["convert-slip", str(tmp_path / "huge.pt"), str(tmp_path / "o4")], "unknown SLIP size")
    _one_line_error(capsys, ["convert-slip", str(tmp_path / "huge.pt"), str(tmp_path / "o5"), "--size", "XL"],
                    "unknown SLIP size")
    # a size that does not match the weights (reduced depth/image size vs the real ViT-B/16)
    err = _one_line_error(capsys, ["convert-slip", str(tmp_path / "huge.pt"), str(tmp_path / "o6"), "--size", "B"],
                          "does not fit SLIP-ViT-B-16")
    assert "missing keys" in err and "shape mismatches" in err
    # a SimCLR-only checkpoint has no text tower
    torch.save({"state_dict": {"module.visual.cls_token": torch.zeros(1, 1, 8),
                               "module.image_mlp.layer1.weight": torch.zeros(4, 8)},
                "args": {"model": "SIMCLR_VITB16"}}, tmp_path / "simclr.pt")
    _one_line_error(capsys, ["convert-slip", str(tmp_path / "simclr.pt"), str(tmp_path / "o7")], "SimCLR-only")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 8))   # nothing half-written


def test_clip_checkpoint_converts_without_head_and_trains_with_slip(reduced_configs, tmp_path, capsys):
    """SLIP's CLIP checkpoints (no image_mlp) convert too; SLIP training then starts a fresh head."""
    name, cfg_path = reduced_configs["S"]
    ref = _reference("S", with_head=False, seed=1)
    save_slip_checkpoint(ref, tmp_path / "clip.pt", "CLIP_VITS16")
    assert main(["convert-slip", str(tmp_path / "clip.pt"), str(tmp_path / "conv"), "--model", str(cfg_path)]) == 0
    assert "no SimCLR head" in capsys.readouterr().out
    assert not (tmp_path / "conv" / HEAD_FILE).exists()
    lm = load_model(name, str(tmp_path / "conv" / "model.pt"))
    from helip.losses import HelipLoss
    model, _ = build_slip_training(lm.model, HelipLoss(), SlipConfig(mlp_dim=32, out_dim=8),
                                   str(tmp_path / "conv" / "model.pt"))
    assert (model.head.in_dim, model.head.mlp_dim, model.head.out_dim) == (384, 32, 8)


def test_converted_model_evaluates_and_trains_with_slip(reduced_configs, tmp_path):
    """A converted model goes through helip.evaluate and SLIP+HELIP training like any OpenCLIP model."""
    from helip.app import worlds as world
    from helip.data.pairs import prepare_pairs
    from helip.app.worlds import EvalConfig, evaluate_model
    from helip.training import TrainConfig, train

    name, _ = reduced_configs["S-full"]
    ref = _reference("S", seed=2, vocab=49408)
    save_slip_checkpoint(ref, tmp_path / "slip.pt", "SLIP_VITS16")
    conv = convert_slip_checkpoint(tmp_path / "slip.pt", tmp_path / "conv", model=name)
    lm = load_model(name, str(conv.checkpoint))
    splits = {s: world.generate(n, 0, s) for s, n in (("train", 48), ("val", 24), ("test", 24))}
    t = {s: prepare_pairs(splits[s].images, splits[s].captions, lm) for s in splits}
    tasks = {s: world.zeroshot_tasks(splits[s])[:2] for s in ("val", "test")}
    labels = {s: world.probe_labels(splits[s]) for s in splits}
    r = evaluate_model(lm, {"val": t["val"], "test": t["test"]}, tasks, labels, t["train"],
                       EvalConfig(probe_cs=(1.0,), probe_max_iter=50))
    assert 0 <= r["test"]["zeroshot_mean"] <= 1 and set(r["test"]["retrieval"]) >= {"i2t_r1", "t2i_r1"}

    hard = _fake_hard_pairs(len(t["train"]))
    cfg = TrainConfig(model=name, pretrained=str(conv.checkpoint), steps=2, batch_size=8, lr=1e-4, warmup_steps=1,
                      top_k=4, objective="slip", progress=False, log_every=1)
    res = train(cfg, t["train"], tmp_path / "run", hard=hard)
    last = res.history[-1]
    assert {"contrastive", "hnml", "ssl", "total"} <= set(last) and all(math.isfinite(last[k]) for k in last)
    assert abs(last["total"] - (last["contrastive"] + last["hnml"] + last["ssl"])) < 1e-4
    trained = load_head(tmp_path / "run" / HEAD_FILE)
    start = load_head(conv.head)
    # the converted head was used (same shape) and trained (different values)
    assert trained.mlp_dim == start.mlp_dim == 64
    assert not torch.equal(trained.layer1.weight, start.layer1.weight)


def _fake_hard_pairs(n, k=4):
    from helip.mining.store import HardPairs

    rng = np.random.default_rng(0)
    idx = np.stack([rng.permutation(np.delete(np.arange(n), i))[:k] for i in range(n)]).astype(np.int32)
    return HardPairs(indices=idx, scores=np.ones_like(idx, dtype=np.float32), meta={"k": k})


def test_untrusted_objects_need_trust_checkpoint(reduced_configs, tmp_path, capsys):
    """Checkpoints are read with weights_only (SLIP's argparse args allowed); anything else needs the user's say-so."""
    import datetime

    name, cfg_path = reduced_configs["S"]
    ref = _reference("S", seed=3)
    save_slip_checkpoint(ref, tmp_path / "slip.pt", "SLIP_VITS16")
    ckpt = torch.load(tmp_path / "slip.pt", weights_only=False)
    ckpt["saved_on"] = datetime.date(2022, 1, 17)
    torch.save(ckpt, tmp_path / "odd.pt")
    _one_line_error(capsys, ["convert-slip", str(tmp_path / "odd.pt"), str(tmp_path / "o"), "--model", str(cfg_path)],
                    "--trust-checkpoint")
    assert main(["convert-slip", str(tmp_path / "odd.pt"), str(tmp_path / "o"), "--model", str(cfg_path),
                 "--trust-checkpoint"]) == 0
    assert (tmp_path / "o" / "model.pt").is_file() and (tmp_path / "o" / HEAD_FILE).is_file()
