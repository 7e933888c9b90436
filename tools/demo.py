"""``make demo``: the main job end to end (see README)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from edge_client.extractor import Extractor

ROOT = Path(__file__).resolve().parent.parent
SHARED_MODELS = ROOT.parent / "shared" / "models"


def sanity_check() -> None:
    """Classify the parrot photo with the source classifier: proves preprocessing and quantization."""
    classifier = Extractor(SHARED_MODELS / "mobilenet_v2_1.0_224_quant.tflite")
    labels = (SHARED_MODELS / "imagenet_labels.txt").read_text().splitlines()
    scores = classifier.extract(SHARED_MODELS / "parrot.jpg")
    print(f"sanity: parrot.jpg -> {labels[int(np.argmax(scores))]} ({classifier.runtime})")


def main() -> int:
    sanity_check()
    return 0


if __name__ == "__main__":
    sys.exit(main())
