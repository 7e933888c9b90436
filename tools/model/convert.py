"""Float TFLite models from the frameworks people train in.

- PyTorch (``pip install 'enfpire[torch]'``): ``MODULE:FACTORY`` names a function
  that returns an ``nn.Module`` taking NCHW float images; litert-torch converts
  it. The module is wrapped to take NHWC images, as the phone hands pixels in,
  and to return a flat ``[1, D]`` feature.
- Keras (a ``.keras`` or ``.h5`` file) and SavedModel folders
  (``pip install 'enfpire[tensorflow]'``): TensorFlow's own TFLite converter.

Every result is a float model with one ``serving_default`` signature, ready for
``quantize``. Each framework is imported only when asked for, so nobody installs
what they do not use.
"""
from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from edge_client.errors import EnfPireError


class ConvertError(EnfPireError):
    """The model cannot be converted (framework missing, bad factory, unsupported graph)."""


def _need(module: str, extra: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConvertError(f"{module} is not installed: pip install 'enfpire[{extra}]'") from exc


def load_factory(spec: str) -> Callable[[], Any]:
    """The callable named by ``package.module:function``."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConvertError(f"expected MODULE:FACTORY, got {spec!r}")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConvertError(f"cannot load {spec}: {exc}") from exc
    if not callable(factory):
        raise ConvertError(f"{spec} is not callable")
    return factory  # type: ignore[no-any-return]


def from_torch(module: Any, size: tuple[int, int], out: Path) -> Path:
    """Convert an ``nn.Module`` (NCHW input) to a float TFLite model taking ``1 x H x W x 3``."""
    torch = _need("torch", "torch")
    litert_torch = _need("litert_torch", "torch")

    class ChannelsLast(torch.nn.Module):  # type: ignore[misc, name-defined]
        """NHWC in, as the phone's pixels; a flat [1, D] feature out."""

        def __init__(self, inner: Any):
            super().__init__()
            self.inner = inner

        def forward(self, images: Any) -> Any:
            return torch.flatten(self.inner(images.permute(0, 3, 1, 2)), 1)

    width, height = size
    sample = (torch.zeros(1, height, width, 3),)
    edge_model = litert_torch.convert(ChannelsLast(module).eval(), sample)
    return _write(out, lambda path: edge_model.export(str(path)))


def from_saved_model(folder: Path, out: Path) -> Path:
    """Convert a TensorFlow SavedModel folder."""
    tf = _need("tensorflow", "tensorflow")
    return _write(out, lambda path: path.write_bytes(tf.lite.TFLiteConverter.from_saved_model(str(folder)).convert()))


def from_keras(file: Path, out: Path) -> Path:
    """Convert a saved Keras model (``.keras`` or ``.h5``) through a temporary SavedModel.

    Keras 3's own ``export`` writes the SavedModel; tracing the model straight into
    the converter (``from_concrete_functions``) was measured to lose its weights
    (NaN features), the SavedModel route keeps them.
    """
    tf = _need("tensorflow", "tensorflow")
    model = tf.keras.models.load_model(str(file), compile=False)
    if None in list(model.inputs[0].shape)[1:]:
        raise ConvertError(f"{file}: the input shape {list(model.inputs[0].shape)} must be fixed apart from the batch")
    with tempfile.TemporaryDirectory(prefix="enfpire-keras-") as folder:
        model.export(folder, verbose=False)
        return from_saved_model(Path(folder), out)


def _write(out: Path, write: Callable[[Path], Any]) -> Path:
    """Run ``write`` on a temporary file beside ``out``, then move it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out
