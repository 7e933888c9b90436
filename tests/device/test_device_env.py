"""The device venv is shaped like a Chaquopy app: Python 3.10, numpy 1.x, no interpreter and
nothing from the server side; ``edge_client`` imports whole and pulls in nothing else."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np

#: Top-level modules edge_client may bring in besides the standard library.
ALLOWED = {"edge_client", "numpy", "PIL", "requests", "urllib3", "charset_normalizer", "chardet", "idna",
           "certifi", "pyhpke", "cryptography", "cffi", "_cffi_backend", "pycparser", "typing_extensions",
           "brotli", "brotlicffi", "zstandard", "socks",
           "cython_runtime", "_openssl"}  # runtime modules of numpy's and cryptography's compiled parts
#: Never installed here: the server side and every TFLite interpreter.
NOT_INSTALLED = ("flask", "werkzeug", "sklearn", "scipy", "waitress", "faiss", "matplotlib", "pandas",
                 "ai_edge_litert", "tflite_runtime", "tensorflow")
#: Never imported by edge_client (lite_server and tools are the checkout's own code, so importable).
FORBIDDEN = NOT_INSTALLED + ("lite_server", "tools", "pytest")

IMPORT_ALL = """
import json, pkgutil, importlib, sys
before = set(sys.modules)
import edge_client
names = [m.name for m in pkgutil.walk_packages(edge_client.__path__, "edge_client.")]
for name in names:
    importlib.import_module(name)
print(json.dumps({"walked": names, "loaded": sorted(set(sys.modules) - before),
                  "stdlib": sorted(sys.stdlib_module_names)}))
"""


def test_the_device_venv_is_chaquopy_shaped() -> None:
    assert sys.version_info[:2] == (3, 10)
    assert np.__version__.startswith("1."), np.__version__
    assert [name for name in NOT_INSTALLED if importlib.util.find_spec(name) is not None] == []


def test_edge_client_imports_every_module_and_nothing_outside_the_allowed_set() -> None:
    done = subprocess.run([sys.executable, "-c", IMPORT_ALL], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert {"edge_client.android", "edge_client.client", "edge_client.protocol.ohttp", "edge_client.dummies.scheduler"} \
        <= set(report["walked"])
    tops = {name.split(".")[0] for name in report["loaded"]}
    stdlib = set(report["stdlib"])
    assert not tops & set(FORBIDDEN), sorted(tops & set(FORBIDDEN))
    outside = sorted(t for t in tops - stdlib - ALLOWED if not t.startswith("_cython_"))
    assert outside == [], outside


def test_4_bit_looks_decode_on_numpy_1_exactly_as_the_format_defines_them() -> None:
    """A server with ``look_bits`` 4 sends int4 looks (numpy 2 there); on the phone's numpy 1.x they decode
    to Sylvester's Hadamard matrix times the nibbles times the float16 scale / sqrt(D), bit for bit."""
    import base64

    from edge_client.protocol import wire

    rows = np.random.default_rng(3).normal(size=(6, 128)).astype(np.float32)
    encoded = wire.encode(rows / np.linalg.norm(rows, axis=1, keepdims=True), "int4")
    packed = np.frombuffer(base64.b64decode(encoded["data"]), np.uint8).reshape(6, 64)
    codes = np.empty((6, 128), np.int64)
    codes[:, 0::2], codes[:, 1::2] = packed & 0x0F, packed >> 4
    codes = np.where(codes > 7, codes - 16, codes)
    sylvester = np.ones((1, 1), np.int64)
    while len(sylvester) < 128:
        sylvester = np.block([[sylvester, sylvester], [sylvester, -sylvester]])
    scales = wire.decode_array(encoded["scale"], "float16").astype(np.float32)
    exact = (codes @ sylvester).astype(np.float32) * (scales * np.float32(1 / np.sqrt(128)))[:, None]
    assert np.array_equal(wire.decode(encoded, expect_dim=128), exact)
