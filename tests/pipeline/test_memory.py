"""The workers' heap: freed image-sized blocks go back to the system, even with small objects allocated between
them (what made a stage-1 actor grow with the size of the group it read in passes)."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    import numpy as np
    from pipeline.memory import keep_large_blocks_out_of_the_heap

    def rss_mib():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    big = np.ones(8 << 20, np.uint8)
    del big  # glibc's default: freeing a mapped 8 MiB block raises the mmap threshold to 8 MiB
    fixed = keep_large_blocks_out_of_the_heap() if {fix} else None
    views, pins = [], []
    for _ in range(200):  # 200 image-sized blocks (1 MiB), a small object that outlives each
        views.append(np.ones(1 << 20, np.uint8))
        pins.append(bytearray(1024))  # past pymalloc's 512-byte limit: from the same heap as the blocks
    before = rss_mib()
    del views
    print(fixed, round(before - rss_mib()))
""")


def released_mib(fix: bool) -> tuple:
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(root=str(ROOT), fix=fix)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    fixed, mib = done.stdout.split()
    return fixed, int(mib)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_go_back_to_the_system_only_with_the_fixed_threshold():
    fixed, released = released_mib(True)
    assert fixed == "True" and released >= 150, released
    default, kept = released_mib(False)
    assert default == "None" and kept < 50, kept  # the default heap keeps them: what the fix is for
