"""Property-based tests of the file readers: random truncations and bit flips of valid
files either read back correctly or raise the library's own DataError, never anything else;
so do random arrays in a user's own ``.npz`` (any dtype, shape and values).

The default suite runs a few hundred cases; the slow suite (``pytest -m slow``) runs
4,000 per reader, 12,000 in all.
"""

import gzip
import io

import numpy as np
import pytest
import scipy.io
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from iwae.data import DataError, content_sha256, load_files, read_idx
from iwae.data.omniglot import _load_chardata, _read_raw_images

FAST, SLOW = 100, 4000


def _idx_bytes() -> bytes:
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    header = (0x00000803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in images.shape)
    return header + images.tobytes()


def _npz_bytes() -> bytes:
    images = np.random.default_rng(0).random((1, 20, 105, 105)) < 0.9
    buf = io.BytesIO()
    np.savez_compressed(buf, images=images, labels=np.zeros((1, 20), dtype=np.int64))
    return buf.getvalue()


def _mat_bytes() -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"data": rng.random((784, 3)), "testdata": rng.random((784, 2))})
    return buf.getvalue()


def _own_npz_bytes() -> bytes:
    """A user's dataset: grey train images, binary test images, 4x4 (stored uncompressed, so
    that bit flips reach the values, not only the checksums)."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    np.savez(buf, train=rng.random((3, 4, 4)).astype(np.float32), test=rng.random((2, 4, 4)) < 0.5)
    return buf.getvalue()


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (4, 5), dtype=np.uint8)).save(
        buf, format="PNG"
    )
    return buf.getvalue()


PNG = _png_bytes()


def _read_png_dir(path):
    """``path`` = ROOT/train/a.png, beside a good ROOT/test/b.png: the directory ROOT read."""
    (path.parent.parent / "test").mkdir(exist_ok=True)
    (path.parent.parent / "test" / "b.png").write_bytes(PNG)
    return load_files(path.parent.parent)


IDX = _idx_bytes()
FILES = {
    "idx": (IDX, "x-idx3-ubyte", lambda p: read_idx(p, ndim=3)),
    "idx.gz": (gzip.compress(IDX), "x-idx3-ubyte.gz", lambda p: read_idx(p, ndim=3)),
    "npz": (_npz_bytes(), "images.npz", lambda p: _read_raw_images(p, 1)),
    "mat": (_mat_bytes(), "chardata.mat", lambda p: _load_chardata(p, sizes=(3, 2))),
    "own.npz": (_own_npz_bytes(), "mine.npz", load_files),
    "png": (PNG, "train/a.png", _read_png_dir),
}


@st.composite
def mutations(draw, size):
    """A truncation point (or none) and up to 8 bit flips."""
    cut = draw(st.one_of(st.none(), st.integers(0, size - 1)))
    flips = draw(st.lists(st.tuples(st.integers(0, size - 1), st.integers(0, 7)), max_size=8))
    return cut, flips


def mutate(data: bytes, mutation) -> bytes:
    cut, flips = mutation
    out = bytearray(data)
    for pos, bit in flips:
        out[pos] ^= 1 << bit
    return bytes(out[:cut] if cut is not None else out)


def check_reader(kind, tmp_path_factory, mutation):
    original, name, read = FILES[kind]
    data = mutate(original, mutation)
    path = tmp_path_factory.mktemp("fuzz") / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    try:
        result = read(path)
    except DataError as e:
        named = (
            path.parent.parent if kind == "png" else path
        )  # a PNG directory's errors name a file or the directory
        assert str(named) in str(e)
        return
    if kind.startswith(
        "idx"
    ):  # the parser may accept a flip in the pixel bytes, never a bad header
        assert result.shape == (3, 28, 28) and result.dtype == np.uint8
    elif kind == "npz":
        assert result.shape == (1, 20, 105, 105) and result.dtype == np.bool_
    elif kind in ("own.npz", "png"):
        assert_valid_dataset(result)
        assert result.image_shape == (
            (4, 4) if kind == "own.npz" else (4, 5)
        )  # a PNG's size is in its checked header
    else:
        assert result["train"].shape == (3, 784) and result["test"].shape == (2, 784)
        assert all(np.isfinite(v).all() and v.min() >= 0 and v.max() <= 1 for v in result.values())


def assert_valid_dataset(ds):
    splits = {
        s: getattr(ds, s) for s in ("train", "validation", "test") if getattr(ds, s) is not None
    }
    for x in splits.values():
        assert (
            x.dtype == np.float32
            and x.ndim == 2
            and x.shape[0] >= 1
            and x.shape[1] == ds.x_dim >= 1
        )
        assert np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1
    assert int(np.prod(ds.image_shape)) == ds.x_dim and ds.binary == bool(
        np.isin(ds.train, (0, 1)).all()
    )
    assert ds.sha256 == content_sha256(splits, ds.image_shape)


DTYPES = st.sampled_from(
    [np.float32, np.float64, np.bool_, np.uint8, np.float16, np.int64, np.complex64]
)


def _rarely(draw) -> bool:
    return draw(st.sampled_from([False] * 7 + [True]))


@st.composite
def own_arrays(draw):
    """Arrays named train and test (rarely one missing) and maybe validation: each of random
    dtype, N in 0..3 images of one shape (rarely another shape, 0 to 4 dimensions of 0 to 3
    entries), values in [0, 1] (rarely anything: out of range, NaN, inf)."""
    image = draw(hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=3))
    names = [n for n in ("train", "test") if not _rarely(draw)] + (
        ["validation"] if draw(st.booleans()) else []
    )
    arrays = {}
    for name in names:
        dtype = draw(DTYPES)
        shape = (0 if _rarely(draw) else draw(st.integers(1, 3)), *image)
        if _rarely(draw):
            shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=3))
        wild = _rarely(draw)
        if dtype == np.bool_:
            elements = st.booleans()
        elif np.issubdtype(dtype, np.integer):
            elements = st.integers(0, 3 if wild else 1)
        else:
            # no subnormals: other tests turn on flush-to-zero (--flush-denormal) in this process
            bounds = {} if wild else {"min_value": 0, "max_value": 1}
            elements = st.floats(width=16, allow_subnormal=False, **bounds)
        arrays[name] = draw(hnp.arrays(dtype, shape, elements=elements))
    return arrays


def check_own_arrays(tmp_path_factory, arrays):
    path = tmp_path_factory.mktemp("own") / "data.npz"
    np.savez(path, **arrays)
    try:
        ds = load_files(path)
    except DataError as e:
        assert str(path) in str(e)
        return
    assert_valid_dataset(ds)
    assert np.array_equal(
        ds.train, np.asarray(arrays["train"], dtype=np.float32).reshape(ds.train.shape)
    )


def _arrays_test(n):
    @settings(
        max_examples=n,
        deadline=None,
        derandomize=n == FAST,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(arrays=own_arrays())
    def test(tmp_path_factory, arrays):
        check_own_arrays(tmp_path_factory, arrays)

    return test


def _fuzz_test(kind, n):
    @settings(
        max_examples=n,
        deadline=None,
        derandomize=n == FAST,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(mutation=mutations(len(FILES[kind][0])))
    def test(tmp_path_factory, mutation):
        check_reader(kind, tmp_path_factory, mutation)

    return test


@pytest.mark.parametrize("kind", sorted(FILES))
def test_unmutated_files_read(kind, tmp_path):
    original, name, read = FILES[kind]
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_bytes(original)
    read(tmp_path / name)


test_fuzz_idx = _fuzz_test("idx", FAST)
test_fuzz_idx_gz = _fuzz_test("idx.gz", FAST)
test_fuzz_npz = _fuzz_test("npz", FAST)
test_fuzz_mat = _fuzz_test("mat", FAST)
test_fuzz_own_npz = _fuzz_test("own.npz", FAST)
test_fuzz_png = _fuzz_test("png", FAST)
test_fuzz_own_arrays = _arrays_test(FAST)
test_fuzz_idx_slow = pytest.mark.slow(_fuzz_test("idx", SLOW // 2))
test_fuzz_idx_gz_slow = pytest.mark.slow(_fuzz_test("idx.gz", SLOW // 2))
test_fuzz_npz_slow = pytest.mark.slow(_fuzz_test("npz", SLOW))
test_fuzz_mat_slow = pytest.mark.slow(_fuzz_test("mat", SLOW))
test_fuzz_own_npz_slow = pytest.mark.slow(_fuzz_test("own.npz", SLOW))
test_fuzz_png_slow = pytest.mark.slow(_fuzz_test("png", SLOW))
test_fuzz_own_arrays_slow = pytest.mark.slow(_arrays_test(SLOW))
