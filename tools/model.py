"""Model tools: fetch a source model, cut it to a feature extractor, verify it.

    python -m tools.model prepare                  # what `make setup` runs
    python -m tools.model fetch mobilenet_v2_1.0_224_quant.tflite [--from DIR]
    python -m tools.model cut SRC.tflite --tensor NAME --out OUT.tflite
    python -m tools.model verify MODEL.tflite [--photo PHOTO] [--labels LABELS]

Every file that comes in is checked against the sha256 in
``models/manifest.json``; a mismatch is an error that deletes nothing of
value (the bad copy is never moved into place).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from edge_client.errors import ChecksumError, EnfPireError, ModelNotFoundError
from edge_client.extractor import Extractor, file_sha256
from edge_client.interpreter import make_interpreter
from tools import cut as cutter

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
SHARED_MODELS = ROOT.parent / "shared" / "models"


def manifest() -> dict[str, Any]:
    return json.loads((MODELS / "manifest.json").read_text())


def install_file(data_source: Path, dest: Path, sha256: str) -> Path:
    """Copy ``data_source`` to ``dest`` through a temporary file, only if its sha256 matches."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".incoming-")
    os.close(fd)
    try:
        shutil.copyfile(data_source, tmp)
        _check_sha(Path(tmp), sha256, str(data_source))
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def _check_sha(path: Path, expected: str, origin: str) -> None:
    actual = file_sha256(path)
    if actual != expected:
        raise ChecksumError(f"{origin}: sha256 {actual} differs from the expected {expected}")


def fetch(name: str, source_dir: Path | None = None, out_dir: Path = MODELS) -> Path:
    """Put source file ``name`` into ``out_dir``: from ``source_dir`` (default
    ``../shared/models``) when it is there, else from its public URL."""
    entry = manifest()["sources"].get(name)
    if entry is None:
        raise ModelNotFoundError(f"{name} is not in models/manifest.json")
    dest = out_dir / name
    if dest.is_file() and file_sha256(dest) == entry["sha256"]:
        return dest
    local = (source_dir or SHARED_MODELS) / name
    if local.is_file():
        return install_file(local, dest, entry["sha256"])
    if source_dir is not None:
        raise ModelNotFoundError(f"{local} does not exist")
    return _download(entry["urls"], dest, entry["sha256"])


def _download(urls: list[str], dest: Path, sha256: str) -> Path:
    errors = []
    for url in urls:
        with tempfile.NamedTemporaryFile(dir=dest.parent, prefix=".download-", delete=False) as tmp:
            try:
                with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 (https only)
                    shutil.copyfileobj(response, tmp)
            except OSError as exc:
                errors.append(f"{url}: {exc}")
                os.unlink(tmp.name)
                continue
        try:
            return install_file(Path(tmp.name), dest, sha256)
        finally:
            os.unlink(tmp.name)
    raise ModelNotFoundError("could not download the model: " + "; ".join(errors))


def cut_file(source: Path, tensor: str, out: Path) -> Path:
    """Cut ``source`` at ``tensor`` and write the extractor atomically to ``out``."""
    data = cutter.cut(source.read_bytes(), tensor)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out)
    return out


def prepare(name: str | None = None, source_dir: Path | None = None, out_dir: Path = MODELS) -> Path:
    """Make extractor ``name`` (default: the manifest's default) ready in ``out_dir``.

    Quick when nothing changed: an extractor with the right sha256 is kept.
    """
    data = manifest()
    name = name or data["default"]
    entry = data["extractors"][name]
    out = out_dir / entry["file"]
    if out.is_file() and file_sha256(out) == entry["sha256"]:
        return out
    source = fetch(entry["source"], source_dir, out_dir)
    tmp = cut_file(source, entry["tensor"], out.with_name(f".{out.name}.cut"))
    try:
        _check_sha(tmp, entry["sha256"], f"cut of {source.name}")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def describe(model: Path) -> dict[str, Any]:
    """Inputs, outputs, quantization and sha256 of a model."""
    interpreter, runtime = make_interpreter(str(model), 1)

    def tensor(d: dict[str, Any]) -> dict[str, Any]:
        scale, zero_point = d["quantization"]
        return {"name": d["name"], "shape": [int(x) for x in d["shape"]],
                "dtype": np.dtype(d["dtype"]).name, "scale": float(scale), "zero_point": int(zero_point)}

    return {"file": str(model), "sha256": file_sha256(model), "runtime": runtime,
            "inputs": [tensor(d) for d in interpreter.get_input_details()],
            "outputs": [tensor(d) for d in interpreter.get_output_details()]}


def run_on_photo(model: Path, photo: str, labels: Path | None, top: int = 3) -> dict[str, Any]:
    """Run ``model`` on ``photo``: top labels for a classifier, else the feature's summary."""
    extractor = Extractor(model, num_threads=0)
    vector = extractor.extract(photo)
    if labels is not None and labels.is_file():
        names = labels.read_text().splitlines()
        if len(names) == vector.size:
            best = np.argsort(-vector)[:top]
            return {"top": [{"label": names[i], "index": int(i), "score": float(vector[i])} for i in best]}
    return {"dim": int(vector.size), "norm": float(np.linalg.norm(vector)), "head": vector[:5].tolist()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.model", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="fetch and cut the default extractor into models/")
    p.add_argument("--extractor"); p.add_argument("--from", dest="source_dir", type=Path)
    p = sub.add_parser("fetch", help="copy or download a source model, checking its sha256")
    p.add_argument("name"); p.add_argument("--from", dest="source_dir", type=Path)
    p.add_argument("--out", type=Path, default=MODELS)
    p = sub.add_parser("cut", help="cut a TFLite model to one named tensor, reshaped to [1, D]")
    p.add_argument("model", type=Path); p.add_argument("--tensor", required=True)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("verify", help="print a model's tensors and sha256, run it on a photo")
    p.add_argument("model", type=Path); p.add_argument("--photo")
    p.add_argument("--labels", type=Path, default=SHARED_MODELS / "imagenet_labels.txt")
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            print(prepare(args.extractor, args.source_dir))
        elif args.command == "fetch":
            print(fetch(args.name, args.source_dir, args.out))
        elif args.command == "cut":
            out = cut_file(args.model, args.tensor, args.out)
            print(f"{out}  sha256 {file_sha256(out)}")
        else:
            info = describe(args.model)
            if args.photo:
                info["photo"] = {"path": args.photo, **run_on_photo(args.model, args.photo, args.labels)}
            print(json.dumps(info, indent=2))
    except (EnfPireError, cutter.CutError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
