"""The user's own data (`--dataset PATH`): the .npz and PNG-directory readers, their errors,
the content hash, and the image shape in tiles."""

import hashlib
import json

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from iwae import data
from iwae.cli import main
from iwae.errors import DataError, IwaeError
from iwae.experiments import _as_written
from iwae.train import TrainConfig, load_config


def save_png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(path)


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
    splits = {
        s: rng.random((n, 10)) < 0.5 for s, n in (("train", 5), ("validation", 2), ("test", 3))
    }
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
    assert data.load_files(
        tmp_path / "d.npz"
    ).binary  # grey test images are binarized once, as always
    np.savez(tmp_path / "e.npz", train=np.array([[0.0, 0.999]]), test=np.array([[0.0, 1.0]]))
    assert not data.load_files(tmp_path / "e.npz").binary
    # a grey validation split is held out of training: it does not make the training images grey
    np.savez(
        tmp_path / "f.npz",
        train=np.array([[0.0]]),
        test=np.array([[0.0]]),
        validation=np.array([[0.5]]),
    )
    assert data.load_files(tmp_path / "f.npz").binary


def test_hash_is_of_the_content_not_the_file(tmp_path):
    rng = np.random.default_rng(1)
    train, test = rng.random((4, 3, 3)).astype(np.float32), rng.random((2, 3, 3)).astype(np.float32)
    np.savez(tmp_path / "a.npz", train=train, test=test)
    np.savez_compressed(
        tmp_path / "b.npz", test=test.astype(np.float64), train=train.astype(np.float64)
    )
    a, b = (data.load_files(tmp_path / n).sha256 for n in ("a.npz", "b.npz"))
    assert a == b
    train[0, 0, 0] = np.nextafter(train[0, 0, 0], np.float32(2))  # one pixel, one ulp
    np.savez(tmp_path / "c.npz", train=train, test=test)
    np.savez(
        tmp_path / "d.npz", train=train.reshape(4, 9), test=test.reshape(2, 9)
    )  # same values, other shape
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
        (
            {"train": GOOD * 3, "test": GOOD},
            r"'train' has values outside \[0, 1\] \(values from 1.5 to 1.5\)",
        ),
        ({"train": GOOD, "test": GOOD - 0.6}, r"'test' has values outside \[0, 1\]"),
        ({"train": np.full((2, 3, 3), 255, np.uint8), "test": GOOD}, "divide by 255"),
        ({"train": np.where(GOOD > 0, np.nan, 0), "test": GOOD}, "NaN or infinite"),
        ({"train": GOOD.astype(complex), "test": GOOD}, "dtype complex128"),
        ({"train": np.full((2, 3), "a"), "test": GOOD}, "dtype <U1"),
        (
            {"train": np.full(3, 0.5), "test": GOOD},
            r"shape \[3\], expected \[N, H, W\] or \[N, D\]",
        ),
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
    (tmp_path / "array.npz").write_bytes(
        (tmp_path / "array.npy").read_bytes()
    )  # an .npy named .npz
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
    assert np.array_equal(
        ds.train, pixels["train"].reshape(3, 20).astype(np.float32) / np.float32(255)
    )
    assert np.array_equal(ds.test, pixels["test"].reshape(2, 20) / np.float32(255))
    assert ds.sha256 == expected_sha256({s: pixels[s] / np.float32(255) for s in pixels}, (4, 5))
    assert not ds.binary and ds.path == str(tmp_path.resolve())


def test_png_modes_are_converted_to_grey(tmp_path):
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)  # luminance of red: 299/1000 * 255 = 76.245 -> 76
    save_png(tmp_path / "train" / "a.png", rgb, "RGB")
    save_png(tmp_path / "train" / "b.png", np.array([[0, 255, 0], [255, 0, 0]], np.uint8), "1")
    save_png(
        tmp_path / "test" / "c.png", np.array([[0, 65535, 32768], [1, 2, 3]], np.uint16)
    )  # 16-bit grey
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
        (
            lambda root: (
                png_dir(root),
                save_png(root / "train" / "zz.png", np.zeros((4, 6), np.uint8)),
            ),
            "train/zz.png",
            "image of size 6x4, but 000.png is 5x4",
        ),
        (lambda root: (root / "train").mkdir(), "", "missing split test/"),
        (
            lambda root: (png_dir(root), [p.unlink() for p in (root / "test").iterdir()]),
            "test",
            "empty split",
        ),
        (
            lambda root: (
                png_dir(root),
                (root / "test" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken"),
            ),
            "test/001.png",
            "cannot read PNG image",
        ),
        (
            lambda root: (
                png_dir(root),
                Image.new("L", (5, 4)).save(root / "test" / "j.png", format="JPEG"),
            ),
            "test/j.png",
            "not a PNG image",
        ),
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
    grid = data.tile_images(
        images, shape=(2, 3), cols=2
    )  # 2 rows of 2 tiles of 2x3, 1 pixel borders
    assert grid.shape == (2 * 3 + 1, 2 * 4 + 1)
    assert np.array_equal(grid[1:3, 5:8], images[1].reshape(2, 3)) and np.all(grid[4:6, 5:8] == 1)
    assert data.display_shape((16,)) == (4, 4) and data.display_shape((10,)) == (1, 10)
    assert data.display_shape((20, 30)) == (20, 30)
    assert np.array_equal(
        data.tile_images(images[:1], shape=(6,)), np.pad(images[:1], 1, constant_values=1)
    )
    assert np.array_equal(
        data.tile_images(np.zeros((4, 784))), data.tile_images(np.zeros((4, 784)), shape=(28, 28))
    )


def test_png_order_is_the_order_of_the_names(tmp_path):
    """Whatever order the file system lists them in (created here in a shuffled order)."""
    names = ["c.png", "a10.png", "e.png", "a2.png", "b.png", "d.png"]
    for value, name in enumerate(names):
        save_png(tmp_path / "train" / name, np.full((2, 2), value * 40, np.uint8))
    save_png(tmp_path / "test" / "x.png", np.zeros((2, 2), np.uint8))
    ds = data.load_files(tmp_path)
    by_name = [
        names.index(n) * 40 / np.float32(255) for n in sorted(names)
    ]  # a10 before a2: plain string order
    assert np.array_equal(ds.train[:, 0], np.array(by_name, dtype=np.float32))


# ----------------------------------------------------------------- architectures and configurations

# a config.json written before image_shape, latent, hidden, binarize and the dataset hash existed
OLD_CONFIG = {
    "dataset": "omniglot",
    "layers": 2,
    "objective": "iwae",
    "k": 5,
    "m": 1,
    "beta": 0.5,
    "estimator": "reparam",
    "stages": 3,
    "epochs": None,
    "seed": 0,
    "batch_size": 20,
    "lr": 0.001,
    "beta1": 0.9,
    "beta2": 0.999,
    "adam_eps": 0.0001,
    "scale": "exp",
    "validation": False,
    "n_train": None,
    "eval_every": 10,
    "eval_n": 1000,
    "curve_k": None,
    "checkpoint_minutes": 5.0,
    "max_bad_steps": 20,
    "init_weights": None,
    "data_dir": "d",
    "model": {
        "x_dim": 784,
        "latent": [100, 50],
        "hidden": [[200, 200], [100, 100]],
        "scale": "exp",
    },
}


def test_old_configs_load_as_28x28(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(OLD_CONFIG))
    config = load_config(tmp_path)
    assert (
        config.image_shape == [28, 28]
        and config.model == OLD_CONFIG["model"]
        and config.layers == 2
    )
    assert config.latent is None and config.dataset_sha256 is None and config.binarize is None
    # --reuse sees an old run and a new one of the same training as the same run
    new = TrainConfig(**{k: v for k, v in OLD_CONFIG.items() if k != "model"}).to_dict()
    assert _as_written(OLD_CONFIG) == json.loads(json.dumps(new))


def test_latent_and_hidden_choose_the_architecture():
    c = TrainConfig(latent=[30, 20], hidden=[[60, 50], [40]], scale="softplus", stages=1)
    assert c.layers == 2 and c.model == {
        "x_dim": 784,
        "latent": [30, 20],
        "hidden": [[60, 50], [40]],
        "scale": "softplus",
    }
    assert (
        TrainConfig(latent="30,20", hidden="60x50,40", layers=2, scale="softplus", stages=1).model
        == c.model
    )
    assert TrainConfig(layers=2).model == {
        "x_dim": 784,
        "latent": [100, 50],
        "hidden": [[200, 200], [100, 100]],
        "scale": "exp",
    }
    assert TrainConfig().layers == 1
    for bad, message in [
        (dict(latent=[30, 20], hidden=[[60]]), "--latent has 2 entries and --hidden 1"),
        (dict(latent=[30]), "--latent and --hidden go together"),
        (dict(hidden="60"), "--latent and --hidden go together"),
        (dict(latent=[30], hidden=[[60]], layers=2), "--layers 2 disagrees with --latent 30"),
        (dict(latent=[0], hidden=[[60]]), "layer sizes must be positive"),
        (dict(latent="30,x", hidden="60"), "--latent: expected positive integers"),
        (dict(latent=[30], hidden=[60]), "latent must be a list of sizes"),
        (dict(binarize="always"), "binarize must be one of dynamic, none"),
        (dict(image_shape=[0, 4]), "image_shape must be"),
    ]:
        with pytest.raises(IwaeError, match=message):
            TrainConfig(**bad)


def test_a_config_for_data_from_files(tmp_path):
    np.savez(tmp_path / "d.npz", train=np.full((3, 5, 4), 0.5), test=np.ones((2, 5, 4)))
    ds = data.load_files(tmp_path / "d.npz")
    c = TrainConfig(dataset=str(tmp_path / "d.npz"), latent="3", hidden="7", stages=1)
    assert c.model == {} and c.image_shape is None  # the input size comes with the data
    with pytest.raises(IwaeError, match="not known before the data"):
        c.model_config
    bound = c.for_data(ds)
    assert (
        bound.image_shape == [5, 4] and bound.model["x_dim"] == 20 and bound.dataset_path == ds.path
    )
    assert (
        bound.dataset_sha256 == ds.sha256 and c.model == {}
    )  # a new configuration; the old one is unchanged
    with pytest.raises(IwaeError, match="takes 784 pixels"):
        TrainConfig(
            dataset=str(tmp_path / "d.npz"),
            layers=1,
            model={"x_dim": 784, "latent": [2], "hidden": [[3]]},
            stages=1,
        ).for_data(ds)
    with pytest.raises(IwaeError, match="--binarize none: the training images of .*d.npz are grey"):
        TrainConfig(dataset=str(tmp_path / "d.npz"), binarize="none", stages=1).for_data(ds)


# --------------------------------------------------------------------- the command line, end to end


def grey_npz(path, n=(60, 20), side=(20, 20), seed=0):
    """Grey images around three prototypes: ``n`` train and test images of size ``side``."""
    rng = np.random.default_rng(seed)
    protos = rng.random((3, *side)) ** 2
    splits = {
        s: np.clip(protos[rng.integers(0, 3, k)] + rng.normal(0, 0.05, (k, *side)), 0, 1).astype(
            np.float32
        )
        for s, k in zip(("train", "test"), n)
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **splits)
    return path


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


TRAIN_SMALL = ["-k", "2", "--epochs", "1", "--eval-n", "10", "--stage-nll-k", "0", "--quiet"]


def test_train_evaluate_sample_on_20x20_images(tmp_path, capsys):
    npz = grey_npz(tmp_path / "data" / "d.npz")
    run = tmp_path / "run"
    code, _, err = run_cli(
        capsys,
        "train",
        "--dataset",
        npz,
        "--latent",
        "4,3",
        "--hidden",
        "16,8x8",
        *TRAIN_SMALL,
        "--out",
        run,
    )
    assert code == 0, err
    config = json.loads((run / "config.json").read_text())
    assert config["dataset"] == str(npz) and config["dataset_path"] == str(npz.resolve())
    assert config["dataset_sha256"] == data.load_files(npz).sha256 and config["image_shape"] == [
        20,
        20,
    ]
    assert (
        config["layers"] == 2 and config["latent"] == [4, 3] and config["hidden"] == [[16], [8, 8]]
    )
    assert config["model"] == {
        "x_dim": 400,
        "latent": [4, 3],
        "hidden": [[16], [8, 8]],
        "scale": "exp",
    }
    weights = safetensors.torch.load_file(run / "model.safetensors")
    assert weights["encoder.0.net.0.weight"].shape == (16, 400) and weights[
        "decoder.0.2.weight"
    ].shape == (400, 16)

    code, out, err = run_cli(capsys, "evaluate", run, "--k", "100", "--json", "--quiet")
    assert code == 0, err
    result = json.loads(out)
    assert result["n_test"] == result["test_set_size"] == 20 and len(result["active_units"]) == 2
    assert result["elbo"] < result["iwae64"] <= result["log_px"] + 1.0 and 0 < result[
        "nll"
    ] < 400 * np.log(2)

    assert run_cli(capsys, "sample", run, "--out", tmp_path / "s.png", "--n", "6")[0] == 0
    assert np.asarray(Image.open(tmp_path / "s.png")).shape[:2] == (
        2 * 21 + 1,
        3 * 21 + 1,
    )  # 2 x 3 tiles of 20x20

    # the same content elsewhere is accepted; other content is refused unless told otherwise
    moved = grey_npz(tmp_path / "elsewhere" / "copy.npz")
    assert run_cli(capsys, "evaluate", run, "--k", "10", "--quiet", "--dataset", moved)[0] == 0
    evaluation = (run / "evaluation.json").read_bytes()
    grey_npz(npz, seed=1)  # the file changes under the run
    code, _, err = run_cli(capsys, "evaluate", run, "--k", "10", "--quiet")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert (
        f"{npz.resolve()}: not the data the run was trained on" in err
        and "--ignore-dataset-hash" in err
    )
    assert (run / "evaluation.json").read_bytes() == evaluation  # nothing written
    assert run_cli(capsys, "evaluate", run, "--k", "10", "--quiet", "--ignore-dataset-hash")[0] == 0
    small = grey_npz(tmp_path / "small.npz", side=(10, 10))
    code, _, err = run_cli(
        capsys, "evaluate", run, "--k", "10", "--dataset", small, "--ignore-dataset-hash"
    )
    assert code == 2 and "images of 100 pixels (10x10), but the run's model takes 400" in err

    # nor does an interrupted run resume on changed data
    (run / "summary.json").unlink()
    metrics = (run / "metrics.jsonl").read_bytes()
    code, _, err = run_cli(capsys, "train", "--resume", run, "--quiet")
    assert code == 2 and "is not the data" in err and "cannot be resumed" in err
    assert (run / "metrics.jsonl").read_bytes() == metrics


def test_a_runs_config_repeats_it_on_its_data(tmp_path, capsys):
    npz = grey_npz(tmp_path / "d.npz", side=(6, 5))
    assert (
        run_cli(
            capsys,
            "train",
            "--dataset",
            npz,
            "--latent",
            "3",
            "--hidden",
            "8",
            *TRAIN_SMALL,
            "--out",
            tmp_path / "a",
        )[0]
        == 0
    )
    assert (
        run_cli(
            capsys,
            "train",
            "--config",
            tmp_path / "a" / "config.json",
            "--out",
            tmp_path / "b",
            "--quiet",
        )[0]
        == 0
    )
    a, b = (safetensors.torch.load_file(tmp_path / r / "model.safetensors") for r in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # another dataset, or another architecture, from the command line replaces the recorded one
    other = grey_npz(tmp_path / "e.npz", side=(4, 4))
    assert (
        run_cli(
            capsys,
            "train",
            "--config",
            tmp_path / "a" / "config.json",
            "--dataset",
            other,
            "--out",
            tmp_path / "c",
            "--quiet",
        )[0]
        == 0
    )
    c = json.loads((tmp_path / "c" / "config.json").read_text())
    assert c["image_shape"] == [4, 4] and c["dataset_sha256"] == data.load_files(other).sha256
    assert c["latent"] == [3] and c["model"] == {
        "x_dim": 16,
        "latent": [3],
        "hidden": [[8]],
        "scale": "exp",
    }
    assert (
        run_cli(
            capsys,
            "train",
            "--config",
            tmp_path / "a" / "config.json",
            "--layers",
            "1",
            "--out",
            tmp_path / "d",
            "--quiet",
        )[0]
        == 0
    )
    d = json.loads((tmp_path / "d" / "config.json").read_text())
    assert d["latent"] is None and d["model"] == {
        "x_dim": 30,
        "latent": [50],
        "hidden": [[200, 200]],
        "scale": "exp",
    }


def test_binary_images_are_used_as_they_are(tmp_path, capsys):
    """On 0/1 images --binarize dynamic is --binarize none, bit for bit, and the default."""
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "b.npz", train=rng.random((40, 5, 5)) < 0.3, test=rng.random((10, 5, 5)) < 0.3
    )
    runs = {}
    for choice in ([], ["--binarize", "dynamic"], ["--binarize", "none"]):
        out = tmp_path / f"run{len(runs)}"
        assert (
            run_cli(
                capsys,
                "train",
                "--dataset",
                tmp_path / "b.npz",
                *choice,
                "--latent",
                "2",
                "--hidden",
                "8",
                *TRAIN_SMALL,
                "--out",
                out,
            )[0]
            == 0
        )
        runs[out] = safetensors.torch.load_file(out / "model.safetensors")
    first, *others = runs.values()
    assert all(torch.equal(first[k], other[k]) for other in others for k in first)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--latent", "0", "--hidden", "8"], "argument --latent: layer sizes must be positive"),
        (["--latent", "4", "--hidden", "8x"], "argument --hidden: expected positive integers"),
        (["--latent", "4,3", "--hidden", "8"], "--latent has 2 entries and --hidden 1"),
        (["--latent", "4"], "--latent and --hidden go together"),
        (
            ["--latent", "4", "--hidden", "8", "--layers", "2"],
            "--layers 2 disagrees with --latent 4",
        ),
        (["--binarize", "none"], "--binarize none: the training images of"),
        (["--binarize", "sometimes"], "argument --binarize: invalid choice"),
        (["--validation"], "--validation holds out MNIST's"),
    ],
)
def test_bad_own_data_arguments_exit_2_and_write_nothing(tmp_path, capsys, argv, message):
    npz = grey_npz(tmp_path / "d.npz", n=(4, 2), side=(3, 3))
    with pytest.raises(SystemExit) as e:
        raise SystemExit(
            main(
                [
                    "train",
                    "--dataset",
                    str(npz),
                    *argv,
                    "--epochs",
                    "1",
                    "--out",
                    str(tmp_path / "run"),
                ]
            )
        )
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_a_dataset_that_is_neither_a_name_nor_a_file(tmp_path, capsys):
    code, _, err = run_cli(
        capsys, "train", "--dataset", tmp_path / "no.npz", "--epochs", "1", "--out", tmp_path / "r"
    )
    assert (
        code == 2
        and f"--dataset {tmp_path / 'no.npz'}: neither a built-in dataset (mnist, omniglot)" in err
    )
    assert not (tmp_path / "r").exists()


def test_snr_on_own_data_and_architectures(tmp_path, capsys):
    npz = grey_npz(tmp_path / "d.npz", n=(8, 2), side=(5, 5))
    out = tmp_path / "snr"
    common = ["--k", "1,2", "--reps", "3", "--batch-size", "4", "--quiet"]
    code, _, err = run_cli(
        capsys, "snr", "--latent", "2", "--hidden", "4x3", "--dataset", npz, *common, "--out", out
    )
    assert code == 0, err
    assert (
        json.loads((out / "snr.json").read_text())["source"] == "latent [2] hidden [[4, 3]], seed 0"
    )
    for bad in (
        ["--latent", "2"],
        ["--latent", "2,2", "--hidden", "4"],
        ["--latent", "2", "--hidden", "4", "--preset", "burda1"],
    ):
        code, _, err = run_cli(
            capsys, "snr", *bad, "--dataset", npz, *common, "--out", tmp_path / "bad"
        )
        assert code == 2 and len(err.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()

    run = tmp_path / "run"
    assert (
        run_cli(
            capsys,
            "train",
            "--dataset",
            npz,
            "--latent",
            "2",
            "--hidden",
            "4",
            *TRAIN_SMALL,
            "--out",
            run,
        )[0]
        == 0
    )
    assert run_cli(capsys, "snr", run, *common, "--out", out)[0] == 2  # an existing result: refused
    assert run_cli(capsys, "snr", run, *common, "--out", out, "--overwrite")[0] == 0
    assert json.loads((out / "snr.json").read_text())["source"] == str(run)
    code, _, err = run_cli(
        capsys,
        "snr",
        run,
        "--dataset",
        grey_npz(tmp_path / "e.npz", n=(8, 2), side=(5, 5), seed=3),
        *common,
        "--out",
        out,
        "--overwrite",
    )
    assert code == 2 and "not the data the run was trained on" in err
