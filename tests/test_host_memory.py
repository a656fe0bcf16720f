"""zoo keeps freed host memory mapped (zoo/host_memory.py): a block freed and allocated again
costs no page faults, unlike glibc's defaults, and ZOO_HOST_MALLOC is validated."""
import os
import subprocess
import sys
import textwrap

import pytest

from zoo.host_memory import glibc_library

# Allocates 64 MiB through the C heap twice (writing every byte) and prints how many page faults
# the second round cost.
PROBE = textwrap.dedent("""
    import ctypes, resource
    import zoo
    from zoo import host_memory
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 << 20
    def round_trip():
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
    round_trip()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    round_trip()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(host_memory.keep_freed_memory(), faults)
""")
GLIBC = glibc_library() is not None


def run_probe(mode: str | None):
    env = {k: v for k, v in os.environ.items() if k != "ZOO_HOST_MALLOC"}
    if mode is not None:
        env["ZOO_HOST_MALLOC"] = mode
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    applied, faults = done.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's (a no-op elsewhere)")
def test_freed_memory_is_reused_without_page_faults():
    applied, faults = run_probe(None)
    assert applied
    assert faults < 200  # 64 MiB is 16,384 pages: a few stray faults at most


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's (a no-op elsewhere)")
def test_system_mode_keeps_glibc_defaults():
    applied, faults = run_probe("system")
    assert not applied
    assert faults > 8000  # glibc maps 64 MiB afresh (4 KiB pages) and faults through it again


def test_unknown_mode_is_a_one_line_error():
    env = dict(os.environ, ZOO_HOST_MALLOC="fast")
    done = subprocess.run([sys.executable, "-c", "import zoo"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0
    assert "ZOO_HOST_MALLOC='fast': allowed values are ('keep', 'system')" in done.stderr
