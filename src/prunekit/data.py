"""Real data for the benchmarks: an idx reader, MNIST, a stratified split, and a fallback.

prunekit never downloads anything. :func:`read_idx` reads idx files (LeCun et al.'s MNIST format,
optionally gzipped) that you point it at; :func:`load_mnist` finds the MNIST files in a folder; and
:func:`benchmark_split` gives the split every prunekit benchmark uses: the 10,000-image MNIST test
set divided, stratified by class with seed 0, into 8,000 training and 2,000 evaluation images. Where
the MNIST files are absent it falls back, with a warning, to scikit-learn's bundled 8×8 digits.

The idx format: two zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D
float32, 0x0E float64), a byte with the number of dimensions d, d big-endian uint32 sizes, then the
values in big-endian row-major order.
"""

from __future__ import annotations

import gzip
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

#: idx type byte -> big-endian numpy dtype.
IDX_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | Path) -> np.ndarray:
    """Read one idx file (gzipped or not; recognised by its content, not its name) into a numpy array.

    Returns an array of the file's shape in native byte order (uint8 for MNIST). Raises
    ``FileNotFoundError`` if the file is missing and ``ValueError`` naming the file and what is
    wrong when it is not a valid idx file (bad magic number, unknown type, truncated or too long).
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise ValueError(f"{path}: a damaged gzip file ({err}); download or copy it again") from err
    return parse_idx(raw, source=str(path))


def parse_idx(raw: bytes, source: str = "idx data") -> np.ndarray:
    """Parse the bytes of an (uncompressed) idx file; see :func:`read_idx`."""
    if len(raw) < 4:
        raise ValueError(f"{source}: {len(raw)} bytes is too short for an idx header (4 bytes at least)")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_TYPES:
        raise ValueError(
            f"{source}: not an idx file (magic number {raw[:4].hex()}; an idx file starts with 0000, a type byte "
            f"in {', '.join(f'{t:02x}' for t in IDX_TYPES)}, and the number of dimensions)"
        )
    dtype, ndim = IDX_TYPES[raw[2]], raw[3]
    if ndim == 0:
        raise ValueError(f"{source}: the idx header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{source}: truncated idx header ({len(raw)} bytes, {header} needed for {ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        problem = "truncated" if len(raw) < expected else "longer than its header says"
        raise ValueError(
            f"{source}: {problem}: shape {shape} of {dtype.name} needs {expected} bytes with the header, "
            f"the file has {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


#: File names tried for the images and labels of an MNIST part (e.g. "t10k", "train").
_IMAGE_NAMES = ("{part}-images-idx3-ubyte", "{part}-images.idx3-ubyte")
_LABEL_NAMES = ("{part}-labels-idx1-ubyte", "{part}-labels.idx1-ubyte")


def _find(root: Path, patterns: tuple[str, ...], part: str) -> Path | None:
    for pattern in patterns:
        for suffix in ("", ".gz"):
            candidate = root / (pattern.format(part=part) + suffix)
            if candidate.is_file():
                return candidate
    return None


def mnist_files(root: str | Path, part: str = "t10k") -> tuple[Path, Path] | None:
    """The (images, labels) idx files of MNIST's ``part`` ("t10k" or "train") in ``root``, or None."""
    root = Path(root)
    images, labels = _find(root, _IMAGE_NAMES, part), _find(root, _LABEL_NAMES, part)
    return None if images is None or labels is None else (images, labels)


def load_mnist(root: str | Path, part: str = "t10k") -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of MNIST's ``part`` from the idx files in ``root``.

    ``part`` is "t10k" (the 10,000-image test set) or "train"; files may be gzipped. Raises
    ``FileNotFoundError`` when the files are not there and ``ValueError`` when they do not look like
    MNIST (wrong shapes, counts that differ, labels outside 0–9).
    """
    files = mnist_files(root, part)
    if files is None:
        raise FileNotFoundError(
            f"no MNIST {part!r} files in {root}: expected {_IMAGE_NAMES[0].format(part=part)}[.gz] and "
            f"{_LABEL_NAMES[0].format(part=part)}[.gz]; prunekit downloads nothing, so copy them there"
        )
    images, labels = read_idx(files[0]), read_idx(files[1])
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{files[0]}: MNIST images are (N, rows, cols) uint8, got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{files[1]}: expected {len(images)} labels for {files[0].name}, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{files[1]}: MNIST labels are 0–9, got values from {labels.min()} to {labels.max()}")
    return images, labels.astype(np.int64)


def stratified_split(labels: np.ndarray, n_train: int, n_eval: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, eval) of a split that keeps every class's share in both parts.

    Each class gets ``n_train · count / N`` training images, rounded so that the totals are exactly
    ``n_train`` and ``n_eval`` (largest remainders first, ties to the lower class); which images go
    where is a permutation drawn with ``seed``, so the same seed gives the same split everywhere.
    Both index arrays are sorted.
    """
    labels = np.asarray(labels)
    if n_train < 1 or n_eval < 1 or n_train + n_eval > len(labels):
        raise ValueError(f"cannot split {len(labels)} items into {n_train} training and {n_eval} evaluation items")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    used = n_train + n_eval
    total = counts * used / len(labels)
    train_share = counts * n_train / len(labels)
    n_class = _largest_remainder(total, used)
    n_class_train = np.minimum(_largest_remainder(train_share, n_train), n_class)
    train, evaluation = [], []
    for cls, take, take_train in zip(classes, n_class, n_class_train):
        members = rng.permutation(np.flatnonzero(labels == cls))[:take]
        train.append(members[:take_train])
        evaluation.append(members[take_train:])
    train_idx, eval_idx = np.sort(np.concatenate(train)), np.sort(np.concatenate(evaluation))
    if len(train_idx) != n_train or len(eval_idx) != n_eval:  # only when a class is too small to share
        raise ValueError(f"cannot split these labels stratified into {n_train} and {n_eval} items")
    return train_idx, eval_idx


def _largest_remainder(shares: np.ndarray, total: int) -> np.ndarray:
    whole = np.floor(shares).astype(np.int64)
    order = np.argsort(-(shares - whole), kind="stable")
    whole[order[: total - int(whole.sum())]] += 1
    return whole


@dataclass
class Split:
    """Training and evaluation tensors: images (N, 1, H, W) float32, standardised with the training
    set's mean and standard deviation; labels (N,) int64. ``description`` says where they came from."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_eval: torch.Tensor
    y_eval: torch.Tensor
    name: str
    description: str

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_eval.max())) + 1

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def make_split(
    images: np.ndarray, labels: np.ndarray, n_train: int, n_eval: int, seed: int, name: str, description: str
) -> Split:
    """A stratified :class:`Split` of images (N, H, W) in any numeric range; pixels are standardised
    with the training part's mean and standard deviation (one number each)."""
    train_idx, eval_idx = stratified_split(labels, n_train, n_eval, seed)
    x = torch.as_tensor(np.asarray(images, dtype=np.float32)).unsqueeze(1)
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    x_train, x_eval = x[torch.as_tensor(train_idx)], x[torch.as_tensor(eval_idx)]
    mean, std = x_train.mean(), x_train.std().clamp_min(1e-6)
    return Split(
        (x_train - mean) / std,
        y[torch.as_tensor(train_idx)],
        (x_eval - mean) / std,
        y[torch.as_tensor(eval_idx)],
        name,
        description,
    )


def mnist_split(root: str | Path, n_train: int = 8000, n_eval: int = 2000, seed: int = 0) -> Split:
    """The benchmark protocol: MNIST's test set (in ``root``) split stratified with ``seed`` into
    ``n_train`` training and ``n_eval`` evaluation images (8,000 / 2,000 with seed 0 by default)."""
    images, labels = load_mnist(root, "t10k")
    return make_split(
        images,
        labels,
        n_train,
        n_eval,
        seed,
        "mnist10k",
        f"MNIST test set (10,000 images, 28×28) split stratified with seed {seed} into "
        f"{n_train:,} training and {n_eval:,} evaluation images",
    )


def digits_split(seed: int = 0, size: int = 28) -> Split:
    """scikit-learn's bundled digits (1,797 8×8 images, pixel values 0–16), resized bilinearly to
    ``size``×``size`` so models built for MNIST run unchanged, split stratified 80/20 with ``seed``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(
            'the digits fallback needs scikit-learn: pip install "prunekit[bench]" (or provide the MNIST files)'
        ) from err
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    if size != 8:
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    n_eval = round(0.2 * len(digits.target))
    return make_split(
        images.squeeze(1).numpy(),
        digits.target,
        len(digits.target) - n_eval,
        n_eval,
        seed,
        "sklearn-digits",
        f"scikit-learn digits (1,797 8×8 images resized to {size}×{size}) split stratified with seed {seed} "
        f"into {len(digits.target) - n_eval:,} training and {n_eval:,} evaluation images (MNIST files absent)",
    )


def benchmark_split(root: str | Path | None, n_train: int = 8000, n_eval: int = 2000, seed: int = 0) -> Split:
    """:func:`mnist_split` of ``root`` when it holds the MNIST test-set files; otherwise, with a
    ``UserWarning`` saying so, :func:`digits_split` (results then are not comparable with MNIST's)."""
    if root is not None and mnist_files(root, "t10k") is not None:
        return mnist_split(root, n_train, n_eval, seed)
    warnings.warn(
        f"MNIST test-set files not found in {root}; falling back to scikit-learn's 8×8 digits resized to 28×28 "
        "(1,797 images). Point the benchmark at a folder with t10k-images-idx3-ubyte[.gz] and "
        "t10k-labels-idx1-ubyte[.gz] for the real protocol.",
        UserWarning,
        stacklevel=2,
    )
    return digits_split(seed)
