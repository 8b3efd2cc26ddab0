"""Datasets of the trainer: scikit-learn's digits (embedded, offline), CIFAR-10 from the standard
python batches, and a synthetic set. Held as tensors; batches drawn with an explicit generator."""
from __future__ import annotations

import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

DATASETS = ("digits", "cifar10", "synthetic")
CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@dataclass
class Dataset:
    """Normalised images (N, C, H, W) float32 and int64 labels, split in train and test."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    augment: bool = False  # random crop (padding 4) and horizontal flip on training batches

    def __post_init__(self):
        for split, x, y in (("train", self.train_x, self.train_y),
                            ("test", self.test_x, self.test_y)):
            if x.dim() != 4 or not x.is_floating_point() or len(x) != len(y):
                raise ValueError(f"{split} images must be a floating (N, C, H, W) tensor with "
                                 f"one label each, got {x.dtype} {tuple(x.shape)} and "
                                 f"{len(y)} labels")
            if y.dtype != torch.int64 or (len(y) and not 0 <= int(y.min()) <= int(y.max())
                                          < self.num_classes):
                raise ValueError(f"{split} labels must be int64 classes in [0, "
                                 f"{self.num_classes}), got {y.dtype} in "
                                 f"[{int(y.min()) if len(y) else '-'}, "
                                 f"{int(y.max()) if len(y) else '-'}]")

    @property
    def in_channels(self) -> int:
        """Channels of an input image."""
        return self.train_x.shape[1]


def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    mean = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


def _digits(seed: int) -> Dataset:
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_test = len(y) // 5
    mean, std = float(x[n_test:].mean()), float(x[n_test:].std())
    x = _normalise(x, (mean,), (std,))
    return Dataset(x[n_test:], y[n_test:], x[:n_test], y[:n_test], 10)


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
        raw, labels = entry[b"data"], np.asarray(entry[b"labels"])
    except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError) as e:
        raise ValueError(f"{path} is not a CIFAR-10 python batch (a pickled dict with b'data' "
                         f"of N×3072 bytes and b'labels'): {e}") from e
    raw = np.asarray(raw)
    if raw.ndim != 2 or raw.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: b'data' must hold one row of 3×32×32 = 3072 pixel values per "
                         f"image, got shape {raw.shape}")
    if raw.size and (not np.issubdtype(raw.dtype, np.integer) or raw.min() < 0
                     or raw.max() > 255):
        raise ValueError(f"{path}: pixel values must be integers in [0, 255], got "
                         f"{raw.dtype} values in [{raw.min()}, {raw.max()}]")
    if labels.ndim != 1 or len(raw) != len(labels):
        raise ValueError(f"{path}: {len(raw)} images but labels of shape {labels.shape}")
    return raw.astype(np.uint8).reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _cifar10(data_dir: Optional[str]) -> Dataset:
    if data_dir is None:
        raise ValueError("cifar10 needs --data-dir: a folder holding cifar-10-batches-py/")
    root = Path(data_dir)
    folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    missing = [f for f in CIFAR_FILES if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 not found in {folder}: expected the python batches "
                                f"{', '.join(CIFAR_FILES)}; missing {', '.join(missing)}")
    parts = [_cifar_batch(folder / f) for f in CIFAR_FILES]
    to_x = lambda a: _normalise(torch.from_numpy(a).float() / 255.0, CIFAR_MEAN, CIFAR_STD)
    train_x = to_x(np.concatenate([p[0] for p in parts[:5]]))
    train_y = torch.from_numpy(np.concatenate([p[1] for p in parts[:5]]))
    return Dataset(train_x, train_y, to_x(parts[5][0]), torch.from_numpy(parts[5][1]), 10,
                   augment=True)


def _synthetic(seed: int, n: int = 1024, classes: int = 10, size: int = 16) -> Dataset:
    """Class templates plus noise: learnable, and the same for every seed's split."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(classes, 3, size, size, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x = templates[y] + 1.5 * torch.randn(n, 3, size, size, generator=g)
    cut = n * 4 // 5
    return Dataset(x[:cut], y[:cut], x[cut:], y[cut:], classes)


def load_dataset(name: str, data_dir: Optional[str] = None, seed: int = 0) -> Dataset:
    """``digits`` (offline, scikit-learn's 8×8 digits), ``cifar10`` (from ``data_dir``) or
    ``synthetic``."""
    if name == "digits":
        return _digits(seed)
    if name == "cifar10":
        return _cifar10(data_dir)
    if name == "synthetic":
        return _synthetic(seed)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random crop with padding 4 and random horizontal flip, per sample."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=g)
    dx = torch.randint(0, 9, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, x.shape[1], h, w + 8)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, x.shape[1], h, w)
    out = out.gather(3, cols)
    flip = torch.rand(n, generator=g) < 0.5
    out[flip] = out[flip].flip(3)
    return out


def batches_per_epoch(ds: Dataset, batch_size: int, world: int = 1) -> int:
    """The full batches each of ``world`` processes takes per epoch; a batch larger than a
    process's share of the training set is refused (it would be a batch of fewer samples)."""
    per_rank = len(ds.train_y) // world
    if batch_size > per_rank:
        share = f" ({per_rank} for each of {world} processes)" if world > 1 else ""
        raise ValueError(f"batch size {batch_size} is larger than the training set of "
                         f"{len(ds.train_y)} samples{share}")
    return per_rank // batch_size


def train_batches(ds: Dataset, batch_size: int, generator: torch.Generator, rank: int = 0,
                  world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled training batches of this rank's shard (every rank draws the same permutation and
    takes every world-th sample; the tail that would leave ranks uneven is dropped)."""
    full_batches = batches_per_epoch(ds, batch_size, world)  # a last partial batch is dropped
    perm = torch.randperm(len(ds.train_y), generator=generator)
    per_rank = len(perm) // world
    mine = perm[rank::world][:per_rank]
    for i in range(full_batches):
        idx = mine[i * batch_size:(i + 1) * batch_size]
        x = ds.train_x[idx]
        yield (_augment(x, generator) if ds.augment else x), ds.train_y[idx]


def test_batches(ds: Dataset, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The test set in order."""
    for i in range(0, len(ds.test_y), batch_size):
        yield ds.test_x[i:i + batch_size], ds.test_y[i:i + batch_size]
