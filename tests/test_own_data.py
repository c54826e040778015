"""The user's own data (`--dataset PATH`): the .npz and PNG-directory readers, their errors,
the content hash, and the image shape in tiles."""

import hashlib

import numpy as np
import pytest
from PIL import Image

from iwae import data
from iwae.errors import DataError, IwaeError


def save_png(path, array, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).convert(mode).save(path) if mode != Image.fromarray(array).mode else \
        Image.fromarray(array).save(path)  # fmt: skip


def png_dir(root, sizes=None, n=(3, 2), seed=0):
    """train/ and test/ of 8-bit grey PNGs (``sizes``: (H, W) per split); returns their pixels."""
    rng = np.random.default_rng(seed)
    pixels = {}
    for split, count in zip(("train", "test"), n):
        h, w = (sizes or {}).get(split, (4, 5))
        pixels[split] = rng.integers(0, 256, (count, h, w), dtype=np.uint8)
        for i, image in enumerate(pixels[split]):
            save_png(root / split / f"{i:03d}.png", image)
    return pixels


def expected_sha256(splits: dict, image_shape) -> str:
    """The documented hash, computed here without iwae.data."""
    h = hashlib.sha256(b"iwae dataset v1\n")
    for split in ("train", "validation", "test"):
        if split in splits:
            x = np.asarray(splits[split], dtype="<f4").reshape(len(splits[split]), -1)
            h.update(f"{split} {x.shape[0]} {list(image_shape)}\n".encode() + x.tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- .npz


def test_npz_of_grey_images(tmp_path):
    x = np.arange(2 * 3 * 4, dtype=np.float64).reshape(2, 3, 4) / 23
    t = np.array([[[0.5] * 4] * 3])
    np.savez(tmp_path / "d.npz", train=x, test=t, labels=np.zeros(2))  # other arrays are ignored
    ds = data.load_dataset(str(tmp_path / "d.npz"))
    assert ds.image_shape == (3, 4) and ds.x_dim == 12 and not ds.binary and ds.validation is None
    assert ds.train.dtype == np.float32 and ds.train.shape == (2, 12) and ds.test.shape == (1, 12)
    assert np.array_equal(ds.train, x.reshape(2, 12).astype(np.float32)) and np.all(ds.test == 0.5)
    assert not ds.train.flags.writeable
    assert ds.path == ds.name == str((tmp_path / "d.npz").resolve())
    assert ds.sha256 == expected_sha256({"train": x, "test": t}, (3, 4))


def test_npz_flat_binary_with_validation(tmp_path):
    rng = np.random.default_rng(0)
    splits = {s: rng.random((n, 10)) < 0.5 for s, n in (("train", 5), ("validation", 2), ("test", 3))}
    np.savez(tmp_path / "d.npz", **splits)
    ds = data.load_files(tmp_path / "d.npz")
    assert ds.image_shape == (10,) and ds.binary
    for s in splits:
        assert np.array_equal(getattr(ds, s), splits[s].astype(np.float32))
    assert ds.sha256 == expected_sha256(splits, (10,))
    with pytest.raises(IwaeError, match="--validation"):
        data.load_dataset(str(tmp_path / "d.npz"), validation=True)


def test_binary_means_the_training_images(tmp_path):
    np.savez(tmp_path / "d.npz", train=np.array([[0.0, 1.0]]), test=np.array([[0.5, 1.0]]))
    assert data.load_files(tmp_path / "d.npz").binary  # grey test images are binarized once, as always
    np.savez(tmp_path / "e.npz", train=np.array([[0.0, 0.999]]), test=np.array([[0.0, 1.0]]))
    assert not data.load_files(tmp_path / "e.npz").binary


def test_hash_is_of_the_content_not_the_file(tmp_path):
    rng = np.random.default_rng(1)
    train, test = rng.random((4, 3, 3)).astype(np.float32), rng.random((2, 3, 3)).astype(np.float32)
    np.savez(tmp_path / "a.npz", train=train, test=test)
    np.savez_compressed(tmp_path / "b.npz", test=test.astype(np.float64), train=train.astype(np.float64))
    a, b = (data.load_files(tmp_path / n).sha256 for n in ("a.npz", "b.npz"))
    assert a == b
    train[0, 0, 0] = np.nextafter(train[0, 0, 0], np.float32(2))  # one pixel, one ulp
    np.savez(tmp_path / "c.npz", train=train, test=test)
    np.savez(tmp_path / "d.npz", train=train.reshape(4, 9), test=test.reshape(2, 9))  # same values, other shape
    c, d = (data.load_files(tmp_path / n).sha256 for n in ("c.npz", "d.npz"))
    assert len({a, c, d}) == 3


GOOD = np.full((2, 3, 3), 0.5)


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"train": GOOD}, "missing split 'test'"),
        ({"test": GOOD, "validation": GOOD}, "missing split 'train'"),
        ({"train": GOOD, "test": np.zeros((0, 3, 3))}, "empty split: 'test'"),
        ({"train": GOOD, "test": np.full((2, 3, 4), 0.5)}, "different sizes"),
        ({"train": GOOD, "test": np.full((2, 9), 0.5)}, "different sizes"),
        ({"train": GOOD, "test": GOOD, "validation": np.full((1, 4, 3), 0.5)}, "different sizes"),
        ({"train": GOOD * 3, "test": GOOD}, r"'train' has values outside \[0, 1\] \(values from 1.5 to 1.5\)"),
        ({"train": GOOD, "test": GOOD - 0.6}, r"'test' has values outside \[0, 1\]"),
        ({"train": np.full((2, 3, 3), 255, np.uint8), "test": GOOD}, "divide by 255"),
        ({"train": np.where(GOOD > 0, np.nan, 0), "test": GOOD}, "NaN or infinite"),
        ({"train": GOOD.astype(complex), "test": GOOD}, "dtype complex128"),
        ({"train": np.full((2, 3), "a"), "test": GOOD}, "dtype <U1"),
        ({"train": np.full(3, 0.5), "test": GOOD}, r"shape \[3\], expected \[N, H, W\] or \[N, D\]"),
        ({"train": np.full((2, 1, 3, 3), 0.5), "test": GOOD}, r"shape \[2, 1, 3, 3\]"),
        ({"train": np.zeros((2, 0)), "test": GOOD}, "images of size 0"),
    ],
)
def test_bad_npz_names_the_file_and_the_problem(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message) as e:
        data.load_dataset(str(path))
    assert str(path) in str(e.value)


def test_unreadable_or_missing_files(tmp_path):
    (tmp_path / "text.npz").write_text("not a zip")
    np.save(tmp_path / "array.npy", GOOD)
    (tmp_path / "array.npz").write_bytes((tmp_path / "array.npy").read_bytes())  # an .npy named .npz
    np.savez(tmp_path / "pickled.npz", train=np.array([{}], dtype=object), test=GOOD)
    for name in ("text.npz", "array.npz", "pickled.npz"):
        with pytest.raises(DataError, match="cannot read npz file") as e:
            data.load_files(tmp_path / name)
        assert str(tmp_path / name) in str(e.value)
    with pytest.raises(DataError, match="expected an .npz file or a directory"):
        data.load_files(tmp_path / "array.npy")
    with pytest.raises(IwaeError, match="neither a built-in dataset"):
        data.load_dataset(str(tmp_path / "nothing.npz"))


# --------------------------------------------------------------------------- PNG directories


def test_png_directory_grey_in_name_order(tmp_path):
    pixels = png_dir(tmp_path)
    (tmp_path / "train" / "notes.txt").write_text("ignored")
    ds = data.load_dataset(str(tmp_path))
    assert ds.image_shape == (4, 5) and ds.train.shape == (3, 20) and ds.test.shape == (2, 20)
    assert np.array_equal(ds.train, pixels["train"].reshape(3, 20).astype(np.float32) / np.float32(255))
    assert np.array_equal(ds.test, pixels["test"].reshape(2, 20) / np.float32(255))
    assert ds.sha256 == expected_sha256({s: pixels[s] / np.float32(255) for s in pixels}, (4, 5))
    assert not ds.binary and ds.path == str(tmp_path.resolve())


def test_png_modes_are_converted_to_grey(tmp_path):
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)  # luminance of red: 299/1000 * 255 = 76.245 -> 76
    save_png(tmp_path / "train" / "a.png", rgb, "RGB")
    save_png(tmp_path / "train" / "b.png", np.array([[0, 255, 0], [255, 0, 0]], np.uint8), "1")
    Image.fromarray(np.array([[0, 65535, 32768], [1, 2, 3]], np.uint16)).save(tmp_path / "test" / "c.png") \
        if (tmp_path / "test").mkdir() is None else None  # fmt: skip
    ds = data.load_files(tmp_path)
    assert ds.train[0, 0] == np.float32(76) / np.float32(255) and ds.train[0, 1:].max() == 0
    assert ds.train[1].tolist() == [0, 1, 0, 1, 0, 0]
    assert ds.test[0, :3].tolist() == [0.0, 1.0, np.float32(32768 / 65535)]


def test_binary_pngs_are_binary(tmp_path):
    for split in ("train", "test"):
        save_png(tmp_path / split / "a.png", np.array([[0, 255], [255, 255]], np.uint8))
    ds = data.load_files(tmp_path)
    assert ds.binary and ds.train.tolist() == [[0.0, 1.0, 1.0, 1.0]]


@pytest.mark.parametrize(
    "setup, where, message",
    [
        (lambda root: png_dir(root, sizes={"test": (5, 4)}), "", "different sizes"),
        (lambda root: (png_dir(root), save_png(root / "train" / "zz.png", np.zeros((4, 6), np.uint8))),
         "train/zz.png", "image of size 6x4, but 000.png is 5x4"),
        (lambda root: (root / "train").mkdir(), "", "missing split test/"),
        (lambda root: (png_dir(root), [p.unlink() for p in (root / "test").iterdir()]), "test", "empty split"),
        (lambda root: (png_dir(root), (root / "test" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")),
         "test/001.png", "cannot read PNG image"),
        (lambda root: (png_dir(root), Image.new("L", (5, 4)).save(root / "test" / "j.png", format="JPEG")),
         "test/j.png", "not a PNG image"),
    ],
)
def test_bad_png_directories(tmp_path, setup, where, message):
    setup(tmp_path)
    with pytest.raises(DataError, match=message) as e:
        data.load_files(tmp_path)
    assert str(tmp_path / where).rstrip("/") in str(e.value)


# --------------------------------------------------------------------------- shapes in pictures


def test_tiles_take_the_image_shape():
    images = np.arange(3 * 6, dtype=np.float32).reshape(3, 6) / 17
    grid = data.tile_images(images, shape=(2, 3), cols=2)  # 2 rows of 2 tiles of 2x3, 1 pixel borders
    assert grid.shape == (2 * 3 + 1, 2 * 4 + 1)
    assert np.array_equal(grid[1:3, 5:8], images[1].reshape(2, 3)) and np.all(grid[4:6, 5:8] == 1)
    assert data.display_shape((16,)) == (4, 4) and data.display_shape((10,)) == (1, 10)
    assert data.display_shape((20, 30)) == (20, 30)
    assert np.array_equal(data.tile_images(images[:1], shape=(6,)), np.pad(images[:1], 1, constant_values=1))
    assert np.array_equal(data.tile_images(np.zeros((4, 784))), data.tile_images(np.zeros((4, 784)), shape=(28, 28)))


def test_png_order_is_the_order_of_the_names(tmp_path):
    """Whatever order the file system lists them in (created here in a shuffled order)."""
    names = ["c.png", "a10.png", "e.png", "a2.png", "b.png", "d.png"]
    for value, name in enumerate(names):
        save_png(tmp_path / "train" / name, np.full((2, 2), value * 40, np.uint8))
    save_png(tmp_path / "test" / "x.png", np.zeros((2, 2), np.uint8))
    ds = data.load_files(tmp_path)
    by_name = [names.index(n) * 40 / np.float32(255) for n in sorted(names)]  # a10 before a2: plain string order
    assert np.array_equal(ds.train[:, 0], np.array(by_name, dtype=np.float32))
