"""Tests for iwae.data: loaders, validation of corrupted files, download, caching."""

import csv
import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from iwae import data
from iwae.data import mnist, omniglot, store
from iwae.errors import DataError, IwaeError

MNIST_NAMES = list(data.MNIST_MD5)
OMNIGLOT_SOURCES = ["images_background.npz", "images_evaluation.npz", "characters.csv"]
CACHE_NAME = f"omniglot28_split{data.OMNIGLOT_SPLIT_SEED}.npz"


@pytest.fixture(autouse=True)
def _isolate(tmp_path, monkeypatch):
    """No network, no $IWAE_DATA, and a private user cache directory for every test."""
    monkeypatch.delenv("IWAE_DATA", raising=False)
    monkeypatch.setattr(
        store.platformdirs, "user_cache_dir", lambda *a, **k: str(tmp_path / "usercache")
    )
    monkeypatch.setattr(mnist, "MNIST_MIRRORS", [(tmp_path / "no-such-mirror").as_uri() + "/"])
    data._load_dataset_cached.cache_clear()
    yield
    data._load_dataset_cached.cache_clear()


def _stray_files(*dirs: Path) -> list[Path]:
    """Cache or temp files left in ``dirs``."""
    found = []
    for d in dirs:
        if d.is_dir():
            found += [
                p
                for p in d.rglob("*")
                if p.name.startswith(("omniglot28", ".")) or p.suffix == ".tmp"
            ]
    return found


# --------------------------------------------------------------------------- MNIST helpers


def _mnist_dir(root: Path, shared: Path, skip=(), uncompressed=()) -> Path:
    """``root/mnist`` with links to the real .gz files, minus ``skip``; ``uncompressed``
    gunzipped."""
    d = root / "mnist"
    d.mkdir(parents=True)
    for name in MNIST_NAMES:
        src = shared / "mnist" / f"{name}.gz"
        if name in skip:
            continue
        if name in uncompressed:
            (d / name).write_bytes(gzip.decompress(src.read_bytes()))
        else:
            (d / f"{name}.gz").symlink_to(src)
    return d


def _labels_bytes(shared: Path) -> bytes:
    return gzip.decompress((shared / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes())


@pytest.fixture(scope="module")
def real_mnist(shared_data_dir):
    return data.load_mnist(shared_data_dir, download=False)


# --------------------------------------------------------------------------- MNIST: real data


def test_mnist_real_shapes_and_range(real_mnist):
    assert set(real_mnist) == {"train", "test"}
    assert real_mnist["train"].shape == (60000, 784)
    assert real_mnist["test"].shape == (10000, 784)
    for x in real_mnist.values():
        assert x.dtype == np.float32
        assert x.min() == 0.0 and x.max() == 1.0
        assert 0.1 < x.mean() < 0.2


def test_mnist_validation_split(shared_data_dir, real_mnist):
    split = data.load_mnist(shared_data_dir, download=False, validation=True)
    assert split["train"].shape == (59600, 784)
    assert split["validation"].shape == (400, 784)
    np.testing.assert_array_equal(split["validation"], real_mnist["train"][-400:])
    np.testing.assert_array_equal(split["train"], real_mnist["train"][:-400])


def test_mnist_uncompressed_files_accepted(tmp_path, shared_data_dir, real_mnist):
    names = ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    d = _mnist_dir(tmp_path, shared_data_dir, uncompressed=names)
    assert (d / names[0]).is_file() and not (d / f"{names[0]}.gz").exists()
    loaded = data.load_mnist(tmp_path, download=False)
    np.testing.assert_array_equal(loaded["test"], real_mnist["test"])


def test_read_idx_labels(shared_data_dir):
    labels = data.read_idx(shared_data_dir / "mnist" / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10000,) and labels.dtype == np.uint8
    assert set(np.unique(labels)) == set(range(10))


# --------------------------------------------------------------------------- MNIST: bad files


def _flip(b: bytes, i: int) -> bytes:
    return b[:i] + bytes([b[i] ^ 0xFF]) + b[i + 1 :]


CORRUPTIONS = {
    "truncated": (lambda b: b[:-10], "truncated"),
    "trailing bytes": (lambda b: b + b"\0\0", "trailing bytes"),
    "wrong magic": (lambda b: b[:3] + b"\x03" + b[4:], "magic"),
    "wrong dtype byte": (lambda b: b[:2] + b"\x0d" + b[3:], "magic"),
    "wrong dims": (lambda b: b[:4] + (9999).to_bytes(4, "big") + b[8:], "trailing bytes"),
    "short header": (lambda b: b[:6], "header"),
    "checksum": (lambda b: _flip(b, 5000), "MD5"),
    "consistent but wrong count": (
        lambda b: b[:4] + (100).to_bytes(4, "big") + b[8:108],
        "dimensions",
    ),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_mnist_corrupted_idx_raises_naming_file(tmp_path, shared_data_dir, kind):
    corrupt, expected = CORRUPTIONS[kind]
    d = _mnist_dir(tmp_path, shared_data_dir, skip=["t10k-labels-idx1-ubyte"])
    bad = d / "t10k-labels-idx1-ubyte"
    bad.write_bytes(corrupt(_labels_bytes(shared_data_dir)))
    with pytest.raises(DataError, match=expected) as err:
        data.load_mnist(tmp_path, download=False)
    assert str(bad) in str(err.value)
    assert "\n" not in str(err.value)


def test_read_idx_checks_expected_ndim(shared_data_dir):
    path = shared_data_dir / "mnist" / "t10k-labels-idx1-ubyte.gz"
    with pytest.raises(DataError, match="0x00000801, expected 0x00000803") as err:
        data.read_idx(path, ndim=3)
    assert str(path) in str(err.value)


def test_read_idx_rejects_non_idx(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello, this is not an IDX file")
    with pytest.raises(DataError, match="magic") as err:
        data.read_idx(bad)
    assert str(bad) in str(err.value)


@pytest.mark.parametrize(
    "corrupt",
    [lambda b: b[: len(b) // 2], lambda b: _flip(b, len(b) // 2), lambda b: b"\x1f\x8bgarbage"],
    ids=["truncated gz", "flipped byte in gz", "bad gz header"],
)
def test_mnist_broken_gzip_raises_naming_file(tmp_path, shared_data_dir, corrupt):
    d = _mnist_dir(tmp_path, shared_data_dir, skip=["t10k-labels-idx1-ubyte"])
    bad = d / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(corrupt((shared_data_dir / "mnist" / bad.name).read_bytes()))
    with pytest.raises(DataError, match="gzip") as err:
        data.load_mnist(tmp_path, download=False)
    assert str(bad) in str(err.value)


# ------------------------------------------------------------------------ MNIST: missing / download


def test_mnist_missing_without_download_lists_files(tmp_path):
    with pytest.raises(DataError) as err:
        data.load_mnist(tmp_path, download=False)
    msg = str(err.value)
    assert f"MNIST not found in {tmp_path / 'mnist'}" in msg
    assert all(f"{name}.gz" in msg for name in MNIST_NAMES)
    assert "IWAE_DATA" in msg and "--data-dir" in msg


def test_mnist_missing_offline_names_only_missing_files(tmp_path, shared_data_dir):
    _mnist_dir(tmp_path, shared_data_dir, skip=["t10k-images-idx3-ubyte"])
    with pytest.raises(DataError, match="download failed") as err:
        data.load_mnist(tmp_path)  # default mirrors: an unreachable file:// URL (see _isolate)
    msg = str(err.value)
    assert "t10k-images-idx3-ubyte.gz" in msg and "train-images" not in msg
    assert "\n" not in msg


def _mirror(root: Path, shared: Path, names, corrupt=None) -> str:
    root.mkdir()
    for name in names:
        payload = (shared / "mnist" / f"{name}.gz").read_bytes()
        if corrupt and name in corrupt:
            payload = corrupt[name](payload)
        (root / f"{name}.gz").write_bytes(payload)
    return root.as_uri() + "/"


TEST_FILES = ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def test_mnist_download_from_file_mirror(tmp_path, shared_data_dir, real_mnist):
    d = _mnist_dir(tmp_path / "data", shared_data_dir, skip=TEST_FILES)
    mirror = _mirror(tmp_path / "mirror", shared_data_dir, TEST_FILES)
    loaded = data.load_mnist(tmp_path / "data", mirrors=[mirror])
    np.testing.assert_array_equal(loaded["test"], real_mnist["test"])
    for name in TEST_FILES:
        assert (d / f"{name}.gz").read_bytes() == (
            shared_data_dir / "mnist" / f"{name}.gz"
        ).read_bytes()
    assert not _stray_files(d)


def _regzip_flipped(payload: bytes) -> bytes:
    return gzip.compress(_flip(gzip.decompress(payload), 5000))


@pytest.mark.parametrize(
    "corrupt, expected",
    [(_regzip_flipped, "MD5"), (lambda b: b[: len(b) // 2], "broken gzip")],
    ids=["checksum", "broken gzip"],
)
def test_mnist_download_corrupted_mirror_places_nothing(
    tmp_path, shared_data_dir, corrupt, expected
):
    d = _mnist_dir(tmp_path / "data", shared_data_dir, skip=TEST_FILES)
    mirror = _mirror(
        tmp_path / "mirror", shared_data_dir, TEST_FILES, {"t10k-labels-idx1-ubyte": corrupt}
    )
    with pytest.raises(DataError, match=expected) as err:
        data.load_mnist(tmp_path / "data", mirrors=[mirror])
    assert "t10k-labels-idx1-ubyte.gz" in str(err.value) and str(d) in str(err.value)
    assert not list(d.glob("t10k-labels*"))
    assert (d / "t10k-images-idx3-ubyte.gz").is_file()  # the good file was verified and kept
    assert not _stray_files(d)


def test_mnist_download_falls_back_to_next_mirror(tmp_path, shared_data_dir, real_mnist):
    _mnist_dir(tmp_path / "data", shared_data_dir, skip=TEST_FILES)
    corrupt = {
        "t10k-images-idx3-ubyte": lambda b: b[:1000],
        "t10k-labels-idx1-ubyte": _regzip_flipped,
    }
    bad = _mirror(tmp_path / "bad", shared_data_dir, TEST_FILES, corrupt)
    good = _mirror(tmp_path / "good", shared_data_dir, TEST_FILES)
    loaded = data.load_mnist(tmp_path / "data", mirrors=[bad, good])
    np.testing.assert_array_equal(loaded["test"], real_mnist["test"])


def test_resolve_data_dir(tmp_path, monkeypatch):
    assert data.resolve_data_dir(tmp_path / "x") == tmp_path / "x"
    assert data.resolve_data_dir() == tmp_path / "usercache" / "data"
    monkeypatch.setenv("IWAE_DATA", str(tmp_path / "env"))
    assert data.resolve_data_dir() == tmp_path / "env"
    assert data.resolve_data_dir(str(tmp_path / "arg")) == tmp_path / "arg"


# --------------------------------------------------------------------------- OMNIGLOT: real data


def _omniglot_copy(root: Path, shared: Path) -> Path:
    d = root / "omniglot"
    d.mkdir(parents=True)
    for name in OMNIGLOT_SOURCES:
        shutil.copy(shared / "omniglot" / name, d / name)
    return d


@pytest.fixture(scope="module")
def omniglot_built(tmp_path_factory, shared_data_dir):
    """One build from the raw images, in a private copy (the cache is written there)."""
    root = tmp_path_factory.mktemp("omniglot_data")
    _omniglot_copy(root, shared_data_dir)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(store.platformdirs, "user_cache_dir", lambda *a, **k: str(root / "usercache"))
        arrays = data.load_omniglot(root)
    return root, arrays


def test_omniglot_shapes_and_range(omniglot_built):
    _, arrays = omniglot_built
    assert set(arrays) == {"train", "test"}
    assert arrays["train"].shape == (24345, 784)
    assert arrays["test"].shape == (8070, 784)
    for x in arrays.values():
        assert x.dtype == np.float32
        assert x.min() == 0.0 and x.max() == 1.0


def test_omniglot_grey_values_and_ink(omniglot_built):
    _, arrays = omniglot_built
    for x in arrays.values():
        assert ((x > 0) & (x < 1)).mean() > 0.01  # anti-aliased, not binary
        assert len(np.unique(x)) > 20
        assert 0.04 < x.mean() < 0.15  # about 8% of the raw pixels are ink
        assert (x.max(axis=1) > 0).all()  # every image has some ink
        assert (x.max(axis=1) > 0.5).mean() > 0.99
        # characters are drawn in the middle: the border carries less ink than the centre
        images = x.reshape(-1, 28, 28)
        assert images[:, :2].mean() < images[:, 10:18, 10:18].mean()


def test_omniglot_cache_is_used(omniglot_built, monkeypatch):
    root, arrays = omniglot_built
    assert (root / "omniglot" / CACHE_NAME).is_file()
    assert not (root / "usercache").exists()

    def no_build(*args):
        raise AssertionError("rebuilt although the cache is valid")

    monkeypatch.setattr(omniglot, "_build_omniglot_from_raw", no_build)
    cached = data.load_omniglot(root)
    for split in arrays:
        np.testing.assert_array_equal(cached[split], arrays[split])


def test_omniglot_corrupt_cache_is_rebuilt_deterministically(tmp_path, omniglot_built, monkeypatch):
    root, arrays = omniglot_built
    shutil.copytree(root / "omniglot", tmp_path / "omniglot")
    cache = tmp_path / "omniglot" / CACHE_NAME
    cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    calls = []
    real_build = omniglot._build_omniglot_from_raw
    monkeypatch.setattr(
        omniglot, "_build_omniglot_from_raw", lambda *a: calls.append(a) or real_build(*a)
    )

    rebuilt = data.load_omniglot(tmp_path)
    assert len(calls) == 1
    for split in arrays:  # a second build from scratch gives the same arrays
        np.testing.assert_array_equal(rebuilt[split], arrays[split])
    again = data.load_omniglot(tmp_path)  # and the rewritten cache is valid
    assert len(calls) == 1
    np.testing.assert_array_equal(again["test"], arrays["test"])


def _fake_split():
    return {
        "train": np.full((24345, 784), 0.25, np.float32),
        "test": np.full((8070, 784), 0.75, np.float32),
    }


@pytest.fixture
def fake_build(monkeypatch):
    calls = []
    monkeypatch.setattr(
        omniglot, "_build_omniglot_from_raw", lambda *a: calls.append(a) or _fake_split()
    )
    return calls


@pytest.mark.parametrize(
    "bad_cache",
    [
        lambda p: np.savez(p, fingerprint=np.array("stale"), **_fake_split()),
        lambda p: np.savez(p, train=np.zeros((3, 784), np.float32)),
        lambda p: p.write_bytes(b"not a zip file"),
    ],
    ids=["stale fingerprint", "wrong contents", "garbage"],
)
def test_omniglot_bad_cache_is_not_trusted(tmp_path, shared_data_dir, fake_build, bad_cache):
    d = _omniglot_copy(tmp_path, shared_data_dir)
    bad_cache(d / CACHE_NAME)
    out = data.load_omniglot(tmp_path)
    assert len(fake_build) == 1
    assert out["train"][0, 0] == 0.25
    with np.load(d / CACHE_NAME) as npz:
        assert str(npz["fingerprint"]) != "stale"
        assert npz["test"].shape == (8070, 784)


def test_omniglot_cache_falls_back_to_user_cache_dir(
    tmp_path, shared_data_dir, fake_build, monkeypatch
):
    d = _omniglot_copy(tmp_path / "data", shared_data_dir)
    d.chmod(0o555)
    try:
        data.load_omniglot(tmp_path / "data")
        assert not (d / CACHE_NAME).exists()
        assert (tmp_path / "usercache" / CACHE_NAME).is_file()
        assert len(fake_build) == 1
        data.load_omniglot(tmp_path / "data")
        assert len(fake_build) == 1  # read back from the user cache
    finally:
        d.chmod(0o755)


# --------------------------------------------------------------------------- OMNIGLOT: bad files


def _small_npz(path: Path, **arrays) -> None:
    np.savez_compressed(path, **arrays)


BAD_NPZ = {
    "wrong shape": (
        lambda p, real: _small_npz(p, images=np.ones((3, 20, 105, 105), bool)),
        "expected bool",
    ),
    "wrong dtype": (
        lambda p, real: _small_npz(p, images=np.ones((2, 20, 105, 105), np.uint8)),
        "expected bool",
    ),
    "wrong key": (
        lambda p, real: _small_npz(p, imgs=np.ones((2, 20, 105, 105), bool)),
        "no 'images'",
    ),
    "truncated": (lambda p, real: p.write_bytes(real[: len(real) // 2]), "cannot read npz"),
    "flipped bytes": (
        lambda p, real: p.write_bytes(_flip(_flip(real, len(real) // 2), 99)),
        "cannot read npz",
    ),
    "not a zip": (lambda p, real: p.write_bytes(b"hello"), "cannot read npz"),
}


@pytest.mark.parametrize("kind", list(BAD_NPZ))
def test_omniglot_bad_npz_raises_and_writes_no_cache(tmp_path, shared_data_dir, kind):
    write_bad, expected = BAD_NPZ[kind]
    d = _omniglot_copy(tmp_path / "data", shared_data_dir)
    bad = d / "images_evaluation.npz"
    write_bad(bad, bad.read_bytes())
    with pytest.raises(DataError, match=expected) as err:
        data.load_omniglot(tmp_path / "data")
    assert str(bad) in str(err.value)
    assert "\n" not in str(err.value)
    assert not _stray_files(d, tmp_path / "usercache")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("char_id,set,alphabet\n1,background,Arcadian\n", "char_id 1..1623"),
        ("id,alphabet\n1,Arcadian\n", "columns"),
    ],
)
def test_omniglot_bad_characters_csv(tmp_path, shared_data_dir, text, expected):
    d = _omniglot_copy(tmp_path, shared_data_dir)
    (d / "characters.csv").write_text(text)
    with pytest.raises(DataError, match=expected) as err:
        data.load_omniglot(tmp_path)
    assert str(d / "characters.csv") in str(err.value)
    assert not _stray_files(d, tmp_path / "usercache")


def test_omniglot_missing_files(tmp_path):
    (tmp_path / "omniglot").mkdir()
    (tmp_path / "omniglot" / "characters.csv").write_text("char_id\n")
    with pytest.raises(DataError) as err:
        data.load_omniglot(tmp_path)
    msg = str(err.value)
    assert f"OMNIGLOT not found in {tmp_path / 'omniglot'}" in msg
    assert "chardata.mat" in msg and "missing: images_background.npz, images_evaluation.npz" in msg


# --------------------------------------------------------------------------- OMNIGLOT: chardata.mat


def _asymmetric_image() -> np.ndarray:
    img = np.zeros((28, 28), np.float32)
    img[2, 3:20] = 1.0  # a bar along the top row ...
    img[2:25, 3] = 0.5  # ... and down the left side: a "Γ"
    return img


def _write_chardata(path: Path, n_train=24345, n_test=8070, rows=784) -> np.ndarray:
    img = _asymmetric_image()
    column = img.flatten(order="F")  # MATLAB stores images column-major
    train = np.zeros((rows, n_train), np.float32)
    test = np.zeros((rows, n_test), np.float32)
    if rows == 784:
        train[:, 0] = column
        test[:, -1] = column
    scipy.io.savemat(path, {"data": train, "testdata": test}, do_compression=True)
    return img


def test_chardata_mat_orientation(tmp_path):
    (tmp_path / "omniglot").mkdir()
    img = _write_chardata(tmp_path / "omniglot" / "chardata.mat")
    assert not np.array_equal(img, img.T)
    out = data.load_omniglot(tmp_path)
    assert out["train"].shape == (24345, 784) and out["test"].shape == (8070, 784)
    assert out["train"].dtype == np.float32
    np.testing.assert_array_equal(out["train"][0].reshape(28, 28), img)
    np.testing.assert_array_equal(out["test"][-1].reshape(28, 28), img)
    assert out["train"][1:].max() == 0
    assert not _stray_files(tmp_path / "omniglot", tmp_path / "usercache")


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"n_train": 100}, "'data' has shape"),
        ({"n_test": 7}, "'testdata' has shape"),
        ({"rows": 783}, "has shape"),
    ],
)
def test_chardata_mat_wrong_shape(tmp_path, kwargs, expected):
    (tmp_path / "omniglot").mkdir()
    path = tmp_path / "omniglot" / "chardata.mat"
    _write_chardata(path, **kwargs)
    with pytest.raises(DataError, match=expected) as err:
        data.load_omniglot(tmp_path)
    assert str(path) in str(err.value)


def test_chardata_mat_bad_values_and_garbage(tmp_path):
    (tmp_path / "omniglot").mkdir()
    path = tmp_path / "omniglot" / "chardata.mat"
    scipy.io.savemat(
        path, {"data": np.full((784, 24345), 2.0, np.float32), "testdata": np.zeros((784, 8070))}
    )
    with pytest.raises(DataError, match=r"outside \[0, 1\]"):
        data.load_omniglot(tmp_path)
    scipy.io.savemat(path, {"other": np.zeros(3)})
    with pytest.raises(DataError, match="'data' missing"):
        data.load_omniglot(tmp_path)
    path.write_bytes(b"MATLAB 5.0 MAT-file, but then garbage")
    with pytest.raises(DataError, match="cannot read MATLAB file") as err:
        data.load_omniglot(tmp_path)
    assert str(path) in str(err.value)


# --------------------------------------------------------------------- load_dataset, binarize_fixed


def test_load_dataset_unknown_name():
    with pytest.raises(IwaeError, match="mnist, omniglot"):
        data.load_dataset("cifar10")


def test_load_dataset_mnist(shared_data_dir, real_mnist):
    ds = data.load_dataset("mnist", shared_data_dir)
    assert isinstance(ds, data.Dataset) and ds.name == "mnist" and ds.validation is None
    np.testing.assert_array_equal(ds.test, real_mnist["test"])
    assert data.load_dataset("MNIST", shared_data_dir) is ds  # cached in-process
    assert not ds.train.flags.writeable
    val = data.load_dataset("mnist", shared_data_dir, validation=True)
    assert val.train.shape == (59600, 784) and val.validation.shape == (400, 784)


def test_load_dataset_omniglot(omniglot_built):
    root, arrays = omniglot_built
    ds = data.load_dataset("omniglot", root)
    assert ds.name == "omniglot" and ds.validation is None
    np.testing.assert_array_equal(ds.train, arrays["train"])
    with pytest.raises(IwaeError, match="only defined for mnist"):
        data.load_dataset("omniglot", root, validation=True)


def test_binarize_fixed():
    x = np.random.default_rng(1).random((2000, 784), dtype=np.float32)
    before = x.copy()
    a, b = data.binarize_fixed(x), data.binarize_fixed(x)
    assert a.dtype == np.float32 and a.shape == x.shape
    assert set(np.unique(a)) == {0.0, 1.0}
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(x, before)
    assert abs(a.mean() - x.mean()) < 0.005
    assert not np.array_equal(a, data.binarize_fixed(x, seed=1))
    edges = data.binarize_fixed(np.array([0.0, 1.0, 0.0, 1.0], np.float32))
    np.testing.assert_array_equal(edges, [0, 1, 0, 1])
    with pytest.raises(ValueError):
        data.binarize_fixed(np.array([1.5]))


def test_test_subsets_are_seeded_random_nested_and_sorted():
    a = data.test_subset_indices(8070, 1000)
    np.testing.assert_array_equal(a, data.test_subset_indices(8070, 1000))  # the same on every call
    assert len(a) == len(set(a)) == 1000 and np.all(np.diff(a) > 0) and a.max() < 8070
    assert not np.array_equal(a, np.arange(1000))  # never the first N
    assert a.min() < 50 and a.max() > 8020  # drawn across the whole set
    assert set(a) <= set(data.test_subset_indices(8070, 2000))  # nested
    np.testing.assert_array_equal(data.test_subset_indices(10, None), np.arange(10))
    np.testing.assert_array_equal(data.test_subset_indices(10, 10), np.arange(10))
    np.testing.assert_array_equal(data.test_subset_indices(10, 99), np.arange(10))
    assert data.test_subset_record(10, 5) == {
        "test_set_size": 10,
        "test_subset_seed": data.TEST_SUBSET_SEED,
    }
    assert (
        data.test_subset_record(10, None)
        == data.test_subset_record(10, 10)
        == {"test_set_size": 10, "test_subset_seed": None}
    )


def test_binarized_test_subset_is_the_full_binarization_restricted():
    """An image gets the same 0/1 pixels whether the whole test set or a subset is used,
    and the subset is the seeded random one (checked against an independent binarization)."""
    test = np.random.default_rng(3).random((300, 784), dtype=np.float32)
    ds = data.Dataset("mnist", test[:10], test)
    full = data.binarized_test(ds)
    independent = (np.random.default_rng(0).random(test.shape, dtype=np.float32) < test).astype(
        np.float32
    )
    np.testing.assert_array_equal(full, independent)
    sub = data.binarized_test(ds, 40)
    np.testing.assert_array_equal(sub, independent[data.test_subset_indices(300, 40)])


def test_omniglot_test_subset_covers_every_alphabet(omniglot_built, shared_data_dir):
    """OMNIGLOT's test set is ordered by alphabet: its first 1,000 images come from a few
    alphabets only, a random subset of 1,000 from all of them."""
    with open(shared_data_dir / "omniglot" / "characters.csv", newline="") as f:
        alphabets = [
            row["alphabet"] for row in sorted(csv.DictReader(f), key=lambda r: int(r["char_id"]))
        ]
    # test images in character order: 5 drawings per character, 4 for Glagolitic (module docstring)
    per_image = [a for a in alphabets for _ in range(4 if a == "Glagolitic" else 5)]
    _, arrays = omniglot_built
    assert len(per_image) == arrays["test"].shape[0] == 8070
    every = set(alphabets)
    assert len({per_image[i] for i in range(1000)}) < 10  # the first N: a handful of alphabets
    assert {per_image[i] for i in data.test_subset_indices(8070, 1000)} == every
