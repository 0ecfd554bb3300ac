"""Fault injection: bad input to every command, and runs killed at random points then started again.

Bad input (the table): each case runs the `helip` command in-process and must
exit with status 2, print exactly one line on stderr (no traceback), and leave
every earlier output -- complete embeddings, hard pairs, a training run with
its checkpoints -- byte-identical (a failed rerun's resumable work under
``.partial/`` aside).

Kill and resume: ``helip embed``, ``helip mine`` (also after the embeddings
changed under a killed run) and ``helip train`` run in a subprocess that is
killed (SIGKILL) at a seeded random point; the same command then finishes the
work, and its result must equal an uninterrupted run's.

What this suite checks is described in docs/reliability.md.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helip.app.cli import main as helip_main
from helip.io import fingerprint, save_json

TINY = "helip-tiny-vit"
N = 48  # pairs of the built-in world used by the shared outputs


def _full(argv):
    """``argv`` with the built-in world and the tiny model where the command needs --data / --model."""
    argv = list(argv)
    if argv and argv[0] in ("train", "embed") and "--data" not in argv:
        argv += ["--data", "world"]
    if argv and argv[0] in ("train", "embed", "eval") and "--model" not in argv and "--text-encoder" not in argv:
        argv += ["--model", TINY]
    return argv


def main(argv):
    return helip_main(_full(argv))


# ----------------------------------------------------------------------------- helpers

def _snapshot(root: Path) -> dict:
    """sha256 of every file under root, hidden resumable work (``.partial``) left out."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and ".partial" not in p.parts:
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _ok(argv):
    assert main([*argv]) == 0, argv


def _error_line(capsys, argv) -> str:
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, (argv, rc, err)
    assert len(err.splitlines()) == 1, (argv, err)
    assert "Traceback" not in err and "weights_only=False" not in err, (argv, err)
    return err


def _state_dict(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _write_embeddings(path: Path, n: int, d: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / "image.npy", rng.normal(size=(n, d)).astype(np.float32))
    np.save(path / "text.npy", rng.normal(size=(n, d)).astype(np.float32))
    save_json(path / "meta.json", {"n": n, "fingerprint": fingerprint([f"pair {i}" for i in range(n)])})
    return path


# ----------------------------------------------------------------------------- shared outputs

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Complete earlier outputs (the ones a bad rerun must not touch) and bad input files."""
    root = tmp_path_factory.mktemp("faults")
    run, emb, hp = root / "run", root / "emb", root / "hp"
    _ok(["train", "--n-train", str(N), "--steps", "2", "--batch-size", "8", "--save-every", "1",
         "--out", str(run), "--log-every", "1"])
    ck = run / "model.pt"
    _ok(["embed", "--n-train", str(N), "--pretrained", str(ck), "--out", str(emb), "--chunk-size", "16",
         "--batch-size", "16", "--no-progress"])
    _ok(["mine", "--embeddings", str(emb), "--out", str(hp), "--k", "4"])
    bad = root / "bad"
    bad.mkdir()
    (bad / "garbage.pt").write_bytes(np.random.default_rng(0).bytes(4096))  # fixed bytes: a reproducible run
    data = ck.read_bytes()
    (bad / "truncated.pt").write_bytes(data[:len(data) // 2])
    (bad / "a_file").write_text("not a directory\n")
    # an OpenCLIP config of another architecture (wider text tower) with a checkpoint of it
    cfg = json.loads((Path(__import__("helip").__file__).parent / "model_configs" / f"{TINY}.json").read_text())
    cfg["text_cfg"]["width"] = cfg["text_cfg"]["width"] * 2
    (bad / "Other.json").write_text(json.dumps(cfg))
    # a truncated copy of the embeddings and of the hard pairs
    for src, name, dst in ((emb, "image.npy", "emb_trunc"), (hp, "hard_pairs.npy", "hp_trunc")):
        (bad / dst).mkdir()
        for f in src.iterdir():
            if f.is_file():
                b = f.read_bytes()
                (bad / dst / f.name).write_bytes(b[:len(b) // 2] if f.name == name else b)
    (bad / "emb_garbage").mkdir()
    for f in emb.iterdir():
        if f.is_file():
            (bad / "emb_garbage" / f.name).write_bytes(np.random.default_rng(1).bytes(300) if f.name == "text.npy" else f.read_bytes())
    # tables: a field over csv's limit, bytes that are not UTF-8, unusable images
    (bad / "huge.csv").write_text("filepath,title\nx.png,\"" + "a" * 140_000 + "\"\n")
    (bad / "latin1.tsv").write_bytes("filepath\ttitle\nx.png\tcaf\xe9 cr\xe8me\n".encode("latin-1"))
    (bad / "latin1.jsonl").write_bytes('{"image": "x.png", "caption": "caf\xe9"}\n'.encode("latin-1"))
    (bad / "latin1_captions.csv").write_bytes("image,caption\nx.png,d\xe9j\xe0 vu\n".encode("latin-1"))
    rows = "".join(f"missing_{i}.png\tcaption {i}\n" for i in range(N))
    (bad / "unreadable.tsv").write_text("filepath\ttitle\n" + rows)
    (bad / "list.json").write_text("[1, 2, 3]\n")
    (bad / "not_json.json").write_text("{ this is not json\n")
    # OpenCLIP local-dir: models, with and without weights
    for name, weights in (("localdir", True), ("localdir_noweights", False)):
        d = bad / name
        d.mkdir()
        (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": json.loads(
            (Path(__import__("helip").__file__).parent / "model_configs" / f"{TINY}.json").read_text())}))
        if weights:
            (d / "open_clip_pytorch_model.bin").write_bytes(ck.read_bytes())
    # a CLIP_benchmark WebDataset directory with only a train/ split
    (bad / "wds" / "train").mkdir(parents=True)
    (bad / "wds" / "train" / "0.tar").write_bytes(b"")
    return {"root": root, "run": run, "emb": emb, "hp": hp, "ck": ck, "bad": bad}


def _cases(w):
    """(id, argv, text the message must contain) -- argv as a function of the shared paths."""
    run, emb, hp, ck, bad = (str(w[k]) for k in ("run", "emb", "hp", "ck", "bad"))
    new = str(w["root"] / "new")
    b = Path(bad)
    small = ["--n-train", str(N)]
    tr = ["train", *small, "--steps", "2", "--batch-size", "8"]
    ev = ["eval", "--n-probe-train", "20", "--n-val", "20", "--n-test", "20", "--device", "cpu"]
    return [
        # argparse: one line, not a usage block
        ("argparse-int", [*tr, "--steps", "abc", "--out", new], "invalid int value"),
        ("argparse-choice", ["mine", "--embeddings", emb, "--out", new, "--mode", "bogus"], "invalid choice"),
        ("argparse-command", ["frobnicate"], "invalid choice"),
        ("argparse-missing", ["mine", "--out", new], "--embeddings"),
        # option values that pass `x <= 0` checks
        ("lr-nan", [*tr, "--lr", "nan", "--out", new], "--lr nan"),
        ("margin-inf", [*tr, "--hnml-margin", "inf", "--out", new], "finite"),
        ("temperature-neg-inf", [*tr, "--hard-temperature=-inf", "--out", new], "finite"),
        ("dup-threshold-nan", ["mine", "--embeddings", emb, "--out", new, "--dup-threshold", "nan"], "finite"),
        ("bad-fraction-nan", ["embed", *small, "--max-bad-fraction", "nan", "--out", new], "finite"),
        ("probe-c-inf", [*ev, "--pretrained", ck, "--probe-c-max", "inf", "--out", new + ".json"], "finite"),
        ("pretrain-lr-inf", ["pretrain", *small, "--lr", "inf", "--out", new], "finite"),
        ("n-train-0-train", ["train", "--n-train", "0", "--out", new], "--n-train 0"),
        ("epochs-0", ["train", *small, "--epochs", "0", "--out", new], "--epochs 0"),
        ("epochs-nan", ["train", *small, "--epochs", "nan", "--out", new], "finite"),
        ("unknown-world", ["train", *small, "--world", "w99", "--out", new], "unknown world"),
        ("n-train-0-embed", ["embed", "--n-train", "0", "--out", new], "--n-train 0"),
        ("k-0", ["mine", "--embeddings", emb, "--out", hp, "--k", "0"], "k must be"),
        ("k-too-large", ["mine", "--embeddings", emb, "--out", hp, "--k", "1000"], "--k"),
        ("chunk-size-0", ["embed", *small, "--chunk-size", "0", "--out", emb], "chunk"),
        ("save-every-negative", [*tr, "--save-every", "-1", "--out", new], "save_every"),
        # output paths, found before any work
        ("train-out-file", [*tr, "--out", str(b / "a_file")], "is a file"),
        ("train-out-under-file", [*tr, "--out", str(b / "a_file" / "run")], "not a directory"),
        ("pretrain-out-file", ["pretrain", *small, "--out", str(b / "a_file")], "is a file"),
        ("embed-out-file", ["embed", *small, "--out", str(b / "a_file")], "is a file"),
        ("mine-out-file", ["mine", "--embeddings", emb, "--out", str(b / "a_file")], "is a file"),
        ("mine-csv-dir", ["mine", "--embeddings", emb, "--out", new, "--csv", bad], "is a directory"),
        ("eval-out-dir", [*ev, "--pretrained", ck, "--out", bad], "is a directory"),
        ("report-out-file", ["report", "--results", str(b / "list.json"), "--out", str(b / "a_file")], "is a file"),
        ("demo-out-file", ["demo", "--quick", "--out", str(b / "a_file")], "is a file"),
        ("convert-out-file", ["convert-slip", str(b / "garbage.pt"), str(b / "a_file")], "is a file"),
        # damaged or foreign inputs
        ("mine-truncated-npy", ["mine", "--embeddings", str(b / "emb_trunc"), "--out", new], "image.npy"),
        ("mine-garbage-npy", ["mine", "--embeddings", str(b / "emb_garbage"), "--out", new], "text.npy"),
        ("mine-missing-embeddings", ["mine", "--embeddings", str(b / "nope"), "--out", new], "helip embed"),
        ("train-truncated-hard-pairs", [*tr, "--hard-pairs", str(b / "hp_trunc"), "--out", new], "hard_pairs.npy"),
        ("train-hard-pairs-other-data", ["train", "--n-train", str(N), "--world-seed", "1", "--hard-pairs", hp,
                                         "--steps", "1", "--batch-size", "8", "--out", new], "another dataset"),
        ("train-garbage-pretrained", [*tr, "--pretrained", str(b / "garbage.pt"), "--out", new], "not a readable"),
        ("train-truncated-pretrained", [*tr, "--pretrained", str(b / "truncated.pt"), "--out", new],
         "not a readable"),
        ("train-other-architecture", [*tr, "--model", str(b / "Other.json"), "--pretrained", ck, "--out", new],
         "does not fit"),
        ("embed-garbage-pretrained", ["embed", *small, "--pretrained", str(b / "garbage.pt"), "--out", emb],
         "not a readable"),
        ("embed-other-architecture", ["embed", *small, "--model", str(b / "Other.json"), "--pretrained", ck,
                                      "--out", emb], "does not fit"),
        ("eval-garbage-pretrained", [*ev, "--pretrained", str(b / "garbage.pt"), "--out", new + ".json"],
         "not a readable"),
        ("eval-other-architecture", [*ev, "--model", str(b / "Other.json"), "--pretrained", ck,
                                     "--out", new + ".json"], "does not fit"),
        ("resume-garbage", [*tr, "--resume", str(b / "garbage.pt"), "--out", new], "not a readable"),
        ("resume-model-pt", [*tr, "--resume", ck, "--out", new], "not a resumable"),
        ("resume-other-dataset", ["train", "--n-train", str(N), "--world-seed", "1", "--steps", "2",
                                  "--batch-size", "8", "--save-every", "1", "--log-every", "1",
                                  "--resume", "auto", "--out", run], "another dataset"),
        ("resume-other-options", [*tr, "--save-every", "1", "--log-every", "1", "--lr", "0.5", "--resume", "auto",
                                  "--out", run], "options differ"),
        ("fresh-over-checkpoints", [*tr, "--out", run], "--resume auto"),
        ("csv-huge-field", ["embed", "--data", str(b / "huge.csv"), "--out", new], "huge field"),
        ("tsv-not-utf8", ["embed", "--data", str(b / "latin1.tsv"), "--out", new], "UTF-8"),
        ("jsonl-not-utf8", ["train", "--data", str(b / "latin1.jsonl"), "--out", new], "UTF-8"),
        ("retrieval-not-utf8", [*ev, "--pretrained", ck, "--retrieval", f"r={b / 'latin1_captions.csv'}",
                                "--no-cache", "--out", new + ".json"], "UTF-8"),
        ("zeroshot-missing-split", [*ev, "--pretrained", ck, "--zeroshot", f"z={b / 'wds'}", "--no-cache",
                                    "--out", new + ".json"], "--split train"),
        ("report-list", ["report", "--results", str(b / "list.json"), "--out", new], "not a helip results"),
        ("report-not-json", ["report", "--results", str(b / "not_json.json"), "--out", new], "not valid JSON"),
        # requested weights that would not be the weights used
        ("embed-localdir-pretrained", ["embed", *small, "--model", f"local-dir:{b / 'localdir'}",
                                       "--pretrained", ck, "--out", new], "would be ignored"),
        ("train-localdir-pretrained", [*tr, "--model", f"local-dir:{b / 'localdir'}", "--pretrained", ck,
                                       "--out", new], "would be ignored"),
        ("eval-localdir-pretrained", [*ev, "--model", f"local-dir:{b / 'localdir'}", "--pretrained", ck,
                                      "--out", new + ".json"], "would be ignored"),
        ("embed-localdir-no-weights", ["embed", *small, "--model", f"local-dir:{b / 'localdir_noweights'}",
                                       "--out", new], "no weights file"),
        ("embed-external-towers-pretrained", ["embed", *small, "--text-encoder", "x", "--image-encoder", "y",
                                              "--pretrained", ck, "--out", new], "would not be used"),
        # a rerun into a complete output that aborts late (every image unreadable): the old output stays
        ("embed-rerun-aborts", ["embed", "--data", str(b / "unreadable.tsv"), "--pretrained", ck,
                                "--chunk-size", "16", "--out", emb], "unusable"),
    ]


def test_bad_inputs_one_line_exit_2_outputs_untouched(world, capsys):
    cases = _cases(world)
    assert len(cases) >= 40
    before = _snapshot(world["root"])
    failures = []
    for case_id, argv, expected in cases:
        argv = [*argv, "--no-progress"] if argv[0] in ("embed", "eval") else argv
        try:
            err = _error_line(capsys, argv)
            assert expected in err, f"expected {expected!r} in {err!r}"
        except AssertionError as e:
            failures.append(f"{case_id}: {e}")
            continue
        after = _snapshot(world["root"])
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k)
                         and not k.startswith("new"))
        if changed:
            failures.append(f"{case_id}: earlier outputs changed: {changed[:5]}")
        before = after
    assert not failures, "\n".join(failures)
    # the complete outputs still load after every failed rerun
    from helip.embed import load_embeddings
    from helip.mining import load_hard_pairs

    load_embeddings(world["emb"])
    load_hard_pairs(world["hp"])
    assert not list((world["root"] / "new").glob("*.npy")) if (world["root"] / "new").exists() else True


# ----------------------------------------------------------------------------- small units

def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        save_json(tmp_path / "a.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640


def test_retrieval_ties_count_against_the_model():
    from helip.evaluate.metrics import retrieval_metrics

    # images 0 and 1 have the same caption text (identical text features) and identical image features:
    # the model cannot tell them apart, so neither may score a hit at rank 1
    img = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    txt = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    r = retrieval_metrics(img, txt, np.array([0, 1, 2]), ks=(1, 2))
    assert r["i2t_r1"] == pytest.approx(1 / 3) and r["t2i_r1"] == pytest.approx(1 / 3)
    assert r["i2t_r2"] == 1.0 and r["t2i_r2"] == 1.0


def test_probe_sweep_widens_at_the_edge():
    from helip.evaluate.linear_probe import ProbeConfig, fit_linear_probe

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8))
    y = (x[:, 0] + 0.05 * rng.normal(size=400) > 0).astype(int)   # nearly separable: wants a large C
    cfg = ProbeConfig(c_min=1e-4, c_max=1e-3, refine_steps=2, widen_decades=3)
    r = fit_linear_probe(x[:200], y[:200], x[200:300], y[200:300], x[300:], y[300:], cfg=cfg)
    assert r["C_range"][1] > cfg.c_max            # widened beyond the edge that held the best C
    assert r["C"] <= r["C_range"][1]              # refinement stays inside the decades swept
    assert (r["C_at_edge"] == "max") == (r["C"] == r["C_range"][1])
    cold = fit_linear_probe(x[:200], y[:200], x[200:300], y[200:300], x[300:], y[300:],
                            cfg=ProbeConfig(c_min=1e-4, c_max=1e-3, refine_steps=2, warm_start=False))
    assert cold["C"] == r["C"] and abs(cold["accuracy"] - r["accuracy"]) <= 0.02
    # a class seen only in validation: the refit on train+val cannot start from the train-only solution
    y3 = y.copy()
    y3[[210, 220]] = 2
    r3 = fit_linear_probe(x[:200], y3[:200], x[200:300], y3[200:300], x[300:], y3[300:], cfg=cfg)
    assert 0 <= r3["accuracy"] <= 1


# ----------------------------------------------------------------------------- kill and resume

def _kill_when(argv, ready, timeout=240.0):
    """Run `helip argv` in a subprocess and SIGKILL it once ``ready()`` is true; return True if killed."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}
    p = subprocess.Popen([sys.executable, "-c", "import sys, torch; torch.set_num_threads(2); "
                          "from helip.app.cli import main; sys.exit(main(sys.argv[1:]))", *_full(argv)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    t0 = time.time()
    try:
        while p.poll() is None and time.time() - t0 < timeout:
            if ready():
                p.send_signal(signal.SIGKILL)
                p.wait()
                return True
            time.sleep(0.005)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return False


def _chunks(d: Path) -> int:
    return len(list((d / ".partial").glob("chunk_*.npz"))) if (d / ".partial").is_dir() else 0


def test_embed_killed_then_resumed_equals_uninterrupted(world, tmp_path):
    rng = random.Random(1)
    args = ["embed", "--n-train", str(N), "--pretrained", str(world["ck"]), "--chunk-size", "4",
            "--batch-size", "4", "--no-progress"]
    out = tmp_path / "e"
    at = rng.randint(1, 9)   # kill once this many of the 12 chunks are done
    assert _kill_when([*args, "--out", str(out)], lambda: _chunks(out) >= at)
    assert not (out / "meta.json").exists() and _chunks(out) >= at
    _ok([*args, "--out", str(out)])
    _ok([*args, "--out", str(tmp_path / "ref")])
    for name in ("image.npy", "text.npy", "skipped.json"):
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    assert not (out / ".partial").exists()


def _mine_killed(emb: Path, out: Path, at: int) -> None:
    args = ["mine", "--embeddings", str(emb), "--out", str(out), "--k", "5", "--chunk-size", "50"]
    assert _kill_when(args, lambda: _chunks(out) >= at), "mining finished before the kill"
    assert not (out / "meta.json").exists()


def test_mine_killed_then_resumed_equals_uninterrupted(tmp_path):
    rng = random.Random(2)
    emb = _write_embeddings(tmp_path / "emb", 1500, 16, seed=0)
    out = tmp_path / "hp"
    _mine_killed(emb, out, rng.randint(1, 15))
    _ok(["mine", "--embeddings", str(emb), "--out", str(out), "--k", "5", "--chunk-size", "50"])
    _ok(["mine", "--embeddings", str(emb), "--out", str(tmp_path / "ref"), "--k", "5", "--chunk-size", "50"])
    for name in ("hard_pairs.npy", "hard_scores.npy"):
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name


def test_mine_resume_after_the_embeddings_changed_discards_the_stale_work(tmp_path, caplog):
    rng = random.Random(3)
    emb = _write_embeddings(tmp_path / "emb", 1500, 16, seed=0)
    out = tmp_path / "hp"
    _mine_killed(emb, out, rng.randint(1, 15))
    _write_embeddings(emb, 1500, 16, seed=1)   # re-embedded: same N, other content
    with caplog.at_level(logging.WARNING):
        _ok(["mine", "--embeddings", str(emb), "--out", str(out), "--k", "5", "--chunk-size", "50"])
    assert any("discarding partial results" in r.getMessage() for r in caplog.records)
    _ok(["mine", "--embeddings", str(emb), "--out", str(tmp_path / "ref"), "--k", "5", "--chunk-size", "50"])
    for name in ("hard_pairs.npy", "hard_scores.npy"):
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name


def test_train_killed_then_resumed_equals_uninterrupted(world, tmp_path, caplog):
    """Killed after a random checkpoint; the latest checkpoint then damaged and a killed save's temporary
    file planted: ``--resume auto`` falls back to the one before (saying so), removes the leftover and
    ends bit-identical to an uninterrupted run."""
    rng = random.Random(4)
    steps = 4
    args = ["train", "--n-train", str(N), "--hard-pairs", str(world["hp"]), "--pretrained", str(world["ck"]),
            "--steps", str(steps), "--batch-size", "8", "--save-every", "1", "--log-every", "1"]
    out = tmp_path / "run"
    at = rng.randint(2, steps - 1)
    ckdir = out / "checkpoints"
    assert _kill_when([*args, "--out", str(out)], lambda: (ckdir / f"step_{at:08d}.pt").is_file())
    assert not (out / "model.pt").exists()
    latest = sorted(ckdir.glob("step_*.pt"))[-1]
    data = latest.read_bytes()
    latest.write_bytes(data[:len(data) // 3])                       # damaged
    leftover = ckdir / f".{latest.name}.abcd1234.tmp"
    leftover.write_bytes(data[:100])                                 # what a save killed midway leaves
    with caplog.at_level(logging.WARNING):
        _ok([*args, "--out", str(out), "--resume", "auto"])
    assert any("newest readable checkpoint" in r.getMessage() for r in caplog.records)
    assert not leftover.exists()
    _ok([*args, "--out", str(tmp_path / "ref")])
    assert _same_state(_state_dict(out / "model.pt"), _state_dict(tmp_path / "ref" / "model.pt"))
    a = _state_dict(ckdir / f"step_{steps:08d}.pt")
    b = _state_dict(tmp_path / "ref" / "checkpoints" / f"step_{steps:08d}.pt")
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for k in a["optimizer"]["state"]:
        for name, v in a["optimizer"]["state"][k].items():
            assert torch.equal(v, b["optimizer"]["state"][k][name])
    log = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log == list(range(1, steps + 1))
