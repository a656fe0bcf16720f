"""Test setup: 8 simulated CPU devices, configured before JAX initialises its backend."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_debug_key_reuse", True)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A session-wide dataset cache so bundled datasets are prepared once per test run."""
    path = os.environ.get("ZOO_TEST_DATA_DIR")
    if not path:
        # Under pytest-xdist every worker has its own basetemp; their parent is shared, so the
        # workers share one cache (zoo.data prepares atomically; concurrent preparers are fine).
        base = tmp_path_factory.getbasetemp()
        root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
        path = str(root / "zoo_data")
        os.makedirs(path, exist_ok=True)
    os.environ["ZOO_DATA_DIR"] = path
    return path


@pytest.fixture(scope="session", autouse=True)
def compilation_cache_dir(tmp_path_factory):
    """A persistent compilation cache for this session: identical train steps compiled by
    several tests (same config, same mesh) are compiled once. Restored afterwards."""
    from jax.experimental.compilation_cache import compilation_cache
    options = {"jax_compilation_cache_dir":
                   str(tmp_path_factory.getbasetemp() / "jax_compilation_cache"),
               "jax_persistent_cache_min_compile_time_secs": 0.0,
               "jax_persistent_cache_min_entry_size_bytes": -1}
    old = {name: getattr(jax.config, name) for name in options}
    for name, value in options.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    yield options["jax_compilation_cache_dir"]
    for name, value in old.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()
