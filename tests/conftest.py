import os

import pytest
import torch

# Two cores on CI: keep torch from oversubscribing them, and keep runs deterministic.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """One quick demo run shared by the end-to-end tests (it is the slowest fixture)."""
    from helip.app.cli import main

    out = tmp_path_factory.mktemp("demo")
    cache = tmp_path_factory.mktemp("cache")
    rc = main(["demo", "--quick", "--out", str(out), "--seed", "0", "--cache-dir", str(cache)])
    assert rc == 0
    return out, cache
