"""The on-device feature extractor: photo in, L2-normalised float32 vector out."""
from __future__ import annotations

import logging
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from ..errors import ModelNotFoundError, PhotoError
from . import interpreter as tfl
from . import registry
from .photo import Photo, load_rgb
from .registry import Norm, file_sha256  # file_sha256: kept importable from here

log = logging.getLogger(__name__)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero), as float32."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, np.float32(1e-12))


def random_mixture(anchors: np.ndarray, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """A unit vector mixed from the rows of ``anchors`` with Dirichlet(``alpha``) weights: how
    a fictitious photo of a spot is made from its published views (dummy photos, cells decoys).
    Below 1 the mixture stays near one or two views, as a real photo does."""
    return l2_normalize(rng.dirichlet(np.full(len(anchors), alpha)) @ anchors)


class Extractor:
    """Runs a TFLite feature model (an image in, one [1, D] tensor out).

    The interpreter is built once; ``extract`` is thread-safe (calls are
    serialised: one interpreter has one set of tensors). Inputs may be a path,
    encoded bytes, a PIL image or an HxWx3 uint8 array; see
    :mod:`edge_client.vision.photo` for the orientation, resize and crop policy.
    ``mean``/``std`` describe the float model's input normalisation
    ``(pixel - mean) / std``, a scalar or one value per RGB channel; left out,
    they are the ones registered for this file's sha256 in the manifest beside
    it (:mod:`edge_client.vision.registry`), else MobileNet's 128, 128.
    ``reference_kernels`` trades speed for features that are bit-identical on every CPU
    (see :func:`edge_client.vision.interpreter.make_interpreter`).
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        num_threads: int = 0,
        max_pixels: int = 100_000_000,
        mean: Norm | None = None,
        std: Norm | None = None,
        reference_kernels: bool = False,
    ):
        path = Path(model_path)
        if not path.is_file():
            raise ModelNotFoundError(
                f"model file {path} does not exist (run 'make setup' or "
                "'python -m tools.model prepare', or pass --model)"
            )
        self.model_path = path
        self.sha256 = file_sha256(path)
        self.max_pixels = max_pixels
        registered = registry.normalisation(path, self.sha256)
        self.mean = registered[0] if mean is None else mean
        self.std = registered[1] if std is None else std
        self.num_threads = num_threads or os.cpu_count() or 1
        self._interpreter, self.runtime = tfl.make_interpreter(str(path), self.num_threads, reference=reference_kernels)
        self.reference_kernels = reference_kernels
        self._input = self._interpreter.get_input_details()[0]
        self._output = self._interpreter.get_output_details()[0]
        self.input_size = tfl.input_size(self._input)
        self.dim = int(np.prod(self._output["shape"]))
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"Extractor(model={self.model_path.name!r}, dim={self.dim}, "
            f"input={self.input_size[0]}x{self.input_size[1]}, runtime={self.runtime!r})"
        )

    def preprocess(self, photo: Photo, fast: bool = True) -> np.ndarray:
        """Decode and resize ``photo`` to the model's input as HxWx3 uint8."""
        return load_rgb(photo, self.input_size, self.max_pixels, fast=fast)

    def input_tensor(self, pixels: np.ndarray) -> np.ndarray:
        """Preprocessed pixels as this model's input tensor (normalised, quantized if it is)."""
        return tfl.quantize_input(pixels, self._input, self.mean, self.std)

    def run(self, pixels: np.ndarray) -> np.ndarray:
        """Feature of already-preprocessed pixels: invoke and L2-normalise."""
        tensor = self.input_tensor(pixels)
        with self._lock:
            self._interpreter.set_tensor(self._input["index"], tensor)
            self._interpreter.invoke()
            raw = self._interpreter.get_tensor(self._output["index"])
        return l2_normalize(tfl.dequantize(raw, self._output).reshape(-1))

    def extract(self, photo: Photo, fast: bool = True) -> np.ndarray:
        """The L2-normalised float32 feature (shape ``[dim]``) of one photo."""
        return self.run(self.preprocess(photo, fast=fast))

    def extract_many(
        self,
        photos: Iterable[Photo],
        workers: int = 2,
        on_error: Callable[[Photo, PhotoError], None] | None = None,
    ) -> Iterator[np.ndarray | None]:
        """Features of many photos, in order.

        Decoding runs a few photos ahead in a small thread pool (Pillow releases
        the GIL) while the interpreter works, with a bounded read-ahead so memory
        stays flat for any number of photos. A photo that cannot be decoded
        raises :class:`PhotoError`, or, when ``on_error`` is given, is reported
        to it and yields ``None``.
        """
        ahead: deque[tuple[Photo, Future[np.ndarray]]] = deque()
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for photo in photos:
                ahead.append((photo, pool.submit(self.preprocess, photo)))
                if len(ahead) > 2 * workers:
                    yield self._finish(*ahead.popleft(), on_error)
            while ahead:
                yield self._finish(*ahead.popleft(), on_error)

    def _finish(
        self, photo: Photo, pending: Future[np.ndarray], on_error: Callable[[Photo, PhotoError], None] | None
    ) -> np.ndarray | None:
        try:
            return self.run(pending.result())
        except PhotoError as exc:
            if on_error is None:
                raise
            on_error(photo, exc)
            return None
