"""modelfs: Python side of the modelfs model store.

``modelfs.share`` speaks the mount's layout protocol; ``modelfs.hook.install()``
(or MODELFS_SHARE=1 with the .pth installed by ``python -m modelfs install-pth``)
makes safetensors loads of files on a modelfs mount map the store's objects,
so processes loading models that share tensors share their pages.
"""

__version__ = "0.1.0"

from . import share  # noqa: E402,F401

__all__ = ["share", "__version__"]
