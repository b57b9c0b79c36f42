"""Imported by the modelfs-share.pth line when MODELFS_SHARE=1: installs the
loader hook. Never raises (a failing hook must not stop Python starting)."""

try:
    from .hook import install as _install

    _install()
except Exception as _e:  # noqa: BLE001
    import os as _os
    import sys as _sys

    if _os.environ.get("MODELFS_SHARE_DEBUG") == "1":
        print(f"modelfs.share: hook not installed: {_e!r}", file=_sys.stderr)
