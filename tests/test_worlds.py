"""The family of worlds: the built-in member unchanged, the others deterministic, distinct and well formed."""
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from helip.app import worlds
from helip.app.worlds import DEV_WORLDS, HELDOUT_WORLDS, WORLDS, get_world
from helip.errors import ConfigError
from helip.training import steps_for_epochs

ROOT = Path(__file__).resolve().parents[1]


def _digest(split) -> str:
    h = hashlib.sha256()
    h.update(split.images.tobytes())
    h.update("\n".join(split.captions).encode())
    for k in sorted(split.attrs):
        h.update(split.attrs[k].tobytes())
    return h.hexdigest()


def test_builtin_world_is_bit_identical_to_before_the_family():
    # digest of (train 300, val 100, test 100) of sample seed 0, computed with the world module before the family
    h = hashlib.sha256()
    for s, n in (("train", 300), ("val", 100), ("test", 100)):
        w = worlds.generate(n, 0, s)
        h.update(w.images.tobytes())
        h.update("\n".join(w.captions).encode())
        for k in sorted(w.attrs):
            h.update(w.attrs[k].tobytes())
    assert h.hexdigest() == "5a1c72e84bff88b4f878366a6c1e67ce835f35b668dcd6a8d02a9935121ceb7d"


def test_demo_cache_keys_unchanged_for_the_builtin_world():
    from helip.app.demo import DemoConfig, _pretrain_key

    # the key of the demo's 600-step starting model: it changes only when what the starting model is changes
    assert _pretrain_key(DemoConfig()) == "11cfc92952de1701"
    assert _pretrain_key(DemoConfig.quick()) == "f09850121bb60c4c"
    other = DemoConfig(world="w1")
    assert _pretrain_key(other) != _pretrain_key(DemoConfig())


def test_split_is_fixed_disjoint_and_large_enough():
    assert len(DEV_WORLDS) >= 4 and len(HELDOUT_WORLDS) >= 4
    assert not set(DEV_WORLDS) & set(HELDOUT_WORLDS)
    assert "builtin" in DEV_WORLDS  # the demo's defaults were tuned on it: it can never be held out
    assert set(DEV_WORLDS) | set(HELDOUT_WORLDS) == set(WORLDS)
    with pytest.raises(ConfigError):
        get_world("nope")


def test_worlds_differ_in_structure():
    specs = [w.spec for w in WORLDS.values() if w.spec is not None]
    assert len(specs) >= 7
    layouts = {(s.shapes, s.positions, tuple(n for n, _ in s.scenes), s.fills, s.n_sizes, s.background)
               for s in specs}
    assert len(layouts) == len(specs)
    # the structure varies along several axes across the family, not only in colours
    assert len({s.positions for s in specs}) >= 3
    assert len({tuple(n for n, _ in s.scenes) for s in specs}) >= 2
    assert len({s.background for s in specs}) >= 3
    assert len({s.phrase_forms for s in specs}) >= 3


@pytest.mark.parametrize("name", list(WORLDS))
def test_world_is_deterministic_and_its_tasks_well_formed(name):
    w = get_world(name)
    a = w.generate(60, 0, "test")
    assert a.images.shape == (60, 32, 32, 3) and a.images.dtype == np.uint8 and len(a.captions) == 60
    assert _digest(a) == _digest(w.generate(60, 0, "test"))
    assert _digest(a) != _digest(w.generate(60, 1, "test"))      # the sample seed draws other pairs
    assert _digest(a) != _digest(w.generate(60, 0, "val"))       # splits are independent streams
    assert a.images.std() > 5                                    # something is drawn
    tasks = w.zeroshot_tasks(a)
    assert {t.fine_grained for t in tasks} == {False, True}      # coarse and fine-grained tasks
    assert len({t.name for t in tasks}) == len(tasks)
    for t in tasks:
        assert len(t.indices) == len(t.labels) and len(t.classnames) == len(set(t.classnames)) >= 2
        assert len(t.labels) == 0 or (t.labels.min() >= 0 and t.labels.max() < len(t.classnames))
    y = w.probe_labels(a)
    assert len(y) == 60 and y.min() >= 0


def test_captions_use_the_words_of_their_world():
    spec = get_world("w6").spec
    split = get_world("w6").generate(40, 0, "train")
    from helip.app.worlds.family import COLOUR_POOL

    for cap, c in zip(split.captions, split.attrs["colour_a"]):
        assert any(word in cap for word in COLOUR_POOL[spec.colours[c]][1][:spec.n_synonyms])


def test_an_epoch_counts_pairs_seen_the_same_for_both_variants():
    assert steps_for_epochs(20000, 2, 128) == 313
    assert steps_for_epochs(20000, 1, 64, accum_steps=2, world_size=2) == 79
    assert steps_for_epochs(10, 0.5, 128) == 1
    with pytest.raises(ConfigError):
        steps_for_epochs(100, 0, 32)


def test_bench_quality_worlds_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("HELIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_quality_t", ROOT / "benchmarks" / "bench_quality.py")
    bq = importlib.util.module_from_spec(spec)
    sys.modules["bench_quality_t"] = bq
    spec.loader.exec_module(bq)
    out = tmp_path / "r.json"
    assert bq.main(["--worlds", "w2", "--protocol", "smoke", "--seeds", "0", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["git"]["commit"] and r["machine"]["cpu_count"] and r["options"]["worlds"] == "w2"
    w2 = r["results"]["w2"]
    assert [c["step"] for c in w2["plateau"]["attempts"][0]["curve"]] == [8, 16]
    assert {run["variant"] for run in w2["runs"]} == {"baseline", "helip"}
    assert r["comparisons"][0]["split"] == "val" and "w2" in r["comparisons"][0]["per_world"]
    assert "helip - baseline" in out.with_suffix(".md").read_text()
    # held-out worlds are never searched
    with pytest.raises(SystemExit):
        bq.main(["--worlds", "heldout", "--protocol", "smoke", "--variants", "baseline,helip,mix0.5"])
    # a cap on the plateau rule's doubling: one length, reported as such
    capped = tmp_path / "capped.json"
    assert bq.main(["--worlds", "w2", "--protocol", "smoke", "--seeds", "0", "--max-pretrain-steps", "16",
                    "--out", str(capped)]) == 0
    c = json.loads(capped.read_text())
    assert c["protocol"]["max_pretrain_steps"] == 16 and len(c["results"]["w2"]["plateau"]["attempts"]) == 1
    with pytest.raises(SystemExit):
        bq.main(["--worlds", "w2", "--protocol", "smoke", "--max-pretrain-steps", "8"])
    # the ablation table joins runs of the same protocol and lr made world by world
    spec = importlib.util.spec_from_file_location("ablation_table_t", ROOT / "benchmarks" / "ablation_table.py")
    at = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(at)
    other = {**c, "worlds": ["w3"], "results": {"w3": c["results"]["w2"]}}
    (joined_path, joined), = at.join_runs([("a.json", c), ("b.json", other)])
    assert joined["worlds"] == ["w2", "w3"] and joined_path == "a.json+b.json"
    rows = list(at._rows(joined, joined_path))
    assert {r["variant"] for r in rows} == {"baseline", "helip"} and all(r["worlds"] == ["w2", "w3"] for r in rows)
    assert len(at.join_runs([("a.json", c), ("c.json", c)])) == 2  # the same worlds twice: never joined


def test_cli_train_epochs_on_a_family_world(tmp_path):
    from helip.app.cli import main

    out = tmp_path / "run"
    assert main(["train", "--data", "world", "--model", "helip-tiny-vit", "--world", "w2", "--n-train", "64",
                 "--batch-size", "32", "--epochs", "1.5", "--out", str(out)]) == 0
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["steps"] == 3  # ceil(1.5 x 64 / 32): the same for random and hard-pair batches
