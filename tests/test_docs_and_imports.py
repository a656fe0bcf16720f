"""The README's objective example runs, and importing the packages pulls in no TF or torch."""
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import zoo.models
from zoo.models import PretrainModel

README = Path(__file__).resolve().parents[1] / "README.md"


def test_importing_the_packages_loads_no_tensorflow_or_torch():
    code = ("import sys, zoo, objectives, zoo.train, zoo.data, zoo.probe, zoo.compare, zoo.cli\n"
            "bad = [m for m in ('tensorflow', 'torch') if m in sys.modules]\n"
            "assert not bad, bad\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_readme_objective_example_runs():
    text = README.read_text()
    block = re.search(r"```python\n(# objectives/rotation.py\n.*?)```", text, re.S)
    assert block, "README lost its 'Adding an objective' example"
    namespace: dict = {}
    exec(compile(block.group(1), "README-example", "exec"), namespace)  # noqa: S102
    objective = namespace["Rotation"](patch_size=4)
    encoder = zoo.models.get("vit", size="test", grid=(4, 4), patch_dim=4 * 4 * 1,
                             rngs=nnx.Rngs(0))
    model = PretrainModel(encoder, objective.make_heads(encoder, rngs=nnx.Rngs(1)))
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 16, 16, 1)), jnp.uint8)
    graphdef, params = nnx.split(model)

    @jax.jit
    def loss_fn(params, images, rng):
        inputs, targets = objective.prepare({"image": images}, rng)
        return objective.loss(objective.apply(nnx.merge(graphdef, params), inputs), targets)

    loss, metrics = loss_fn(params, images, jax.random.key(0))
    # Four balanced classes at init: cross-entropy near log(4), accuracy a fraction.
    assert np.isfinite(float(loss)) and 0.5 < float(loss) < 3.0
    assert 0.0 <= float(metrics["accuracy"]) <= 1.0


def test_notebook_functions_stay_callable_after_their_modules_are_imported():
    """`import zoo.train` binds the submodule to `zoo.train`; the README's `zoo.train(cfg, dir)`
    must still call the function (fresh interpreter: nothing imported before)."""
    import subprocess
    import sys
    code = ("import zoo.train, zoo.probe, zoo.compare, zoo.bench, zoo\n"
            "for name in ('train', 'probe', 'compare', 'bench'):\n"
            "    assert callable(getattr(zoo, name)), name\n"
            "try:\n"
            "    zoo.train()\n"
            "except TypeError as error:\n"
            "    print(error)\n"
            "print(zoo.train.build.__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert "train() missing 2 required positional arguments" in out
    assert out.strip().endswith("build")
