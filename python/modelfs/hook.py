"""Installing the loader hook: patch safetensors when it is imported.

``install()`` patches the modules already imported and puts a finder at the
front of ``sys.meta_path`` that wraps the loader of ``safetensors``,
``safetensors.torch``, ``safetensors.numpy`` (``safe_open``) and ``torch``
(``torch.load(mmap=True)``) so that each is patched right after it has
executed, before any importer can bind ``safe_open``
(transformers does ``from safetensors import safe_open``). Modules that bound
the original before install() ran are patched by name too.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading

TARGETS = ("safetensors", "safetensors.torch", "safetensors.numpy", "torch")

_installed = False
_guard = threading.local()


def _patch(mod) -> None:
    from . import share

    try:
        if mod.__name__ == "torch":
            from . import _torchload

            _torchload.patch_torch(mod)
        else:
            from . import _safetensors

            _safetensors.patch_module(mod)
    except Exception as e:  # noqa: BLE001 - the hook must never break an import
        share.debug(f"patch:{mod.__name__}", f"cannot patch {mod.__name__}: {e}")


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _patch(module)

    def __getattr__(self, attr):  # get_resource_reader, is_package, get_source, ...
        return getattr(self._inner, attr)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name not in TARGETS or getattr(_guard, "busy", False):
            return None
        _guard.busy = True
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
        finally:
            _guard.busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _PatchingLoader(spec.loader)
        return spec


def install() -> None:
    """Switch the hook on in this process (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    sys.meta_path.insert(0, _Finder())
    for name in TARGETS:
        mod = sys.modules.get(name)
        if mod is not None:
            _patch(mod)
    # modules that did `from safetensors import safe_open` before we ran
    from . import _safetensors

    orig = _safetensors._orig_safe_open
    if orig is not None:
        for mod in list(sys.modules.values()):
            try:
                if getattr(mod, "safe_open", None) is orig:
                    mod.safe_open = _safetensors.safe_open
            except Exception:  # noqa: BLE001 - odd modules with lazy attributes
                pass


def installed() -> bool:
    return _installed
