"""Models and checkpoints: OpenCLIP names, JSON configs, helip and open_clip_train checkpoints, stock loading."""
import json

import open_clip
import pytest
import torch

from helip.errors import ConfigError, InputError
from helip.models import load_model, save_checkpoint


def _embed(model):
    torch.manual_seed(1)
    images = torch.randn(3, 3, 32, 32)
    tokens = open_clip.get_tokenizer("helip-tiny-vit")(["a red circle", "two squares", "a star"])
    model.eval()
    with torch.no_grad():
        return model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)


@pytest.fixture(scope="module")
def trained():
    """A tiny model whose weights differ from any fresh initialisation."""
    torch.manual_seed(0)
    lm = load_model("helip-tiny-vit")
    with torch.no_grad():
        for p in lm.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return lm


def test_helip_checkpoint_loads_with_stock_open_clip(tmp_path, trained):
    path = save_checkpoint(trained.model, tmp_path / "model.pt")
    stock = open_clip.create_model("helip-tiny-vit", pretrained=str(path))  # plain OpenCLIP, no helip code
    for a, b in zip(_embed(trained.model), _embed(stock)):
        assert torch.equal(a, b)


def test_open_clip_train_checkpoint_with_module_prefixes_loads(tmp_path, trained):
    state = {f"module.{k}": v for k, v in trained.model.state_dict().items()}  # DDP-wrapped, as open_clip_train saves
    optimizer = torch.optim.AdamW(trained.model.parameters())
    torch.save({"epoch": 2, "name": "run", "state_dict": state, "optimizer": optimizer.state_dict()},
               tmp_path / "epoch_2.pt")
    lm = load_model("helip-tiny-vit", str(tmp_path / "epoch_2.pt"))
    for a, b in zip(_embed(trained.model), _embed(lm.model)):
        assert torch.equal(a, b)


def test_json_model_config_path(tmp_path, trained):
    from helip.models import CONFIG_DIR

    cfg = json.loads((CONFIG_DIR / "helip-tiny-vit.json").read_text())
    cfg["vision_cfg"]["layers"] = 1
    path = tmp_path / "my-tiny-clip.json"
    path.write_text(json.dumps(cfg))
    lm = load_model(str(path))
    assert lm.name == "my-tiny-clip" and len(lm.model.visual.transformer.resblocks) == 1
    ckpt = save_checkpoint(lm.model, tmp_path / "m.pt")
    stock = open_clip.create_model("my-tiny-clip", pretrained=str(ckpt))  # registered under the file's stem
    assert torch.equal(_embed(lm.model)[0], _embed(stock)[0])
    bad = tmp_path / "broken.json"
    bad.write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        load_model(str(bad))


def test_bad_model_and_pretrained_values():
    with pytest.raises(ConfigError, match="no-such-model"):
        load_model("no-such-model")
    with pytest.raises(ConfigError, match="openai"):  # the tags of ViT-B-32 are listed, nothing is downloaded
        load_model("ViT-B-32", "no-such-tag")
    with pytest.raises(InputError, match="does not exist"):
        load_model("helip-tiny-vit", "runs/missing/epoch_3.pt")
