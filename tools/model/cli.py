"""Model tools: fetch a source model, cut it to a feature extractor, verify it;
bring your own: convert, quantize, compare with the float model, register.

    python -m tools.model prepare                  # what `make setup` runs
    python -m tools.model fetch mobilenet_v2_1.0_224_quant.tflite [--from DIR]
    python -m tools.model cut SRC.tflite --tensor NAME --out OUT.tflite
    python -m tools.model verify MODEL.tflite [--photo PHOTO] [--labels LABELS]
    python -m tools.model convert --torch MODULE:FACTORY | --saved-model DIR | --keras FILE --out FLOAT.tflite
    python -m tools.model dequantize QUANT.tflite --out FLOAT.tflite
    python -m tools.model quantize FLOAT.tflite --calibrate DIR --out Q.tflite
    python -m tools.model verify Q.tflite --float FLOAT.tflite --dataset DIR [--max-drop POINTS]
    python -m tools.model register NAME Q.tflite --source TEXT --licence TEXT [--mean M --std S]

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
from typing import Any, Callable

import numpy as np

from edge_client.errors import ChecksumError, ConfigError, EnfPireError, ModelError, ModelNotFoundError
from edge_client.vision import registry
from edge_client.vision.extractor import Extractor, file_sha256
from edge_client.vision.interpreter import make_interpreter
from tools.model import compare as comparing
from tools.model import convert as converting
from tools.model import cut as cutter
from tools.model import dequantize as dequantizing
from tools.model import quantize as quantizing

ROOT = Path(__file__).resolve().parents[2]
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


def cut_file(source: Path, tensor: str | None, out: Path,
             edit: Callable[[bytes], bytes] | None = None) -> Path:
    """Cut ``source`` at ``tensor`` (or apply another flatbuffer ``edit``) and write the result atomically to ``out``."""
    data = edit(source.read_bytes()) if edit else cutter.cut(source.read_bytes(), str(tensor))
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
    if name not in data["extractors"]:
        raise ModelNotFoundError(f"no extractor named {name!r} in models/manifest.json")
    entry = data["extractors"][name]
    out = out_dir / entry["file"]
    if out.is_file() and file_sha256(out) == entry["sha256"]:
        return out
    if entry["source"] not in data["sources"]:
        raise ModelNotFoundError(f"{out} is missing or changed, and {name!r} was registered from "
                                 f"{entry['source']!r}: register it again")
    source = fetch(entry["source"], source_dir, out_dir)
    tmp = cut_file(source, entry["tensor"], out.with_name(f".{out.name}.cut"))
    try:
        _check_sha(tmp, entry["sha256"], f"cut of {source.name}")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def register(name: str, model: Path, source: str, licence: str, mean: Any = None, std: Any = None,
             models_dir: Path = MODELS) -> dict[str, Any]:
    """Copy ``model`` into ``models_dir`` as ``NAME.tflite`` and record it in the manifest there.

    The entry names the file, its sha256, where it came from, its licence, its
    input (size, dtype, normalisation) and its feature tensor: what the phone's
    ``--model NAME`` and the server's ``index build --model NAME`` check.
    """
    if not registry.is_name(name):
        raise ConfigError(f"a model name is a bare word, got {name!r}")
    extractor = Extractor(model, num_threads=1, mean=mean, std=std)
    if extractor._output["shape"][0] != 1 or len(extractor._output["shape"]) != 2:
        raise ModelError(f"{model} outputs {list(extractor._output['shape'])}: an extractor outputs [1, D] "
                         "(cut it first: python -m tools.model cut)")
    dest = models_dir / f"{name}.tflite"
    if model.resolve() != dest.resolve():
        install_file(model, dest, extractor.sha256)
    info = describe(dest)
    entry = {"file": dest.name, "source": source, "licence": licence, "tensor": info["outputs"][0]["name"],
             "dim": extractor.dim, "sha256": extractor.sha256,
             "input": {"size": list(extractor.input_size), "dtype": info["inputs"][0]["dtype"],
                       "mean": _plain(extractor.mean), "std": _plain(extractor.std)},
             "quantization": {k: info["outputs"][0][k] for k in ("dtype", "scale", "zero_point")}}
    data = registry.read_manifest(models_dir) or {"extractors": {}}
    data.setdefault("extractors", {})[name] = entry
    tmp = models_dir / f".{registry.MANIFEST}.tmp"
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, models_dir / registry.MANIFEST)
    return entry


def _plain(value: Any) -> Any:
    """A normalisation value as JSON: a number, or a list of three."""
    array = np.asarray(value, dtype=np.float64)
    return float(array) if array.ndim == 0 else [float(v) for v in array]


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


def _norm(text: str | None) -> Any:
    """``--mean 127.5`` or ``--mean 123.7,116.3,103.5`` (one value per RGB channel)."""
    if text is None:
        return None
    values = [float(v) for v in text.split(",")]
    return values[0] if len(values) == 1 else values


def _parser() -> argparse.ArgumentParser:
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
    p = sub.add_parser("verify", help="print a model's tensors and sha256, run it on a photo; "
                       "with --float and --dataset, what quantization cost")
    p.add_argument("model", type=Path); p.add_argument("--photo")
    p.add_argument("--labels", type=Path, default=SHARED_MODELS / "imagenet_labels.txt")
    p.add_argument("--float", dest="float_model", type=Path, help="the float extractor MODEL was quantized from")
    p.add_argument("--dataset", type=Path, help="a folder of spot folders (with landmarks.csv)")
    p.add_argument("--max-drop", type=float, help="fail when the top-1 drops by more points than this")
    p = sub.add_parser("convert", help="a float TFLite model from PyTorch, a SavedModel or Keras")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--torch", metavar="MODULE:FACTORY", help="a function returning an nn.Module (NCHW input)")
    source.add_argument("--saved-model", type=Path, metavar="DIR")
    source.add_argument("--keras", type=Path, metavar="FILE")
    p.add_argument("--size", type=int, default=224, help="input width = height for --torch (default 224)")
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("dequantize", help="a float copy of a quantized model (weights dequantized)")
    p.add_argument("model", type=Path); p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("quantize", help="full-integer (int8) quantization calibrated on photos")
    p.add_argument("model", type=Path); p.add_argument("--calibrate", type=Path, required=True, metavar="DIR")
    p.add_argument("--photos", type=int, default=quantizing.CALIBRATION_PHOTOS, help="how many (default 200)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--no-keep-grids", dest="keep_grids", action="store_false",
                   help="let the quantizer re-round weights that sit on a grid already (see tools/model/grids.py)")
    p = sub.add_parser("register", help="copy an extractor into models/ and record it in manifest.json")
    p.add_argument("name"); p.add_argument("model", type=Path)
    p.add_argument("--source", required=True, help="where the model comes from")
    p.add_argument("--licence", required=True)
    p.add_argument("--models", type=Path, default=MODELS, help="model folder (default models/)")
    for p in (sub.choices["quantize"], sub.choices["register"]):
        p.add_argument("--mean", help="input normalisation (pixel - mean) / std: one value or R,G,B "
                       "(default: as registered, else 128)")
        p.add_argument("--std")
    return parser


def _convert(args: argparse.Namespace) -> Path:
    if args.torch:
        return converting.from_torch(converting.load_factory(args.torch)(), (args.size, args.size), args.out)
    if args.saved_model:
        return converting.from_saved_model(args.saved_model, args.out)
    return converting.from_keras(args.keras, args.out)


def _verify(args: argparse.Namespace) -> int:
    if args.float_model or args.dataset:
        if not (args.float_model and args.dataset):
            raise ConfigError("comparing needs both --float and --dataset")
        report = comparing.compare(args.float_model, args.model, args.dataset)
        print(json.dumps(report, indent=2))
        print(comparing.summary(report), file=sys.stderr)
        if args.max_drop is not None and report["top1_drop_points"] > args.max_drop:
            print(f"error: the quantized model loses {report['top1_drop_points']:.1f} points of top-1, "
                  f"more than --max-drop {args.max_drop:g}", file=sys.stderr)
            return 2
        return 0
    info = describe(args.model)
    if args.photo:
        info["photo"] = {"path": args.photo, **run_on_photo(args.model, args.photo, args.labels)}
    print(json.dumps(info, indent=2))
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.command == "prepare":
        print(prepare(args.extractor, args.source_dir))
    elif args.command == "fetch":
        print(fetch(args.name, args.source_dir, args.out))
    elif args.command in ("cut", "convert", "dequantize", "quantize"):
        if args.command == "cut":
            out = cut_file(args.model, args.tensor, args.out)
        elif args.command == "convert":
            out = _convert(args)
        elif args.command == "dequantize":
            out = cut_file(args.model, None, args.out, dequantizing.dequantize_model)
        else:
            photos = quantizing.calibration_photos(args.calibrate, args.photos)
            out = quantizing.quantize(args.model, list(photos), args.out, _norm(args.mean), _norm(args.std),
                                      keep_grids=args.keep_grids)
        print(f"{out}  sha256 {file_sha256(out)}")
    elif args.command == "register":
        print(json.dumps(register(args.name, args.model, args.source, args.licence, _norm(args.mean),
                                  _norm(args.std), args.models), indent=2))
    else:
        return _verify(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (EnfPireError, cutter.CutError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
