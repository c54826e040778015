"""Property-based tests of the file readers: random truncations and bit flips of valid
files either read back correctly or raise the library's own DataError, never anything else.

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

from iwae.data import DataError, _load_chardata, _read_raw_images, read_idx

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


IDX = _idx_bytes()
FILES = {
    "idx": (IDX, "x-idx3-ubyte", lambda p: read_idx(p, ndim=3)),
    "idx.gz": (gzip.compress(IDX), "x-idx3-ubyte.gz", lambda p: read_idx(p, ndim=3)),
    "npz": (_npz_bytes(), "images.npz", lambda p: _read_raw_images(p, 1)),
    "mat": (_mat_bytes(), "chardata.mat", lambda p: _load_chardata(p, sizes=(3, 2))),
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
    path.write_bytes(data)
    try:
        result = read(path)
    except DataError as e:
        assert str(path) in str(e)
        return
    if kind.startswith("idx"):  # the parser may accept a flip in the pixel bytes, never a bad header
        assert result.shape == (3, 28, 28) and result.dtype == np.uint8
    elif kind == "npz":
        assert result.shape == (1, 20, 105, 105) and result.dtype == np.bool_
    else:
        assert result["train"].shape == (3, 784) and result["test"].shape == (2, 784)
        assert all(np.isfinite(v).all() and v.min() >= 0 and v.max() <= 1 for v in result.values())


def _fuzz_test(kind, n):
    @settings(max_examples=n, deadline=None, derandomize=n == FAST,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(mutation=mutations(len(FILES[kind][0])))
    def test(tmp_path_factory, mutation):
        check_reader(kind, tmp_path_factory, mutation)

    return test


@pytest.mark.parametrize("kind", sorted(FILES))
def test_unmutated_files_read(kind, tmp_path):
    original, name, read = FILES[kind]
    (tmp_path / name).write_bytes(original)
    read(tmp_path / name)


test_fuzz_idx = _fuzz_test("idx", FAST)
test_fuzz_idx_gz = _fuzz_test("idx.gz", FAST)
test_fuzz_npz = _fuzz_test("npz", FAST)
test_fuzz_mat = _fuzz_test("mat", FAST)
test_fuzz_idx_slow = pytest.mark.slow(_fuzz_test("idx", SLOW // 2))
test_fuzz_idx_gz_slow = pytest.mark.slow(_fuzz_test("idx.gz", SLOW // 2))
test_fuzz_npz_slow = pytest.mark.slow(_fuzz_test("npz", SLOW))
test_fuzz_mat_slow = pytest.mark.slow(_fuzz_test("mat", SLOW))
