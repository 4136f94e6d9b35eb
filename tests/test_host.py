"""scripts/host.py: the process settings every `bert-jax` command makes, checked against glibc itself."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# A child process: allocate and free a 64 MiB block (the size class of XLA's per-step temporary buffer), then
# report glibc's own accounting (mallinfo2): bytes newly in mmapped chunks while the block is live, and whether the
# freed block stayed in the heap for reuse.
_CHILD = r"""
import ctypes, ctypes.util, json, sys
sys.path.insert(0, {root!r})
tune = sys.argv[1] == "1"
if tune:
    from scripts.host import prepare_process
    applied = prepare_process(True)["malloc_tuned"]
else:
    applied = False
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
n = 64 << 20
before = libc.mallinfo2()
p = libc.malloc(n)
live = libc.mallinfo2()
libc.free(p)
after = libc.mallinfo2()
print(json.dumps({{"applied": applied, "mmapped_live": live.hblkhd - before.hblkhd, "heap_free_after": after.fordblks}}))
"""


@pytest.mark.skipif(platform.system() != "Linux" or "glibc" not in platform.libc_ver()[0], reason="glibc only")
@pytest.mark.parametrize("tune", [False, True])
def test_malloc_tuning_keeps_large_blocks_in_the_heap(tune):
    import json
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", _CHILD.format(root=root), "1" if tune else "0"],
                         capture_output=True, text=True, check=True, timeout=120)
    r = json.loads(out.stdout)
    if tune:
        assert r["applied"] is True
        assert r["mmapped_live"] == 0  # served from the heap, not a fresh mmap
        assert r["heap_free_after"] >= 64 << 20  # and kept there for the next step
    else:  # glibc's default: a 64 MiB request is its own mmap, returned to the OS on free
        assert r["mmapped_live"] >= 64 << 20
        assert r["heap_free_after"] < 64 << 20


def test_every_command_prepares_the_process(monkeypatch, tmp_path):
    """`bert-jax` itself (not only `bench`) applies the host settings, and `--no-malloc-tuning` turns malloc off."""
    import scripts.host
    from scripts import cli

    calls: list[bool] = []
    monkeypatch.setattr(scripts.host, "prepare_process", lambda malloc=True: calls.append(malloc) or {})
    for argv in (["evaluate", str(tmp_path / "missing")], ["--no-malloc-tuning", "evaluate", str(tmp_path / "missing")]):
        assert cli.main(argv) == 2  # the missing run fails after the process was prepared
    assert calls == [True, False]
