"""Shared fixtures for the modelfs Python test-suite.

Environment:
  MODELFS_BIN              path of the modelfs binary (default: <repo>/target/debug/modelfs)
  MODELFS_TEST_BASE_MIB    size of the session model family's base model (default 8)
  MODELFS_TEST_DEDUP_MIB   size of the base model of the dedup-ratio family (default 32)
  MODELFS_TEST_CRASH_MIB   size of the model imported (and killed) in the crash test (default 32)
  MODELFS_TEST_KILLS       number of SIGKILLs in the crash test (default 24)
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
DEFAULT_BIN = REPO / "target" / "debug" / "modelfs"

if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

REQUIRED_LIBS = ["numpy", "safetensors", "torch", "gguf", "onnx", "ml_dtypes"]

# Filesystem block rounding allowance when comparing the store's stored_bytes with the
# ideal size: 64 KiB per distinct file imported (see test_dedup_*).
SLACK_PER_FILE = 64 * 1024

CMD_TIMEOUT = 300  # seconds; a command taking longer is treated as hung


def pytest_configure(config):
    config.addinivalue_line("markers", "crash: SIGKILL-during-import crash-consistency test")


@pytest.fixture(scope="session", autouse=True)
def required_libs():
    missing = []
    for lib in REQUIRED_LIBS:
        try:
            importlib.import_module(lib)
        except Exception as e:  # noqa: BLE001 - report any import failure
            missing.append(f"{lib} ({type(e).__name__}: {e})")
    if missing:
        pytest.fail(
            "required Python libraries missing: " + ", ".join(missing)
            + f"\ninstall them with: {sys.executable} -m pip install -r {TESTS_DIR / 'requirements.txt'}",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def modelfs_bin() -> Path:
    p = Path(os.environ.get("MODELFS_BIN", DEFAULT_BIN))
    if not p.is_file() or not os.access(p, os.X_OK):
        pytest.fail(
            f"modelfs binary not found or not executable at {p}. Build it with "
            f"`cd {REPO} && cargo build -p modelfs-cli` or point MODELFS_BIN at it.",
            pytrace=False,
        )
    return p


class Result:
    def __init__(self, cp: subprocess.CompletedProcess, argv):
        self.argv = argv
        self.returncode = cp.returncode
        self.stdout_bytes = cp.stdout
        self.stdout = cp.stdout.decode("utf-8", "replace")
        self.stderr = cp.stderr.decode("utf-8", "replace")

    @property
    def output(self) -> str:
        return self.stdout + "\n" + self.stderr

    def json(self):
        try:
            return json.loads(self.stdout)
        except json.JSONDecodeError as e:
            raise AssertionError(
                f"`{self.cmdline()}` did not print valid JSON on stdout ({e}):\n"
                f"stdout: {self.stdout[:2000]!r}\nstderr: {self.stderr[:2000]!r}") from None

    def cmdline(self) -> str:
        return " ".join(repr(a) if (not a or any(c.isspace() or ord(c) < 32 for c in a)) else a
                        for a in map(str, self.argv))

    def describe(self) -> str:
        return (f"`{self.cmdline()}` exited {self.returncode}\n"
                f"--- stdout ---\n{self.stdout[:3000]}\n--- stderr ---\n{self.stderr[:3000]}")


class Modelfs:
    """Runs the real binary against one store directory."""

    def __init__(self, binary: Path, store: Path, prefix=()):
        self.bin = Path(binary)
        self.store = Path(store)
        # Command prefix, e.g. setpriv to run as an unprivileged user.
        self.prefix = list(prefix)

    def argv(self, *args):
        return [*self.prefix, str(self.bin), "--store", str(self.store), *map(str, args)]

    def run(self, *args, ok: bool | None = None, timeout: float = CMD_TIMEOUT, env=None,
            cwd=None) -> Result:
        """ok=True: assert exit 0; ok=False: assert non-zero exit; None: no check."""
        argv = self.argv(*args)
        e = dict(os.environ)
        e.pop("MODELFS_STORE", None)
        e.setdefault("NO_COLOR", "1")
        if env:
            e.update(env)
        try:
            cp = subprocess.run(argv, capture_output=True, timeout=timeout, env=e,
                                stdin=subprocess.DEVNULL, cwd=cwd)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"`{' '.join(argv)}` did not finish within {timeout}s (hung?)")
        r = Result(cp, argv)
        if ok is True:
            assert r.returncode == 0, "expected success:\n" + r.describe()
        elif ok is False:
            assert r.returncode != 0, "expected failure (non-zero exit):\n" + r.describe()
            assert r.stderr.strip(), "failed without an error message on stderr:\n" + r.describe()
        return r

    def json(self, *args, **kw):
        return self.run(*args, "--json", ok=True, **kw).json()

    def cat(self, name_path: str) -> bytes:
        return self.run("cat", name_path, ok=True).stdout_bytes

    def ls_models(self):
        return {m["name"]: m for m in self.json("ls")}

    def ls_files(self, name):
        return {f["path"]: f for f in self.json("ls", name)}

    def du(self):
        return self.json("du")

    def import_(self, path, *extra, ok=True, **kw) -> Result:
        return self.run("import", path, *extra, ok=ok, **kw)

    def snapshot(self):
        """What must not change when a command fails: ls, du and the object files."""
        objects = self.store / "objects"
        tree = []
        if objects.exists():
            for dirpath, _dirs, files in os.walk(objects):
                for fn in files:
                    p = Path(dirpath) / fn
                    try:
                        tree.append((p.relative_to(objects).as_posix(), p.lstat().st_size))
                    except FileNotFoundError:
                        pass
        return {"ls": self.json("ls"), "du": self.du(), "objects": sorted(tree)}


@pytest.fixture
def mfs(modelfs_bin, tmp_path) -> Modelfs:
    """A fresh, initialised store in tmp_path."""
    m = Modelfs(modelfs_bin, tmp_path / "store")
    m.run("init", ok=True)
    return m


@pytest.fixture
def new_store(modelfs_bin, tmp_path):
    """Factory for additional fresh (initialised) stores."""
    n = [0]

    def make(init=True):
        n[0] += 1
        m = Modelfs(modelfs_bin, tmp_path / f"store{n[0]}")
        if init:
            m.run("init", ok=True)
        return m

    return make


class Family:
    def __init__(self, root: Path, manifest: dict):
        self.root = root
        self.manifest = manifest
        self.models = manifest["models"]

    def path(self, key) -> Path:
        return self.root / self.models[key]["import_path"]

    def name(self, key) -> str:
        return self.models[key]["name"]

    def files(self, key):
        return self.models[key]["files"]

    def bytes_of(self, key, rel) -> bytes:
        return (self.path(key) / rel).read_bytes()  # follows hf-cache symlinks

    def ideal(self, keys):
        import modelfamily

        return modelfamily.ideal_for(self.manifest, keys)


def _make_family(tmp_path_factory, label, base_mib, formats):
    import modelfamily

    root = tmp_path_factory.mktemp(label)
    manifest = modelfamily.generate(root, base_mib=base_mib, seed=0, formats=formats)
    return Family(root, manifest)


@pytest.fixture(scope="session")
def family(tmp_path_factory, required_libs) -> Family:
    """The full model family (all formats), small."""
    return _make_family(tmp_path_factory, "family",
                        float(os.environ.get("MODELFS_TEST_BASE_MIB", "8")), "all")


@pytest.fixture(scope="session")
def dedup_family(tmp_path_factory, required_libs) -> Family:
    """Core models only, bigger, so that the 0.5 % dedup yardstick is meaningful."""
    return _make_family(tmp_path_factory, "dedup-family",
                        float(os.environ.get("MODELFS_TEST_DEDUP_MIB", "32")), "core")
