"""`zoo bench mae` runs end to end on a tiny configuration and reports consistent figures."""
import jax
import pytest

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
    assert abs(result["mfu"] - achieved / result["matmul_peak_gflops_per_second"]) < 1e-9
    assert 0.5 < result["xla_gflops_per_step"] / result["model_gflops_per_step"] < 2.0
    assert "MFU" in printed[0] and "ViT-test/4" in printed[0]
