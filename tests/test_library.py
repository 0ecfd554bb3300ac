"""helip as a library: the documented own-loop recipe, the defaults it shares with the CLI, the layout."""
import ast
import inspect
import re
import sys
from pathlib import Path

import pytest
import torch
from open_clip_train.scheduler import cosine_lr

import helip
from helip import HardNegativeMarginLoss, HardPairBatchSampler, HelipLoss, PartnerMasker, TensorPairs, defaults
from helip.app.cli import build_parser
from helip.app.demo import DemoConfig
from helip.errors import ConfigError
from helip.models import load_model, save_checkpoint
from helip.training import TrainConfig, list_checkpoints, train
from helip.training.trainer import _param_groups

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "library.md"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only add synchronisation on a shared CPU
    yield
    torch.set_num_threads(before)


def recipe_code(path: Path = DOC):
    """The Python block under the test marker (``<!-- tests/test_library.py runs this block ... -->``)."""
    m = re.search(r"<!-- tests/test_library\.py runs this block[^>]*-->\s*```python\n(.*?)```", path.read_text(), re.S)
    return m.group(1) if m else None


def test_readme_recipe_is_the_tested_one():
    """A copy of the recipe in the README (under the same marker) must be the block the test below runs."""
    assert recipe_code() is not None, "docs/library.md lost its tested recipe block"
    readme = recipe_code(ROOT / "README.md")
    assert readme is None or readme == recipe_code()


class Recording(TensorPairs):
    """Pairs that remember every batch read from them."""

    def __init__(self, *a):
        super().__init__(*a)
        self.batches = []

    def gather(self, indices):
        self.batches.append([int(i) for i in indices])
        return super().gather(indices)


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(1, 49408, (n, 32), generator=g)


def test_own_loop_recipe_trains_what_helip_train_trains(tmp_path, monkeypatch):
    torch.manual_seed(0)
    start = save_checkpoint(load_model("helip-tiny-vit").model, tmp_path / "start.pt")
    images, tokens = _data()
    seed, batch_size, epochs, lr, warmup = 3, 16, 2, 1e-3, 2
    steps = epochs * len(images) // (batch_size // (1 + defaults.HARD_PER_TARGET))  # each pair a target once

    losses = []  # every HelipLoss call of both runs, in order
    forward = HelipLoss.forward

    def recording(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        losses.append({k: float(v.detach()) for k, v in out.items()})
        return out

    monkeypatch.setattr(HelipLoss, "forward", recording)

    # the recipe, as documented, around the optimiser and schedule helip train uses
    model = load_model("helip-tiny-vit", str(start)).model
    optimizer = torch.optim.AdamW(_param_groups(model, 0.1), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    ns = {"model": model, "dataset": Recording(images, tokens), "device": "cpu", "batch_size": batch_size,
          "seed": seed, "epochs": epochs, "optimizer": optimizer,
          "scheduler": cosine_lr(optimizer, lr, warmup, steps)}
    exec(compile(recipe_code(), str(DOC), "exec"), ns)
    assert ns["step"] == steps and len(losses) == steps
    recipe_losses, recipe_batches = list(losses), ns["dataset"].batches[-steps:]  # before them: embedding
    hard = ns["hard"]
    assert sum(r.get("hnml_loss", 0) > 0 for r in recipe_losses) >= steps // 2  # HNML is at work
    assert all(set(r) <= {"contrastive_loss", "hnml_loss"} for r in recipe_losses)

    # helip train on the same data, hard pairs, seed and schedule
    losses.clear()
    data = Recording(images, tokens)
    cfg = TrainConfig(model="helip-tiny-vit", pretrained=str(start), steps=steps, batch_size=batch_size, lr=lr,
                      warmup_steps=warmup, seed=seed, log_every=1, progress=False, device="cpu")
    res = train(cfg, data, tmp_path / "run", hard=hard)

    assert data.batches == recipe_batches  # the same batches, in the same order
    assert len(losses) == steps
    for mine, theirs in zip(recipe_losses, losses):
        assert mine.keys() == theirs.keys()
        assert mine == pytest.approx(theirs, abs=1e-6)
    assert [h["hnml"] for h in res.history] == pytest.approx([r["hnml_loss"] for r in recipe_losses], abs=1e-6)
    for (name, a), b in zip(ns["model"].state_dict().items(), res.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_cli_library_and_demo_share_the_defaults(capsys):
    train_args = build_parser().parse_args(["train", "--data", "world", "--model", "m", "--out", "o"])
    cfg, demo = TrainConfig(), DemoConfig().continued
    sampler = inspect.signature(HardPairBatchSampler.from_hard_pairs).parameters
    expected = {"hard_per_target": defaults.HARD_PER_TARGET, "top_k": defaults.TOP_K,
                "hard_fraction": defaults.HARD_FRACTION, "hard_temperature": defaults.HARD_TEMPERATURE,
                "hard_temperature_mode": defaults.HARD_TEMPERATURE_MODE, "hnml_weight": defaults.HNML_WEIGHT,
                "hnml_margin": defaults.HNML_MARGIN}
    for name, value in expected.items():
        assert getattr(train_args, name) == getattr(cfg, name) == getattr(demo, name) == value, name
        param = "temperature_mode" if name == "hard_temperature_mode" else name
        if param in sampler:
            assert sampler[param].default == value, name
    hnml = HardNegativeMarginLoss()
    assert (hnml.weight, hnml.margin) == (defaults.HNML_WEIGHT, defaults.HNML_MARGIN)
    assert inspect.signature(PartnerMasker).parameters["top_k"].default == defaults.TOP_K
    # real users' defaults outside the demo: a continued-training learning rate, the device found
    assert train_args.lr == cfg.lr == defaults.LR
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    assert f"default {defaults.LR}" in " ".join(capsys.readouterr().out.split())  # stated in --help
    assert demo.lr != defaults.LR and demo.model == "helip-tiny-vit" and cfg.model is None
    for argv in (["train", "--data", "x", "--model", "m", "--out", "o"], ["embed", "--data", "x", "--out", "o"],
                 ["mine", "--embeddings", "e", "--out", "o"], ["eval", "--out", "o"], ["pretrain", "--out", "o"]):
        assert build_parser().parse_args(argv).device == "auto", argv[0]


def test_train_from_python_refuses_an_earlier_run_and_takes_a_model(tmp_path):
    images, tokens = _data(n=32)
    torch.manual_seed(0)
    model = load_model("helip-tiny-vit").model
    cfg = TrainConfig(steps=1, batch_size=16, warmup_steps=0, progress=False, device="cpu")
    with pytest.raises(ConfigError, match="no model"):
        train(cfg, TensorPairs(images, tokens), tmp_path)
    res = train(cfg, TensorPairs(images, tokens), tmp_path, model=model)  # an object, not a name
    assert res.model is model and list_checkpoints(tmp_path)
    with pytest.raises(ConfigError, match="--resume auto"):
        train(cfg, TensorPairs(images, tokens), tmp_path, model=model)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]  # refused, nothing deleted
    train(cfg, TensorPairs(images, tokens), tmp_path, model=model, overwrite=True)


# ----------------------------------------------------------------------------- layout

SRC = ROOT / "src" / "helip"


def _module_imports():
    """{module: (set of helip modules it imports, set of third-party top-level names)}, lazy imports included."""
    mods = {}
    for p in SRC.rglob("*.py"):
        parts = list(p.relative_to(SRC.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    out = {}
    for name, (path, is_pkg) in mods.items():
        inner, outer = set(), set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = name.split(".")[: (len(name.split(".")) if is_pkg else len(name.split(".")) - 1)
                                         - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                for a in node.names:
                    inner.add(f"{target}.{a.name}" if f"{target}.{a.name}" in mods else target)
            elif isinstance(node, ast.ImportFrom):
                if node.module.split(".")[0] == "helip":
                    inner.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                                 for a in node.names)
                else:
                    outer.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                for a in node.names:
                    (inner.add(a.name) if a.name.split(".")[0] == "helip" else outer.add(a.name.split(".")[0]))
        out[name] = ({m for m in inner if m in mods and m != name}, outer - {"__future__"})
    return out


def test_no_import_cycles_and_the_library_never_imports_the_application():
    graph = {m: deps for m, (deps, _) in _module_imports().items()}
    for m, deps in graph.items():
        if not m.startswith("helip.app") and m != "helip.__main__":  # `python -m helip` runs the command
            assert not [d for d in deps if d.startswith("helip.app")], m
    # a cycle is a module reachable from itself
    for start in graph:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            assert m != start, f"import cycle through {start}"
            if m not in seen:
                seen.add(m)
                todo.extend(graph[m])


def test_declared_dependencies_cover_the_imports():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dist = lambda spec: re.split(r"[<>=!\[; ]", spec)[0].lower()  # noqa: E731
    core = {dist(s) for s in project["dependencies"]}
    extras = {k: {dist(s) for s in v} for k, v in project["optional-dependencies"].items()}
    provided_by = {"PIL": "pillow", "sklearn": "scikit-learn", "faiss": "faiss-cpu", "open_clip": "open_clip_torch",
                   "open_clip_train": "open_clip_torch", "sentence_transformers": "sentence-transformers"}
    optional = {"sentence_transformers": "encoders"}  # imported only when asked for, with a message if missing
    stdlib = set(sys.stdlib_module_names)
    for module, (_, third) in _module_imports().items():
        allowed = core | (extras["app"] if module.startswith("helip.app") else set())
        if module == "helip.open_clip_train":  # the plug-in needs what open_clip_train imports: its own extra
            allowed = allowed | extras["open_clip_train"]
        for name in third - stdlib:
            if name in optional:
                assert provided_by[name] in extras[optional[name]], name
                continue
            assert provided_by.get(name, name).lower() in allowed, f"{module} imports {name}, not declared"


def test_report_without_the_app_extra_is_one_clear_error(monkeypatch, capsys, tmp_path):
    from helip.app.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as in an install without helip[app]
    monkeypatch.delitem(sys.modules, "helip.app.report", raising=False)
    (tmp_path / "results.json").write_text("{}")
    assert main(["report", "--results", str(tmp_path / "results.json"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'helip[app]'" in err and len(err.strip().splitlines()) == 1
