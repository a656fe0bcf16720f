"""``zoo.train(cfg, workdir)`` and ``zoo.train.build(...)`` both work.

``zoo.train`` is a module AND the function a notebook calls. Python binds the submodule to the
package attribute as soon as ``zoo.train`` is imported (by anyone), which would shadow the lazy
function export; so the module itself is made callable and forwards to its function.
"""
from __future__ import annotations

import sys
import types


def make_module_callable(module_name: str, function_name: str) -> None:
    module = sys.modules[module_name]

    class CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return getattr(self, function_name)(*args, **kwargs)

    CallableModule.__doc__ = f"Module {module_name}; calling it calls {function_name}()."
    module.__class__ = CallableModule
