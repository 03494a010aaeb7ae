"""Adapters to outside APIs, one file each. Only rocketkit/__init__ attaches them, through
:func:`call_after_import`, so that ``import rocketkit`` does not import the outside package."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the normal loader of one module to run a callback once it has executed."""

    def __init__(self, name: str, callback):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        real_exec = spec.loader.exec_module
        finder = self

        def exec_module(module):
            real_exec(module)
            if finder in sys.meta_path:
                sys.meta_path.remove(finder)
            finder.callback()

        spec.loader.exec_module = exec_module
        return spec


def call_after_import(name: str, callback) -> None:
    """``callback()`` now if module ``name`` is already imported, else right after it first is."""
    if name in sys.modules:
        callback()
    elif not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, callback))
