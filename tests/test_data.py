"""The idx reader, the MNIST loader, the stratified split and the digits fallback."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from prunekit import data

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist10k"
needs_mnist = pytest.mark.skipif(data.mnist_files(MNIST_DIR) is None, reason=f"no MNIST files in {MNIST_DIR}")


def idx_bytes(type_byte: int, shape: tuple[int, ...], payload: bytes) -> bytes:
    """An idx file written by hand: 0x0000, type, ndim, big-endian uint32 sizes, then the values."""
    return bytes([0, 0, type_byte, len(shape)]) + b"".join(struct.pack(">I", d) for d in shape) + payload


def write_fake_mnist(root: Path, images: np.ndarray, labels: np.ndarray, gz: bool = False) -> None:
    suffix = ".gz" if gz else ""
    image_file = idx_bytes(0x08, images.shape, images.astype(np.uint8).tobytes())
    label_file = idx_bytes(0x08, labels.shape, labels.astype(np.uint8).tobytes())
    for name, raw in [("t10k-images-idx3-ubyte", image_file), ("t10k-labels-idx1-ubyte", label_file)]:
        (root / (name + suffix)).write_bytes(gzip.compress(raw) if gz else raw)


def test_parse_uint8_matrix():
    array = data.parse_idx(idx_bytes(0x08, (2, 3), bytes([1, 2, 3, 4, 5, 255])))
    assert array.dtype == np.uint8
    np.testing.assert_array_equal(array, [[1, 2, 3], [4, 5, 255]])


def test_parse_big_endian_int32_and_float32():
    ints = data.parse_idx(idx_bytes(0x0C, (2,), struct.pack(">ii", -2, 70000)))
    np.testing.assert_array_equal(ints, [-2, 70000])
    floats = data.parse_idx(idx_bytes(0x0D, (1, 2), struct.pack(">ff", 0.5, -1.25)))
    np.testing.assert_array_equal(floats, [[0.5, -1.25]])
    assert floats.dtype.isnative


def test_read_idx_plain_and_gzipped_give_the_same_array(tmp_path):
    raw = idx_bytes(0x08, (3, 2, 2), bytes(range(12)))
    (tmp_path / "plain").write_bytes(raw)
    (tmp_path / "packed.gz").write_bytes(gzip.compress(raw))
    np.testing.assert_array_equal(data.read_idx(tmp_path / "plain"), data.read_idx(tmp_path / "packed.gz"))
    assert data.read_idx(tmp_path / "plain").shape == (3, 2, 2)


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"\x00\x00", "too short"),
        (b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00", "not an idx file"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "not an idx file"),
        (b"\x00\x00\x08\x00", "0 dimensions"),
        (b"\x00\x00\x08\x02" + struct.pack(">I", 2), "truncated idx header"),
        (idx_bytes(0x08, (2, 3), bytes(5)), "truncated"),
        (idx_bytes(0x08, (2, 3), bytes(7)), "longer than its header says"),
        (idx_bytes(0x0B, (2,), bytes(3)), "truncated"),
    ],
)
def test_bad_idx_data_is_refused_with_the_reason(raw, message):
    with pytest.raises(ValueError, match=message):
        data.parse_idx(raw)


def test_damaged_gzip_names_the_file(tmp_path):
    path = tmp_path / "broken.gz"
    path.write_bytes(gzip.compress(idx_bytes(0x08, (4,), bytes(4)))[:-6])
    with pytest.raises(ValueError, match="broken.gz.*damaged gzip"):
        data.read_idx(path)


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        data.read_idx(tmp_path / "absent")


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_reads_a_folder_of_idx_files(tmp_path, gz):
    images = np.arange(5 * 28 * 28).reshape(5, 28, 28) % 256
    labels = np.array([3, 1, 4, 1, 5])
    write_fake_mnist(tmp_path, images, labels, gz=gz)
    loaded_images, loaded_labels = data.load_mnist(tmp_path)
    np.testing.assert_array_equal(loaded_images, images)
    np.testing.assert_array_equal(loaded_labels, labels)
    assert loaded_labels.dtype == np.int64


def test_load_mnist_explains_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.*downloads nothing"):
        data.load_mnist(tmp_path)


def test_load_mnist_refuses_mismatched_counts_and_bad_labels(tmp_path):
    write_fake_mnist(tmp_path, np.zeros((4, 28, 28)), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="expected 4 labels"):
        data.load_mnist(tmp_path)
    write_fake_mnist(tmp_path, np.zeros((3, 28, 28)), np.array([0, 1, 12]))
    with pytest.raises(ValueError, match="labels are 0–9"):
        data.load_mnist(tmp_path)


def test_split_is_stratified_exact_disjoint_and_deterministic():
    labels = np.repeat(np.arange(4), [50, 30, 15, 5])
    train, evaluation = data.stratified_split(labels, 60, 20, seed=0)
    assert len(train) == 60 and len(evaluation) == 20
    assert not set(train) & set(evaluation)
    # Every class keeps its share (60% of each class in training, up to rounding).
    np.testing.assert_allclose(np.bincount(labels[train], minlength=4), [30, 18, 9, 3], atol=1)
    again = data.stratified_split(labels, 60, 20, seed=0)
    np.testing.assert_array_equal(train, again[0])
    np.testing.assert_array_equal(evaluation, again[1])
    assert not np.array_equal(train, data.stratified_split(labels, 60, 20, seed=1)[0])


@given(
    counts=st.lists(st.integers(1, 40), min_size=2, max_size=10),
    train_share=st.floats(0.1, 0.9),
    seed=st.integers(0, 2**16),
)
def test_split_sizes_and_shares_hold_for_any_class_counts(counts, train_share, seed):
    labels = np.repeat(np.arange(len(counts)), counts)
    n_train = max(1, min(len(labels) - 1, round(train_share * len(labels))))
    train, evaluation = data.stratified_split(labels, n_train, len(labels) - n_train, seed)
    assert len(train) == n_train and len(set(train) | set(evaluation)) == len(labels)
    expected = np.array(counts) * n_train / len(labels)
    assert np.all(np.abs(np.bincount(labels[train], minlength=len(counts)) - expected) < 1 + 1e-9)


def test_split_refuses_impossible_sizes():
    with pytest.raises(ValueError, match="cannot split 10 items"):
        data.stratified_split(np.zeros(10), 8, 5)


def test_make_split_standardises_with_training_statistics():
    rng = np.random.default_rng(0)
    split = data.make_split(
        rng.integers(0, 256, (40, 6, 6)), np.repeat(np.arange(4), 10), 30, 10, 0, "fake", "fake data"
    )
    assert split.x_train.shape == (30, 1, 6, 6) and split.x_eval.shape == (10, 1, 6, 6)
    assert abs(float(split.x_train.mean())) < 1e-5 and abs(float(split.x_train.std()) - 1) < 1e-5
    assert split.num_classes == 4 and split.input_shape == (1, 6, 6)


def test_missing_mnist_falls_back_to_digits_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match="falling back to scikit-learn's 8×8 digits"):
        split = data.benchmark_split(tmp_path)
    assert split.name == "sklearn-digits"
    assert split.x_train.shape[1:] == (1, 28, 28)
    assert len(split.y_train) + len(split.y_eval) == 1797


@needs_mnist
def test_the_shared_mnist_test_set_and_its_benchmark_split():
    files = data.mnist_files(MNIST_DIR)
    md5 = [hashlib.md5(path.read_bytes()).hexdigest() for path in files]
    assert md5 == ["9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"]
    images, labels = data.load_mnist(MNIST_DIR)
    assert images.shape == (10000, 28, 28)
    assert list(np.bincount(labels)) == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    split = data.mnist_split(MNIST_DIR)
    assert split.x_train.shape == (8000, 1, 28, 28) and split.x_eval.shape == (2000, 1, 28, 28)
    np.testing.assert_allclose(np.bincount(split.y_eval.numpy()), np.bincount(labels) / 5, atol=1)
