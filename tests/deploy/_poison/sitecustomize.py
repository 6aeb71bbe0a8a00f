"""Test-only: makes every ClientApp of this Python's processes reply NaN weights.

The end-to-end test puts this folder first on the PYTHONPATH of one site's
``medfed client``; Python imports ``sitecustomize`` at start-up in that process and in
every Flower process it starts (they inherit the environment). It wraps Flower's
``ClientApp.__call__`` so that the float arrays of each training reply are NaN: a
hostile or diverged site, as the server sees it.
"""

import importlib.abc
import importlib.machinery
import sys

_TARGET = "flwr.clientapp.client_app"


def _poison(module) -> None:
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from medfed.transfer import pack_arrays, unpack_arrays

    original = module.ClientApp.__call__

    def call(self, message, context):
        reply = original(self, message, context)
        if not reply.has_error() and "arrays" in reply.content.array_records:
            record = unpack_arrays(reply.content.array_records["arrays"])
            poisoned = {}
            for key, array in record.items():
                values = array.numpy()
                if np.issubdtype(values.dtype, np.floating):
                    values = np.full_like(values, np.nan)
                poisoned[key] = Array(values)
            reply.content["arrays"] = pack_arrays(ArrayRecord(poisoned))
        return reply

    module.ClientApp.__call__ = call


class _AfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        exec_module = spec.loader.exec_module

        def exec_then_poison(module):
            exec_module(module)
            _poison(module)

        spec.loader.exec_module = exec_then_poison
        return spec


sys.meta_path.insert(0, _AfterImport())
