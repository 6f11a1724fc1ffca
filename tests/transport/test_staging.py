"""nixl's staging buffers (transport/_staging.py) on a GPU: a gather never writes into memory
that work queued on the caller's stream still reads."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: staging is GPU-only")

# In a fresh process: the caching allocator must hold exactly one free 64 MiB block (the one the
# "forward" just freed), as a running vLLM's does, so that a staging buffer allocated on the
# caller's stream is handed that very block.
_SCRIPT = textwrap.dedent("""
    import numpy as np, torch
    from lmcache_pd.layout import RangePlan
    from lmcache_pd.ops import launch_copy
    from lmcache_pd.transport._staging import Region, Stager

    dev = torch.device("cuda", 0)
    size = 1 << 26  # the smallest staging buffer
    src = torch.full((1 << 20,), 0x5A, dtype=torch.uint8, device=dev)
    region = Region(src, src.data_ptr(), src.numel(), 0, "VRAM", None)
    plan = RangePlan(np.arange(0, 1 << 20, 1 << 16, dtype=np.int64), np.arange(0, 1 << 20, 1 << 16, dtype=np.int64),
                     np.full(16, 1 << 16, dtype=np.int64))
    stager = Stager(lambda buf: None)
    scratch = torch.empty_like(src)
    launch_copy(src.data_ptr(), scratch.data_ptr(), plan, device=dev, stream=torch.cuda.current_stream())  # built, loaded
    activation = torch.full((size,), 0x11, dtype=torch.uint8, device=dev)  # a forward's tensor
    torch.cuda.synchronize()
    layer_done = torch.cuda.Event()
    layer_done.record()  # the layer's event: before the rest of the forward
    torch.cuda._sleep(2_000_000_000)  # the rest of the forward, still running ...
    seen = activation.clone()  # ... then a kernel that reads the tensor
    del activation  # freed by vLLM's thread while that read is queued: reusable on this stream
    layer_done.synchronize()
    stage, _ = stager.gather(region, plan, after=layer_done)
    torch.cuda.synchronize()
    bad = int((seen != 0x11).sum())
    print(f"bytes the queued read saw changed: {bad}")
    raise SystemExit(1 if bad else 0)
""")


def test_a_staging_buffer_is_not_memory_that_queued_work_on_the_callers_stream_still_reads():
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "changed: 0" in r.stdout
