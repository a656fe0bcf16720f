"""`zoo bench mae` runs end to end on a tiny configuration and reports consistent figures."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo import config as config_lib
from zoo.bench import bench_mae


# A compile of the benchmark's step on 8 simulated devices: in CI's slow step.
@pytest.mark.slow
def test_bench_mae_tiny_reports_consistent_figures():
    printed = []
    result = bench_mae(size="test", patch_size=4, image_size=32, batch_size=8,
                       decoder_width=32, decoder_depth=1, decoder_heads=2, steps=2, warmup=1,
                       devices=jax.devices()[:1], mesh=(("data", 1), ("fsdp", 1), ("tensor", 1)),
                       print_fn=printed.append)
    assert result["step_seconds"] > 0
    assert abs(result["images_per_second"] * result["step_seconds"] - 8) < 1e-6
    achieved = result["model_gflops_per_step"] / result["step_seconds"]
    assert abs(achieved - result["achieved_gflops_per_second"]) < 1e-6 * achieved
    # MFU is the median over steps of (model FLOP/s of the step / the peak measured next to it).
    assert len(result["mfu_per_step"]) == 2
    assert abs(result["mfu"] - np.median(result["mfu_per_step"])) < 1e-12
    assert min(result["mfu_per_step"]) > 0
    assert 0.5 < result["xla_gflops_per_step"] / result["model_gflops_per_step"] < 2.0
    assert "MFU" in printed[0] and "ViT-test/4" in printed[0]
    assert result["page_faults_per_step"] >= 0 and "page faults / step" in printed[0]


def test_the_mfu_peak_is_measured_in_the_compute_dtype(monkeypatch):
    """A bf16 run's MFU denominator is the bf16 matmul peak (on a GPU it is ~2x float32's)."""
    import zoo.train
    asked = []
    monkeypatch.setattr(zoo.train, "measure_matmul_peak",
                        lambda dtype, device: asked.append(jnp.dtype(dtype)) or 1e12)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    for dtype in ("bfloat16", "float32"):
        config = config_lib.Config(model=config_lib.ModelConfig(dtype=dtype))
        assert zoo.train.peak_flops(config, mesh) == 1e12
    assert asked == [jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)]
    assert zoo.train.peak_flops(config_lib.Config(peak_flops=5.0), mesh) == 5.0
