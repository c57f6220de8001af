"""Autotuned kernel configs kept on disk, so each machine pays the first-call autotune once.

Triton's ``@triton.autotune`` benchmarks every candidate config on the first call for a new tuning
key (15-30 s per new shape class for the attention kernels on an H200) and keeps the winner in
memory only. Here the winners are written to one JSON file per (kernel, GPU, triton version,
kernel source) in the user's cache directory, and read back into the autotuner before its first
launch in a new process. The tuning key is the kernel's own (a log2 class of the problem size,
head dim, padding, block sizes, the element rule, the 8-bit mode, ...; triton appends the tensors'
dtypes), so a file entry applies exactly where triton would reuse the config in-process.

Why not ``triton.autotune(cache_results=True)``: its file is keyed by GPU architecture, not by
GPU (an H100 and an H200 share sm_90 but not their best tiles), and it lives in triton's kernel
cache, which users clear to force recompiles.

One limit comes from triton: an autotuner keeps one in-memory cache per process, shared by all
its GPUs, so a process driving two different GPU models tunes on the first and reuses that on the
second (as triton alone would); each file still records only the GPU it was written for.

Location: ``$DIFFATTN_CACHE_DIR`` or ``$XDG_CACHE_HOME/diffattn`` or ``~/.cache/diffattn``, under
``autotune/``. ``DIFFATTN_AUTOTUNE_CACHE=0`` turns it off. Both are read at a kernel's first
launch in a process. Files are rewritten atomically.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch
import triton

# Process-wide, like the autotuners' own in-memory caches they mirror (not per-generation state):
# kernel files read in this process, and the number of entries each file holds.
_SEEN: dict[str, int] = {}
_PATHS: dict[tuple[str, int | None], Path | None] = {}  # (kernel, GPU index) -> its file (None: off)


def cache_dir() -> Path | None:
    """Where tuned configs live, or None when turned off (``DIFFATTN_AUTOTUNE_CACHE=0``)."""
    if os.environ.get("DIFFATTN_AUTOTUNE_CACHE", "1") == "0":
        return None
    root = os.environ.get("DIFFATTN_CACHE_DIR")
    if root is None:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "diffattn")
    return Path(root) / "autotune"


def _device_tag(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def cache_file(kernel, device: torch.device) -> Path | None:
    """The file of ``kernel`` (a ``triton.autotune`` object) on ``device``'s GPU, or None."""
    root = cache_dir()
    if root is None:
        return None
    source = str(getattr(kernel.fn, "cache_key", ""))[:16]  # the kernel's source (and its callees')
    return root / f"{kernel.fn.__name__}-{_device_tag(device)}-triton{triton.__version__}-{source}.json"


def _config_id(config) -> tuple:
    return tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages, getattr(config, "maxnreg", None)


def load(kernel, device: torch.device, path: Path | None = None) -> None:
    """Fill ``kernel``'s in-memory autotune cache from its file (once per process and file)."""
    path = cache_file(kernel, device) if path is None else path
    if path is None or str(path) in _SEEN:
        return
    _SEEN[str(path)] = 0
    try:
        entries = json.loads(path.read_text())["entries"]
    except (OSError, ValueError, KeyError):
        return  # no file yet, or a damaged one: tune again and rewrite it
    by_id = {_config_id(c): c for c in kernel.configs}  # the live configs carry the pre-hooks
    try:
        for key, saved in entries:
            ident = (tuple(sorted((k, v) for k, v in saved["kwargs"].items())), saved["num_warps"], saved["num_stages"],
                     saved.get("maxnreg"))  # files written before register caps were tuned: None
            if ident in by_id:
                kernel.cache.setdefault(_tuple(key), by_id[ident])
    except (TypeError, KeyError, ValueError, AttributeError):
        pass  # a file of another shape: what was read stays, the rest is tuned again and rewritten
    _SEEN[str(path)] = len(kernel.cache)


def _tuple(key):
    return tuple(_tuple(k) if isinstance(k, list) else k for k in key)


def save(kernel, device: torch.device, path: Path | None = None) -> None:
    """Write ``kernel``'s tuned configs to its file when it tuned something new in this process."""
    path = cache_file(kernel, device) if path is None else path
    if path is None or _SEEN.get(str(path)) == len(kernel.cache):
        return
    entries, keys = [], set()
    for key, config in kernel.cache.items():
        entry = [list(key), {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages,
                             "maxnreg": getattr(config, "maxnreg", None)}]
        try:
            json.dumps(entry)
        except TypeError:
            continue  # a key part that is not plain data: keep it in memory only
        entries.append(entry)
        keys.add(json.dumps(entry[0]))
    try:  # keep what another process wrote meanwhile (its keys, where this one has none)
        entries += [e for e in json.loads(path.read_text())["entries"] if json.dumps(e[0]) not in keys]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        pass
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump({"kernel": kernel.fn.__name__, "entries": entries}, fh, indent=1)
        os.replace(tmp, path)
    except OSError:
        return  # a read-only home: tuning still works, it is just not kept
    _SEEN[str(path)] = len(kernel.cache)


def launch(kernel, grid, device: torch.device, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)`` with its tuned configs read from and written to disk."""
    if device.type != "cuda":  # the interpreter tunes nothing worth keeping
        return kernel[grid](*args, **kwargs)
    slot = (kernel.fn.__name__, device.index)
    if slot not in _PATHS:  # the file's name, worked out once per process (launches are a hot path)
        _PATHS[slot] = cache_file(kernel, device)
    path = _PATHS[slot]
    if path is None:  # the cache is off
        return kernel[grid](*args, **kwargs)
    load(kernel, device, path)
    result = kernel[grid](*args, **kwargs)
    save(kernel, device, path)
    return result
