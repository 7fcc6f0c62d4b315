"""Read a real device's own training data from a local file or image folder.

A SuperNode on an edge device trains on data that never leaves it; its node config
names a path, and :func:`load_data_file` turns that path into an
:class:`~simulations.datasets.ArrayDataset`. Three layouts are accepted:

``data.npz``
    NumPy archive with an array ``x`` of shape ``(n, ...)`` (numeric) and an array ``y``
    of ``n`` non-negative integer labels.
``data.csv``
    Comma-separated text with a header row, a ``label`` column of non-negative
    integers and numeric feature columns (all other columns, in file order).
``root/`` (a folder)
    One sub-folder per class, ``root/<class_name>/*.png|jpg|jpeg``; classes are the
    sorted sub-folder names, so label ``i`` is the ``i``-th name. Images must share one
    size; they become one channel when all are grayscale and three (RGB) otherwise,
    scaled to [0, 1] and laid out ``(n, C, H, W)``.

Every problem is reported as one line that names the file and what is wrong with it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from simulations.datasets import ArrayDataset

if TYPE_CHECKING:
    from PIL import Image

T = TypeVar("T")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
LABEL_COLUMN = "label"
_GRAYSCALE_MODES = ("1", "L")


class DataFileError(ValueError):
    """A data file exists but cannot be used; the message names the file and the problem."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")


def load_data_file(path: str | Path, num_classes: int | None = None) -> ArrayDataset:
    """Load a device's labelled data from ``path`` (``.npz``, ``.csv`` or image folder).

    Parameters
    ----------
    path : str or Path
        The file or folder.
    num_classes : int, optional
        Number of classes of the whole federation. A device may lack some classes, so
        its labels alone can undercount; every device must build the same model, hence
        the federation-wide number should be passed when known. Default: the number of
        class folders for an image folder, otherwise ``max(label) + 1``.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    DataFileError
        The content is unusable (see the message).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir():
        x, y, folder_classes = _read_image_folder(path)
    elif path.suffix.lower() == ".npz":
        x, y = _read_npz(path)
        folder_classes = None
    elif path.suffix.lower() == ".csv":
        x, y = _read_csv(path)
        folder_classes = None
    else:
        raise DataFileError(
            path, f"unsupported format {path.suffix!r}; expected .npz, .csv or an image folder"
        )
    if len(y) == 0:
        raise DataFileError(path, "contains no examples")
    if not np.isfinite(x).all():
        raise DataFileError(path, "features contain NaN or infinite values")
    inferred = folder_classes if folder_classes is not None else int(y.max()) + 1
    if num_classes is None:
        num_classes = inferred
    elif int(y.max()) >= num_classes:
        raise DataFileError(
            path, f"label {int(y.max())} is out of range for num_classes={num_classes}"
        )
    return ArrayDataset(x=x, y=y, num_classes=num_classes)


def _labels(path: Path, values: np.ndarray, name: str) -> np.ndarray:
    """Check that ``values`` are non-negative whole numbers and return them as int64."""
    if values.ndim != 1:
        raise DataFileError(path, f"{name} must be one-dimensional, got shape {values.shape}")
    if values.dtype.kind not in "iuf" and values.size:
        raise DataFileError(path, f"{name} must be integer class labels, got dtype {values.dtype}")
    if values.size and values.dtype.kind == "f" and not np.all(np.mod(values, 1) == 0):
        raise DataFileError(path, f"{name} must be whole numbers, found fractional labels")
    if values.size and values.min() < 0:
        raise DataFileError(path, f"{name} must be >= 0, found {values.min()}")
    return values.astype(np.int64)


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DataFileError(path, f"not a readable .npz archive ({error})") from error
    with archive:
        missing = [key for key in ("x", "y") if key not in archive.files]
        if missing:
            raise DataFileError(
                path, f"missing array(s) {', '.join(missing)}; found {', '.join(archive.files) or 'none'}"
            )
        x, y = archive["x"], archive["y"]
    if x.ndim < 2:
        raise DataFileError(path, f"x must have shape (n, features...), got shape {x.shape}")
    if x.dtype.kind not in "iuf":
        raise DataFileError(path, f"x must be numeric, got dtype {x.dtype}")
    if len(x) != len(y):
        raise DataFileError(path, f"x has {len(x)} rows but y has {len(y)} labels")
    return x.astype(np.float32), _labels(path, y, "y")


def _read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import pandas as pd

    try:
        table = pd.read_csv(path)
    except pd.errors.EmptyDataError as error:
        raise DataFileError(path, "is empty (no header row)") from error
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise DataFileError(path, f"not valid CSV ({error})".replace("\n", " ")) from error
    if table.empty:
        raise DataFileError(path, "contains no examples")
    if LABEL_COLUMN not in table.columns:
        raise DataFileError(
            path, f"no {LABEL_COLUMN!r} column in header {', '.join(map(str, table.columns))}"
        )
    features = table.drop(columns=LABEL_COLUMN)
    if features.shape[1] == 0:
        raise DataFileError(path, f"has no feature columns besides {LABEL_COLUMN!r}")
    non_numeric = [str(c) for c in table.columns if not pd.api.types.is_numeric_dtype(table[c])]
    if non_numeric:
        raise DataFileError(path, f"non-numeric values in column(s) {', '.join(non_numeric)}")
    empty = [str(c) for c in table.columns if table[c].isna().any()]
    if empty:
        raise DataFileError(path, f"missing values in column(s) {', '.join(empty)}")
    return (features.to_numpy(dtype=np.float32),
            _labels(path, table[LABEL_COLUMN].to_numpy(), LABEL_COLUMN))


def _read_image_folder(root: Path) -> tuple[np.ndarray, np.ndarray, int]:
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
    if not classes:
        raise DataFileError(root, "image folder has no class sub-folders (expected root/<class>/*.png)")
    files: list[tuple[Path, int]] = [
        (image, label)
        for label, name in enumerate(classes)
        for image in sorted((root / name).iterdir())
        if image.suffix.lower() in IMAGE_SUFFIXES and image.is_file()
    ]
    if not files:
        raise DataFileError(
            root, f"no {'/'.join(IMAGE_SUFFIXES)} images in class folders {', '.join(classes)}"
        )
    # Headers first (cheap): a size mismatch is reported before anything is decoded.
    headers = [_read_image(image_path, lambda image: (image.size, image.mode))
               for image_path, _ in files]
    size = headers[0][0]
    for (image_size, _), (image_path, _) in zip(headers, files, strict=True):
        if image_size != size:
            raise DataFileError(
                image_path, f"image size {image_size} differs from {size} of {files[0][0]}"
            )
    mode = "L" if all(image_mode in _GRAYSCALE_MODES for _, image_mode in headers) else "RGB"
    pixels = np.stack([
        _read_image(image_path, lambda image: np.asarray(image.convert(mode), dtype=np.float32))
        for image_path, _ in files
    ])
    x = pixels[:, None] if mode == "L" else pixels.transpose(0, 3, 1, 2)
    y = np.array([label for _, label in files], dtype=np.int64)
    return np.ascontiguousarray(x / 255.0), y, len(classes)


def _read_image(path: Path, read: Callable[[Image.Image], T]) -> T:
    """Apply ``read`` to the opened image at ``path``; unreadable files raise DataFileError."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return read(image)
    except OSError as error:  # PIL's UnidentifiedImageError is an OSError
        raise DataFileError(path, f"not a readable image ({error})") from error
