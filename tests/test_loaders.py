"""Unmodified model loaders reading through a real modelfs mount.

A store holding a generated family (safetensors, a sharded checkpoint, torch .bin, GGUF,
ONNX with inline and external data, a nested diffusers-like tree, a Hugging Face cache
snapshot named `org/tiny`) plus a TensorFlow SavedModel and a Keras model is mounted with
`--passthrough auto` and with `--passthrough off`. Each loader loads every model from the
mount AND from the original files, and the results are compared exactly: tensor by
tensor, dtype, shape and raw bytes (NaN-safe: bytes, never float equality), and for the
runnable models (ONNX Runtime, TensorFlow, Keras) the outputs on a fixed input.

Missing libraries fail the module (naming the package); nothing is skipped.

Development aid (not for CI): MODELFS_TEST_LOADERS_ON_COPY=1 replaces the mount by a
plain copy of the model directories, to check the comparison logic without FUSE.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

import modelfamily
import mountlib
from conftest import Modelfs

LOADER_LIBS = ["numpy", "ml_dtypes", "safetensors", "torch", "gguf", "onnx", "onnxruntime",
               "tensorflow", "keras", "h5py"]

# family keys imported into the loader store (name = family.name(key))
LOADER_MODELS = ["base", "ft-head", "resharded", "torch-bin", "gguf-model", "onnx-model",
                 "onnx-external", "nested", "hf-cache"]
TF_SAVEDMODEL = "tf/savedmodel"
TF_KERAS = "tf/keras"

ON_COPY = bool(os.environ.get("MODELFS_TEST_LOADERS_ON_COPY"))

# keras 3 + numpy 2 warn about __array__(copy=...) inside keras itself
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


@pytest.fixture(scope="module", autouse=True)
def loader_libs():
    missing = []
    for lib in LOADER_LIBS:
        try:
            importlib.import_module(lib)
        except Exception as e:  # noqa: BLE001 - any import failure is a missing library
            missing.append(f"{lib} ({type(e).__name__}: {e})")
    if missing:
        pytest.fail("loader tests need these Python packages: " + ", ".join(missing)
                    + f"\ninstall them with: {sys.executable} -m pip install -r "
                    "tests/requirements.txt (onnxruntime, tensorflow-cpu)", pytrace=False)
    import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy (safetensors framework="np")


@pytest.fixture(scope="module", autouse=True)
def _no_mount_left_behind():
    yield
    mountlib.cleanup_all()


# ------------------------------------------------------------------------------------------
# fixtures: the store, the mount


@pytest.fixture(scope="module")
def tf_sources(tmp_path_factory, loader_libs):
    root = tmp_path_factory.mktemp("tf-models")
    modelfamily.write_tf_savedmodel(root / "savedmodel")
    modelfamily.write_keras(root / "keras")
    return root


@pytest.fixture(scope="module")
def loader_store(modelfs_bin, family, tf_sources, tmp_path_factory):
    mfs = Modelfs(modelfs_bin, tmp_path_factory.mktemp("loader-store") / "store")
    mfs.run("init", ok=True)
    for key in LOADER_MODELS:
        mfs.import_(family.path(key), ok=True)
    mfs.import_(tf_sources / "savedmodel", "--name", TF_SAVEDMODEL, ok=True)
    mfs.import_(tf_sources / "keras", "--name", TF_KERAS, ok=True)
    return mfs


class Tree:
    """Paths of one model file in the mount and in the original directories."""

    def __init__(self, root, originals: dict, mode: str, mount=None):
        self.root = root
        self.originals = originals  # model name -> original directory
        self.mode = mode
        self.mount = mount

    def mnt(self, name, rel=""):
        return self.root / name / rel if rel else self.root / name

    def orig(self, name, rel=""):
        return self.originals[name] / rel if rel else self.originals[name]


@pytest.fixture(scope="module", params=["auto", "off"], ids=["passthrough-auto", "passthrough-off"])
def tree(request, loader_store, family, tf_sources, tmp_path_factory):
    mode = request.param
    originals = {family.name(k): family.path(k) for k in LOADER_MODELS}
    originals[TF_SAVEDMODEL] = tf_sources / "savedmodel"
    originals[TF_KERAS] = tf_sources / "keras"
    if ON_COPY:
        root = tmp_path_factory.mktemp(f"copy-{mode}")
        for name, src in originals.items():
            shutil.copytree(src, root / name, symlinks=False)
        yield Tree(root, originals, mode)
        return
    mp = tmp_path_factory.mktemp(f"mnt-{mode}")
    m = mountlib.Mount(loader_store, mp, "--passthrough", mode)
    try:
        m.start_daemon()
        yield Tree(mp, originals, mode, m)
    finally:
        m.cleanup()


# ------------------------------------------------------------------------------------------
# comparison helpers


def _np_bytes(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def assert_same_np(what, got, want):
    assert isinstance(got, np.ndarray), f"{what}: loader returned {type(got)}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if _np_bytes(got) != _np_bytes(want):
        g = np.frombuffer(_np_bytes(got), np.uint8)
        w = np.frombuffer(_np_bytes(want), np.uint8)
        bad = np.flatnonzero(g != w)
        raise AssertionError(f"{what}: {bad.size} of {w.size} bytes differ, first at byte {bad[0]}")


def _torch_bytes(t) -> bytes:
    import torch

    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same_torch(what, got, want):
    import torch

    assert isinstance(got, torch.Tensor), f"{what}: loader returned {type(got)}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    gb, wb = _torch_bytes(got), _torch_bytes(want)
    if gb != wb:
        raise AssertionError(f"{what}: tensor bytes differ, first at byte {mountlib.first_diff(gb, wb)}"
                             f" of {len(wb)}")


def assert_same_state(what, got: dict, want: dict, same):
    assert list(got) == list(want), (
        f"{what}: tensor names differ: missing {sorted(set(want) - set(got))[:10]}, "
        f"extra {sorted(set(got) - set(want))[:10]}")
    for k in want:
        same(f"{what}[{k}]", got[k], want[k])


# ------------------------------------------------------------------------------------------
# safetensors


ST_FILES = [
    ("base", "model.safetensors"),  # whole-file object
    ("ft-head", "model.safetensors"),  # recipe (shifted offsets, shares base's tensors)
    ("nested", "text_encoder/model.safetensors"),  # recipe of base tensors, renamed
    ("nested", "unet/diffusion_pytorch_model.safetensors"),  # mixed f16/f32/bf16
    ("hf-cache", "model.safetensors"),  # org/tiny (nested model name), f32
]
ST_IDS = [f"{k}/{p}" for k, p in ST_FILES]


@pytest.mark.parametrize("framework", ["np", "pt"])
@pytest.mark.parametrize("key,rel", ST_FILES, ids=ST_IDS)
def test_safetensors_safe_open(tree, family, key, rel, framework):
    from safetensors import safe_open

    name = family.name(key)
    same = assert_same_np if framework == "np" else assert_same_torch
    with safe_open(str(tree.mnt(name, rel)), framework=framework) as fm, \
            safe_open(str(tree.orig(name, rel)), framework=framework) as fo:
        assert fm.metadata() == fo.metadata()
        keys = list(fo.keys())
        assert list(fm.keys()) == keys and keys
        for k in keys:
            same(f"{name}/{rel}[{k}]", fm.get_tensor(k), fo.get_tensor(k))
            # partial reads through get_slice (first and last rows)
            sm, so = fm.get_slice(k), fo.get_slice(k)
            assert sm.get_shape() == so.get_shape() and sm.get_dtype() == so.get_dtype()
            shape = so.get_shape()
            if shape and shape[0] > 1:
                same(f"{name}/{rel}[{k}][:1]", sm[:1], so[:1])
                same(f"{name}/{rel}[{k}][-1:]", sm[shape[0] - 1:], so[shape[0] - 1:])


@pytest.mark.parametrize("framework", ["np", "pt"])
@pytest.mark.parametrize("key,rel", ST_FILES, ids=ST_IDS)
def test_safetensors_load_file(tree, family, key, rel, framework):
    name = family.name(key)
    if framework == "np":
        from safetensors.numpy import load_file

        same = assert_same_np
    else:
        from safetensors.torch import load_file

        same = assert_same_torch
    got = load_file(str(tree.mnt(name, rel)))
    want = load_file(str(tree.orig(name, rel)))
    assert_same_state(f"{name}/{rel}", dict(sorted(got.items())), dict(sorted(want.items())), same)


def test_sharded_checkpoint(tree, family):
    """transformers-style: read the index from the mount, load each shard it names through
    safetensors, and assemble the state dict; it must equal the originals and base's tensors."""
    from safetensors import safe_open

    name = family.name("resharded")
    index = json.loads(tree.mnt(name, "model.safetensors.index.json").read_bytes())
    assert index == json.loads(tree.orig(name, "model.safetensors.index.json").read_bytes())
    wm = index["weight_map"]
    shards = sorted(set(wm.values()))
    assert len(shards) == 3, shards
    state = {}
    total = 0
    for shard in shards:
        with safe_open(str(tree.mnt(name, shard)), framework="pt") as fm, \
                safe_open(str(tree.orig(name, shard)), framework="pt") as fo:
            assert sorted(fm.keys()) == sorted(k for k, v in wm.items() if v == shard), shard
            for k in fm.keys():
                t = fm.get_tensor(k)
                assert_same_torch(f"{name}/{shard}[{k}]", t, fo.get_tensor(k))
                state[k] = t
                total += t.numel() * t.element_size()
    assert sorted(state) == sorted(wm)
    assert total == index["metadata"]["total_size"]
    base = family.name("base")
    with safe_open(str(tree.mnt(base, "model.safetensors")), framework="pt") as fb:
        assert sorted(fb.keys()) == sorted(state)
        for k in fb.keys():
            assert_same_torch(f"resharded[{k}] vs base", state[k], fb.get_tensor(k))


# ------------------------------------------------------------------------------------------
# torch


def test_torch_load_mmap(tree, family):
    import torch

    name = family.name("torch-bin")
    got = torch.load(str(tree.mnt(name, "pytorch_model.bin")), mmap=True, weights_only=True)
    want = torch.load(str(tree.orig(name, "pytorch_model.bin")), mmap=True, weights_only=True)
    assert_same_state(f"{name}/pytorch_model.bin", got, want, assert_same_torch)
    assert len(want) > 10


# ------------------------------------------------------------------------------------------
# GGUF


def test_gguf_reader(tree, family):
    from gguf import GGUFReader

    name = family.name("gguf-model")
    rm = GGUFReader(str(tree.mnt(name, "model.gguf")))
    ro = GGUFReader(str(tree.orig(name, "model.gguf")))
    assert list(rm.fields) == list(ro.fields) and len(ro.fields) > 5
    for k, fo in ro.fields.items():
        fm = rm.fields[k]
        assert fm.name == fo.name and list(fm.types) == list(fo.types), k
        assert list(fm.data) == list(fo.data), k
        assert len(fm.parts) == len(fo.parts), k
        for i, (pm, po) in enumerate(zip(fm.parts, fo.parts)):
            assert_same_np(f"gguf field {k} part {i}", np.asarray(pm), np.asarray(po))
    assert [t.name for t in rm.tensors] == [t.name for t in ro.tensors] and ro.tensors
    for tm, to in zip(rm.tensors, ro.tensors):
        what = f"gguf tensor {to.name}"
        assert tm.tensor_type == to.tensor_type, what
        assert list(tm.shape) == list(to.shape), what
        assert (tm.n_elements, tm.n_bytes, tm.data_offset) == (to.n_elements, to.n_bytes, to.data_offset), what
        assert_same_np(what, np.asarray(tm.data), np.asarray(to.data))


# ------------------------------------------------------------------------------------------
# ONNX


ONNX_FILES = [("onnx-model", "model.onnx"), ("onnx-external", "model.onnx"), ("hf-cache", "onnx/model.onnx")]


def _ort_session(path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("key,rel", ONNX_FILES, ids=[f"{k}/{p}" for k, p in ONNX_FILES])
def test_onnxruntime(tree, family, key, rel):
    import onnx

    name = family.name(key)
    sm, so = _ort_session(tree.mnt(name, rel)), _ort_session(tree.orig(name, rel))
    inp = so.get_inputs()[0]
    assert [i.name for i in sm.get_inputs()] == [i.name for i in so.get_inputs()]
    d_in = inp.shape[1]
    x = np.random.default_rng(123).standard_normal((5, d_in)).astype(np.float32)
    out_m = sm.run(None, {inp.name: x})
    out_o = so.run(None, {inp.name: x})
    assert len(out_m) == len(out_o) == 1
    assert_same_np(f"onnxruntime {name}/{rel} output", out_m[0], out_o[0])
    assert np.abs(out_o[0]).sum() > 0
    # and the initializers as the onnx package loads them (external data resolved from the mount)
    mm = onnx.load(str(tree.mnt(name, rel)), load_external_data=True)
    mo = onnx.load(str(tree.orig(name, rel)), load_external_data=True)
    from onnx import numpy_helper

    im = {t.name: numpy_helper.to_array(t) for t in mm.graph.initializer}
    io = {t.name: numpy_helper.to_array(t) for t in mo.graph.initializer}
    assert_same_state(f"onnx {name}/{rel}", im, io, assert_same_np)
    assert mm.SerializeToString() == mo.SerializeToString()


# ------------------------------------------------------------------------------------------
# TensorFlow / Keras (TensorFlow is imported once per session; the originals are loaded once)


TF_VARS = ["w1", "b1", "w2", "step"]  # the tf.Module's variables (see modelfamily.write_tf_savedmodel)


@pytest.fixture(scope="module")
def tf_input():
    return np.random.default_rng(7).standard_normal((6, modelfamily.TF_IN)).astype(np.float32)


@pytest.fixture(scope="module")
def tf_original(tf_sources, tf_input):
    import tensorflow as tf

    m = tf.saved_model.load(str(tf_sources / "savedmodel"))
    out = {k: v.numpy() for k, v in m.signatures["serving_default"](x=tf.constant(tf_input)).items()}
    variables = {a: getattr(m, a).numpy() for a in TF_VARS}
    return {"out": out, "vars": variables, "call": m(tf.constant(tf_input))["logits"].numpy()}


def test_tf_savedmodel(tree, tf_original, tf_input):
    import tensorflow as tf

    m = tf.saved_model.load(str(tree.mnt(TF_SAVEDMODEL)))
    assert "serving_default" in m.signatures
    out = {k: v.numpy() for k, v in m.signatures["serving_default"](x=tf.constant(tf_input)).items()}
    assert sorted(out) == sorted(tf_original["out"]) == ["hidden_sum", "logits"]
    for k in out:
        assert_same_np(f"savedmodel output {k}", out[k], tf_original["out"][k])
    assert_same_np("savedmodel __call__", m(tf.constant(tf_input))["logits"].numpy(), tf_original["call"])
    variables = {a: getattr(m, a).numpy() for a in TF_VARS}
    for k in TF_VARS:
        assert_same_np(f"savedmodel variable {k}", np.asarray(variables[k]),
                       np.asarray(tf_original["vars"][k]))


@pytest.fixture(scope="module")
def keras_original(tf_sources, tf_input):
    import keras

    m = keras.models.load_model(str(tf_sources / "keras" / "model.keras"))
    return {"weights": m.get_weights(), "out": np.asarray(m.predict(tf_input, verbose=0)),
            "config": m.get_config()}


def test_keras(tree, keras_original, tf_input):
    import keras

    m = keras.models.load_model(str(tree.mnt(TF_KERAS, "model.keras")))
    assert m.get_config() == keras_original["config"]
    w = m.get_weights()
    assert len(w) == len(keras_original["weights"]) == 4
    for i, (a, b) in enumerate(zip(w, keras_original["weights"])):
        assert_same_np(f"keras weight {i}", np.asarray(a), np.asarray(b))
    assert_same_np("keras predict", np.asarray(m.predict(tf_input, verbose=0)), keras_original["out"])
    # the separate HDF5 weights file, read by h5py from the mount
    m2 = keras.models.clone_model(m)
    m2.load_weights(str(tree.mnt(TF_KERAS, "model.weights.h5")))
    for i, (a, b) in enumerate(zip(m2.get_weights(), keras_original["weights"])):
        assert_same_np(f"keras model.weights.h5 weight {i}", np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------------------
# the mount holds exactly what was imported (a cheap whole-tree check of the loader store)


def test_loader_tree_byte_identical(tree):
    for name, src in tree.originals.items():
        want = modelfamily.list_files(src)
        got = modelfamily.list_files(tree.mnt(name))
        assert got == want, (name, sorted(set(want) ^ set(got)))
        for rel in want:
            a, b = tree.mnt(name, rel).read_bytes(), tree.orig(name, rel).read_bytes()
            assert a == b, f"{name}/{rel}: differs from the original at byte {mountlib.first_diff(a, b)}"
