"""python -m modelfs install-pth [--dir DIR] | uninstall-pth | layout FILE... | pth-line

install-pth writes modelfs-share.pth into site-packages (or DIR): with it,
MODELFS_SHARE=1 in the environment switches the loader hook on in every
Python process of this environment, with no change to user code.
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig

PTH_NAME = "modelfs-share.pth"
PTH_LINE = ('import os; os.environ.get("MODELFS_SHARE") == "1" '
            'and __import__("modelfs._autohook")\n')


def site_dir() -> str:
    return sysconfig.get_paths()["purelib"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m modelfs")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("install-pth", help=f"write {PTH_NAME} into site-packages")
    p.add_argument("--dir", default=None)
    p = sub.add_parser("uninstall-pth", help=f"remove {PTH_NAME}")
    p.add_argument("--dir", default=None)
    sub.add_parser("pth-line", help="print the .pth line")
    p = sub.add_parser("layout", help="print the layout of files on a mount")
    p.add_argument("files", nargs="+")
    a = ap.parse_args(argv)
    if a.cmd == "install-pth":
        path = os.path.join(a.dir or site_dir(), PTH_NAME)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(PTH_LINE)
        os.replace(tmp, path)
        print(path)
    elif a.cmd == "uninstall-pth":
        try:
            os.unlink(os.path.join(a.dir or site_dir(), PTH_NAME))
        except FileNotFoundError:
            pass
    elif a.cmd == "pth-line":
        sys.stdout.write(PTH_LINE)
    elif a.cmd == "layout":
        from . import share

        rc = 0
        for fn in a.files:
            try:
                lay = share.layout(fn)
            except share.LayoutError as e:
                print(f"{fn}: {e}", file=sys.stderr)
                rc = 1
                continue
            print(f"{fn}: {lay.file_size} bytes, {len(lay.runs)} runs covering "
                  f"{lay.covered_bytes()} bytes, {len(lay.objects)} objects"
                  f"{', passthrough' if lay.passthrough else ''}")
            for r in lay.runs:
                print(f"  [{r.file_offset}, +{r.len}) -> object {r.object} "
                      f"({lay.objects[r.object].path}) @ {r.object_offset}")
    return 0 if a.cmd != "layout" else rc


if __name__ == "__main__":
    sys.exit(main())
