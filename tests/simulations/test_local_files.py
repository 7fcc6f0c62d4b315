"""Tests for simulations.local_files: each accepted layout, and one clear error per defect."""

import numpy as np
import pytest
from PIL import Image

from simulations.local_files import DataFileError, load_data_file


def write_png(path, pixels, mode):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels, dtype=np.uint8), mode=mode).save(path)


def test_npz_round_trip(tmp_path):
    x = np.arange(24, dtype=np.float64).reshape(4, 2, 3)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([2, 0, 1, 2]))
    data = load_data_file(tmp_path / "d.npz")
    assert data.x.dtype == np.float32 and np.array_equal(data.x, x)
    assert data.y.dtype == np.int64 and list(data.y) == [2, 0, 1, 2]
    assert data.num_classes == 3 and data.input_shape == (2, 3)
    assert load_data_file(str(tmp_path / "d.npz"), num_classes=10).num_classes == 10


def test_csv_uses_label_column_and_other_columns_in_file_order(tmp_path):
    (tmp_path / "d.csv").write_text("f1,label,f2\n0.5,1,2\n-1,0,3e2\n")
    data = load_data_file(tmp_path / "d.csv")
    assert np.array_equal(data.x, np.array([[0.5, 2.0], [-1.0, 300.0]], dtype=np.float32))
    assert list(data.y) == [1, 0] and data.num_classes == 2


def test_image_folder_sorted_classes_grayscale_and_rgb(tmp_path):
    root = tmp_path / "imgs"
    write_png(root / "zebra" / "a.png", np.full((3, 2), 255), "L")
    write_png(root / "ant" / "b.png", [[0, 51], [102, 153], [204, 255]], "L")
    (root / "ant" / "notes.txt").write_text("ignored")
    (root / "empty_class").mkdir()
    gray = load_data_file(root)
    assert gray.x.shape == (2, 1, 3, 2) and gray.num_classes == 3
    assert list(gray.y) == [0, 2]  # ant, empty_class, zebra
    assert np.allclose(gray.x[0, 0], np.array([[0, 51], [102, 153], [204, 255]]) / 255)
    write_png(root / "ant" / "c.png", np.zeros((3, 2, 3)) + [255, 0, 0], "RGB")
    color = load_data_file(root)
    assert color.x.shape == (3, 3, 3, 2)
    assert np.allclose(color.x[1, :, 0, 0], [1.0, 0.0, 0.0])  # ant/c.png, channels first
    assert np.allclose(color.x[0, :, 0, 1], 0.2)  # a grayscale image repeated on R, G, B


def npz(tmp_path, **arrays):
    np.savez(tmp_path / "bad.npz", **arrays)
    return tmp_path / "bad.npz"


def csv(tmp_path, text):
    (tmp_path / "bad.csv").write_text(text)
    return tmp_path / "bad.csv"


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: npz(p, x=np.zeros((3, 2))), r"bad.npz: missing array\(s\) y; found x"),
    (lambda p: npz(p, x=np.zeros((3, 2)), y=np.zeros(4)), "x has 3 rows but y has 4 labels"),
    (lambda p: npz(p, x=np.array([["a", "b"]]), y=np.zeros(1)), "x must be numeric"),
    (lambda p: npz(p, x=np.zeros(3), y=np.zeros(3)), r"x must have shape \(n, features...\)"),
    (lambda p: npz(p, x=np.zeros((2, 2)), y=np.array([0.5, 1])), "fractional labels"),
    (lambda p: npz(p, x=np.zeros((2, 2)), y=np.array([-1, 1])), "must be >= 0, found -1"),
    (lambda p: npz(p, x=np.zeros((0, 2)), y=np.zeros(0)), "contains no examples"),
    (lambda p: npz(p, x=np.array([[np.nan, 1.0]]), y=np.zeros(1)), "NaN or infinite"),
    (lambda p: csv(p, "a,b\n1,2\n"), "bad.csv: no 'label' column in header a, b"),
    (lambda p: csv(p, "f,label\n1,0\nx,1\n"), r"non-numeric values in column\(s\) f"),
    (lambda p: csv(p, "f,label\n1,0\n,1\n"), r"missing values in column\(s\) f"),
    (lambda p: csv(p, ""), r"is empty \(no header row\)"),
    (lambda p: csv(p, "f,label\n"), "contains no examples"),
    (lambda p: csv(p, "label\n1\n"), "no feature columns besides 'label'"),
    (lambda p: (p / "d.txt").write_text("1") and p / "d.txt", "unsupported format '.txt'"),
    (lambda p: (p / "d.npz").write_bytes(b"junk") and p / "d.npz", "not a readable .npz"),
])
def test_malformed_files_raise_one_line_errors_naming_the_file(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(DataFileError, match=message) as error:
        load_data_file(path)
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)


def test_image_folder_defects(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    with pytest.raises(DataFileError, match="no class sub-folders"):
        load_data_file(root)
    (root / "cat").mkdir()
    with pytest.raises(DataFileError, match="no .png/.jpg/.jpeg images in class folders cat"):
        load_data_file(root)
    write_png(root / "cat" / "a.png", np.zeros((4, 4)), "L")
    write_png(root / "dog" / "b.png", np.zeros((5, 4)), "L")
    with pytest.raises(DataFileError, match=r"b.png: image size \(4, 5\) differs from \(4, 4\)"):
        load_data_file(root)
    (root / "dog" / "b.png").write_bytes(b"not a png")
    with pytest.raises(DataFileError, match="b.png: not a readable image"):
        load_data_file(root)


def test_missing_path_and_labels_beyond_num_classes(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz: no such file"):
        load_data_file(tmp_path / "nope.npz")
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 1)), y=np.array([0, 4]))
    with pytest.raises(DataFileError, match="label 4 is out of range for num_classes=3"):
        load_data_file(tmp_path / "d.npz", num_classes=3)
