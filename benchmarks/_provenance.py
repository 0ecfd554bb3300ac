"""Where a benchmark number came from: the commit, the machine and the options, for every results JSON.

Every script in benchmarks/ puts ``provenance(args)`` into the JSON it writes, under the key
``"provenance"``::

    from _provenance import provenance
    report["provenance"] = provenance(args)

It records

- ``commit``: ``git rev-parse HEAD`` of the checkout the script ran from, and ``dirty``: whether
  tracked files differed from that commit (``git status --porcelain --untracked-files=no``), so a
  number measured on uncommitted code says so; both ``None`` outside a git checkout;
- ``machine``: CPU model (from /proc/cpuinfo, else ``platform.processor()``), logical cores, cores
  this process may use, memory, GPU names (when torch sees CUDA), OS, Python and library versions,
  torch's thread count;
- ``options``: the parsed command-line options (an ``argparse.Namespace`` or a dict), plus the
  command line itself and the UTC time.

Nothing here is timed, and it never raises: a field it cannot read is ``None``.
"""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Optional

ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_model() -> Optional[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or None


def _memory_gb() -> Optional[float]:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024 ** 3, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _versions() -> Dict[str, Optional[str]]:
    versions: Dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in ("numpy", "torch", "open_clip", "faiss", "sklearn", "helip"):
        mod = sys.modules.get(name)          # only what the script imported: recording must not import
        versions[name] = getattr(mod, "__version__", None) if mod is not None else None
    return versions


def machine() -> Dict[str, Any]:
    info: Dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gb": _memory_gb(),
        "platform": platform.platform(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "gpus": None,
        "torch_threads": None,
        "versions": _versions(),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            info["torch_threads"] = torch.get_num_threads()
            if torch.cuda.is_available():
                info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            else:
                info["gpus"] = []
        except Exception:                    # a broken CUDA setup must not lose the benchmark's numbers
            pass
    return info


def _plain(x: Any) -> Any:
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [_plain(v) for v in x]
    return str(x)


def provenance(options: Any = None) -> Dict[str, Any]:
    """Commit, machine and options of this run, as plain JSON values."""
    if options is not None and not isinstance(options, dict):
        options = vars(options)
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": _git("rev-parse", "HEAD"),
        "dirty": None if status is None else bool(status),
        "machine": machine(),
        "options": _plain(options or {}),
        "argv": [Path(sys.executable).name, *sys.argv],
        "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


if __name__ == "__main__":
    import json

    print(json.dumps(provenance(), indent=2))
