"""klayer.data and ``klayer data``: real CIFAR-10, corrupt and malicious files, the binary
format. Downloads are in test_data_download.py."""

from __future__ import annotations

import codecs
import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from klayer import cli, data
from klayer.data import DataError

FIRST_TRAIN_LABELS = [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
FIRST_TEST_LABELS = [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
TRAIN_CHANNEL_MEAN = [0.4914, 0.4822, 0.4465]
N = data.IMAGES_PER_BATCH


# --------------------------------------------------------------------------- helpers


def random_batch(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A full-size fake batch: X (10000, 3072) uint8, y (10000,) int64."""
    rng = np.random.default_rng(seed)
    X = rng.integers(0, 256, (N, data.IMAGE_SIZE), dtype=np.uint8)
    return X, rng.integers(0, 10, N).astype(np.int64)


def write_pickle(path: Path, obj, protocol: int = 4) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def batch_dict(X, y) -> dict:
    """A batch dict like the official files: bytes keys, labels as a list of ints."""
    return {b"data": X, b"labels": [int(label) for label in y]}


def write_fake_folder(folder: Path, content: bytes = b"x") -> Path:
    """A cifar-10-batches-py folder whose six files exist (content not a real batch)."""
    folder.mkdir(parents=True)
    for name in data.BATCH_NAMES:
        (folder / name).write_bytes(content)
    return folder


class RunsCode:
    """Pickles to a call of ``func(*args)``: what a malicious pickle does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


# --------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def real_batches(cifar_dir):
    return data.load_batches(cifar_dir)


@pytest.fixture(scope="module")
def real_full(cifar_dir):
    return data.load_cifar10(cifar_dir, download=False)


@pytest.mark.cifar
def test_real_batches_counts_and_first_labels(real_batches):
    assert list(real_batches) == list(data.BATCH_NAMES)
    for X, y in real_batches.values():
        assert X.shape == (N, 3072) and X.dtype == np.uint8
        assert y.shape == (N,) and y.dtype == np.int64
    train_y = np.concatenate([real_batches[n][1] for n in data.TRAIN_BATCHES])
    test_y = real_batches["test_batch"][1]
    assert np.bincount(train_y).tolist() == [5000] * 10
    assert np.bincount(test_y).tolist() == [1000] * 10
    assert train_y[:10].tolist() == FIRST_TRAIN_LABELS
    assert test_y[:10].tolist() == FIRST_TEST_LABELS
    # first red row of training image 0 (PROVENANCE.md)
    assert real_batches["data_batch_1"][0][0, :6].tolist() == [59, 43, 50, 68, 98, 119]


@pytest.mark.cifar
def test_real_describe_channel_statistics(real_batches):
    summary = data.describe(real_batches)
    train, test = summary["splits"]["train"], summary["splits"]["test"]
    assert train["n"] == 50000 and test["n"] == 10000
    assert train["counts"] == [5000] * 10 and test["counts"] == [1000] * 10
    np.testing.assert_allclose(train["mean"], TRAIN_CHANNEL_MEAN, atol=1e-3)
    # the exact float64 values of PROVENANCE.md
    np.testing.assert_allclose(train["mean"], [0.49139968, 0.48215841, 0.44653091], atol=1e-8)
    np.testing.assert_allclose(train["std"], [0.24703223, 0.24348513, 0.26158784], atol=1e-8)
    np.testing.assert_allclose(test["mean"], [0.49421428, 0.48513139, 0.45040909], atol=1e-8)


@pytest.mark.cifar
def test_full_protocol_splits_and_standardisation(real_full, real_batches):
    d = real_full
    assert (len(d.X_train), len(d.X_val), len(d.X_test)) == (45000, 5000, 10000)
    assert d.X_train.dtype == d.X_val.dtype == d.X_test.dtype == np.float32
    assert d.y_train.dtype == np.int64 and d.input_size == 3072
    assert d.class_names == data.CLASS_NAMES
    assert d.y_train[:10].tolist() == FIRST_TRAIN_LABELS
    assert d.y_test[:10].tolist() == FIRST_TEST_LABELS
    np.testing.assert_array_equal(d.y_val, real_batches["data_batch_5"][1][5000:])
    # training columns standardised (every 5th column, to keep the test fast)
    columns = d.X_train[:, ::5].astype(np.float64)
    np.testing.assert_allclose(columns.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(columns.std(axis=0), 1, atol=1e-4)
    channel_mean = d.standardizer.mean.reshape(3, 1024).mean(axis=1)
    np.testing.assert_allclose(channel_mean, TRAIN_CHANNEL_MEAN, atol=1e-3)
    # the test image 0 is exactly (x / 255 - mean) / std
    x = real_batches["test_batch"][0][0] / 255.0
    expected = (x - d.standardizer.mean) / d.standardizer.std
    np.testing.assert_allclose(d.X_test[0], expected, atol=1e-5)


@pytest.mark.cifar
def test_single_protocol(cifar_dir, real_batches):
    d = data.load_cifar10(cifar_dir, protocol="single", download=False)
    assert (len(d.X_train), len(d.X_val), len(d.X_test)) == (10000, 10000, 10000)
    np.testing.assert_array_equal(d.y_train, real_batches["data_batch_1"][1])
    np.testing.assert_array_equal(d.y_val, real_batches["data_batch_2"][1])
    reference = data.Standardizer.fit(real_batches["data_batch_1"][0])
    np.testing.assert_array_equal(d.standardizer.mean, reference.mean)


@pytest.mark.cifar
def test_dtype_options_and_subset(cifar_dir, real_batches):
    d64 = data.load_cifar10(cifar_dir, subset=1000, dtype="float64", download=False)
    d32 = data.load_cifar10(cifar_dir, subset=1000, dtype=np.float32, download=False)
    assert d64.X_train.dtype == np.float64 and d32.X_train.dtype == np.float32
    assert (len(d64.X_train), len(d64.X_val), len(d64.X_test)) == (1000, 1000, 1000)
    np.testing.assert_allclose(d32.X_train, d64.X_train, atol=1e-5)
    X1, y1 = real_batches["data_batch_1"]
    np.testing.assert_array_equal(d64.y_train, y1[:1000])
    np.testing.assert_array_equal(d64.y_val, real_batches["data_batch_5"][1][5000:6000])
    # statistics of the 1000 training images only, exactly
    x = X1[:1000] / 255.0
    np.testing.assert_allclose(d64.standardizer.mean, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(d64.standardizer.std, x.std(axis=0), rtol=1e-12)
    np.testing.assert_allclose(d64.X_train, (x - x.mean(0)) / x.std(0), atol=1e-12)
    # describe() of a Dataset recovers the pixel statistics of its splits
    summary = data.describe(d64)
    assert summary["splits"]["train"]["counts"] == np.bincount(y1[:1000], minlength=10).tolist()
    channel = x.reshape(1000, 3, 1024)
    train = summary["splits"]["train"]
    np.testing.assert_allclose(train["mean"], channel.mean(axis=(0, 2)), atol=1e-12)
    np.testing.assert_allclose(train["std"], channel.std(axis=(0, 2)), atol=1e-12)


@pytest.mark.cifar
def test_n_val_and_subset_spanning_batches(cifar_dir, real_batches):
    d = data.load_cifar10(cifar_dir, n_val=12000, subset=15000, download=False)
    assert (len(d.X_train), len(d.X_val), len(d.X_test)) == (15000, 12000, 10000)
    train_y = np.concatenate([real_batches[n][1] for n in data.TRAIN_BATCHES])
    np.testing.assert_array_equal(d.y_train, train_y[:15000])
    np.testing.assert_array_equal(d.y_val, train_y[38000:])
    d0 = data.load_cifar10(cifar_dir, n_val=0, subset=10, download=False)
    assert d0.X_val.shape == (0, 3072) and d0.y_val.shape == (0,)


@pytest.mark.cifar
def test_cli_data_on_real_files(cifar_dir, capsys):
    assert cli.main(["data", "--data-dir", str(cifar_dir), "--no-download"]) == 0
    out = capsys.readouterr().out
    assert str(cifar_dir) in out and "verified: 6 batches" in out
    assert "airplane" in out and "5000" in out and "1000" in out
    assert "50000" in out and "10000" in out
    for mean in ("0.4914", "0.4822", "0.4465"):
        assert mean in out


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"protocol": "half"}, "protocol"),
        ({"n_val": -1}, "n_val"),
        ({"n_val": 50000}, "n_val"),
        ({"n_val": 2.5}, "n_val"),
        ({"subset": 0}, "subset"),
        ({"subset": True}, "subset"),
        ({"dtype": "int8"}, "dtype"),
        ({"dtype": "float16"}, "dtype"),
    ],
)
def test_load_cifar10_rejects_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        data.load_cifar10(tmp_path, download=False, **kwargs)


def test_one_hot():
    Y = data.one_hot(np.array([0, 3, 9]))
    assert Y.shape == (3, 10) and Y.dtype == np.float64
    assert Y.argmax(axis=1).tolist() == [0, 3, 9] and Y.sum() == 3
    assert data.one_hot([1, 0], num_classes=2, dtype="float32").dtype == np.float32
    with pytest.raises(ValueError):
        data.one_hot([10])
    with pytest.raises(ValueError):
        data.one_hot([0.5])


def test_standardizer_round_trip_and_zero_std():
    X = np.array([[0, 10, 7], [255, 20, 7], [51, 30, 7]], np.uint8)
    st = data.Standardizer.fit(X)
    Z = st.transform(X, "float64")
    np.testing.assert_allclose(Z[:, :2].mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(Z[:, :2].std(axis=0), 1, atol=1e-12)
    assert np.all(Z[:, 2] == 0)  # constant column: centred only
    again = data.Standardizer.from_dict(json.loads(json.dumps(st.to_dict())))
    np.testing.assert_array_equal(again.transform(X, "float64"), Z)
    np.testing.assert_allclose(st.transform(X[0], "float64"), Z[0])  # one image (d,)
    with pytest.raises(ValueError):
        st.transform(np.zeros((2, 4), np.uint8))
    with pytest.raises(ValueError):
        data.Standardizer(np.zeros(3), np.zeros(2))


# --------------------------------------------------------------------------- locating


def test_find_data_dir_order(tmp_path, monkeypatch):
    explicit = write_fake_folder(tmp_path / "explicit" / data.PY_FOLDER)
    env = write_fake_folder(tmp_path / "env" / data.PY_FOLDER)
    cache = write_fake_folder(tmp_path / "xdg" / "klayer" / data.PY_FOLDER)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    assert data.default_cache_dir() == tmp_path / "xdg" / "klayer"
    assert data.find_data_dir() == cache
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "env"))
    assert data.find_data_dir() == env
    assert data.find_data_dir(tmp_path / "explicit") == explicit  # contains the folder
    assert data.find_data_dir(explicit) == explicit  # is the folder
    assert data.find_data_dir(tmp_path / "empty") is None  # no fallback to env or cache
    assert data.data_root(tmp_path / "empty") == (tmp_path / "empty", "data_dir")


# --------------------------------------------------------------------------- corrupt files


def test_missing_batch_is_named(tmp_path):
    folder = write_fake_folder(tmp_path / data.PY_FOLDER)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        data.load_batches(tmp_path)


def test_truncated_pickle(tmp_path):
    X, y = random_batch(0)
    path = write_pickle(tmp_path / "data_batch_1", batch_dict(X, y))
    whole = path.read_bytes()
    data.check_batch(path)
    for cut in (len(whole) // 2, len(whole) - 1):  # half, or only the final STOP missing
        path.write_bytes(whole[:cut])
        with pytest.raises(DataError, match=r"data_batch_1.*truncated or corrupt"):
            data.read_batch(path)
        with pytest.raises(DataError, match=r"data_batch_1.*truncated or corrupt"):
            data.check_batch(path)


def test_wrong_shape(tmp_path):
    small = batch_dict(np.zeros((100, 3072), np.uint8), [0] * 100)
    path = write_pickle(tmp_path / "test_batch", small)
    with pytest.raises(DataError, match=r"test_batch.*shape \(100, 3072\)"):
        data.read_batch(path)
    with pytest.raises(DataError, match=r"test_batch.*no block of 10000 x 3072 pixel bytes"):
        data.check_batch(path)


def test_labels_out_of_range(tmp_path):
    X, y = random_batch(1)
    y[17] = 10
    path = write_pickle(tmp_path / "data_batch_2", batch_dict(X, y))
    with pytest.raises(DataError, match=r"data_batch_2.*outside 0\.\.9"):
        data.read_batch(path)


def test_wrong_dtype_and_missing_key(tmp_path):
    X, y = random_batch(2)
    path = write_pickle(tmp_path / "a", batch_dict(X[:10].astype(np.float32), y))
    with pytest.raises(DataError, match="dtype float32"):
        data.read_batch(path)
    path = write_pickle(tmp_path / "b", {b"data": X})
    with pytest.raises(DataError, match="'labels'"):
        data.read_batch(path)
    path = write_pickle(tmp_path / "c", [X, y])
    with pytest.raises(DataError, match="expected a dict"):
        data.read_batch(path)


def test_other_encodings_of_the_format(tmp_path):
    """str keys, data as bytes or a protocol-5 ndarray, labels as an array."""
    X, y = random_batch(3)
    variants = [
        ({"data": X.tobytes(), "labels": y}, 3),
        ({"data": X, "labels": y.astype(np.uint8), "batch_label": "x"}, 5),
        ({b"data": X.reshape(-1), b"labels": list(map(int, y))}, 4),
        ({b"data": X, b"labels": list(map(int, y))}, 2),  # Python 3: via _codecs.encode
    ]
    for i, (obj, protocol) in enumerate(variants):
        path = write_pickle(tmp_path / f"v{i}", obj, protocol)
        data.check_batch(path)  # the opcode walk finds the pixel block in every encoding
        Xr, yr = data.read_batch(path)
        np.testing.assert_array_equal(Xr, X)
        np.testing.assert_array_equal(yr, y)
        assert Xr.dtype == np.uint8 and yr.dtype == np.int64


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_safe_unpickler_rebuilds_arrays_of_any_protocol(protocol):
    """Python 3 protocol 2 goes through _codecs.encode, 5 through numpy's _frombuffer."""
    obj = {
        "data": np.arange(12, dtype=np.uint8).reshape(3, 4),
        "labels": np.arange(3),
        "n": np.int64(7),
        "raw": b"\x00\xff",
        "names": ["a", "b"],
    }
    loaded = data.SafeUnpickler(io.BytesIO(pickle.dumps(obj, protocol)), encoding="bytes").load()
    np.testing.assert_array_equal(loaded["data"], obj["data"])
    np.testing.assert_array_equal(loaded["labels"], obj["labels"])
    assert loaded["n"] == 7 and loaded["raw"] == b"\x00\xff" and loaded["names"] == ["a", "b"]


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("how", ["os.system", "exec", "nested"])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, how, protocol):
    marker = tmp_path / "pwned"
    if how == "os.system":
        payload = RunsCode(os.system, f"touch {marker}")
    elif how == "exec":
        payload = RunsCode(exec, f"open({str(marker)!r}, 'w').write('x')")
    else:  # hidden after legitimate content, inside the labels
        evil = RunsCode(os.system, f"touch {marker}")
        payload = {b"data": np.zeros((N, 3072), np.uint8), b"labels": [0] * 5 + [evil]}
    path = write_pickle(tmp_path / "data_batch_1", payload, protocol)
    with pytest.raises(DataError, match=r"data_batch_1.*refused to load"):
        data.read_batch(path)
    if how == "nested":
        data.check_batch(path)  # well-formed, with a pixel block: only decoding refuses it
    else:
        with pytest.raises(DataError, match="no block of 10000 x 3072 pixel bytes"):
            data.check_batch(path)
    assert not marker.exists()


def test_codecs_only_for_latin1(tmp_path):
    payload = {b"data": RunsCode(codecs.encode, "abc", "rot13")}
    path = write_pickle(tmp_path / "data_batch_1", payload)
    with pytest.raises(DataError, match="refused"):
        data.read_batch(path)


# --------------------------------------------------------------------------- binary format


@pytest.fixture(scope="module")
def bin_root(tmp_path_factory):
    """A folder holding a generated cifar-10-batches-bin, and the batches written to it."""
    root = tmp_path_factory.mktemp("bin")
    folder = root / data.BIN_FOLDER
    folder.mkdir()
    batches = {}
    for i, name in enumerate(data.BATCH_NAMES):
        X, y = random_batch(10 + i)
        records = np.empty((N, 3073), np.uint8)
        records[:, 0], records[:, 1:] = y, X
        records.tofile(folder / f"{name}.bin")
        batches[name] = (X, y)
    return root, batches


def test_binary_format(bin_root):
    root, batches = bin_root
    assert data.find_data_dir(root) == root / data.BIN_FOLDER
    loaded = data.load_batches(root)
    for name, (X, y) in batches.items():
        np.testing.assert_array_equal(loaded[name][0], X)
        np.testing.assert_array_equal(loaded[name][1], y)
    d = data.load_cifar10(root, protocol="single", subset=500, download=False)
    np.testing.assert_array_equal(d.y_val, batches["data_batch_2"][1][:500])


def folder_with_truncated(tmp_path, source: Path, broken: str) -> Path:
    """A batches folder of symbolic links to the files of ``source``, except ``broken``:
    a copy of the first half of it."""
    folder = tmp_path / source.name
    folder.mkdir()
    for path in source.iterdir():
        if path.name == broken:
            (folder / broken).write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        else:
            (folder / path.name).symlink_to(path)
    return folder


@pytest.mark.cifar
def test_subset_run_validates_all_six_batches(cifar_dir, tmp_path, capsys):
    """A --subset run decodes data_batch_1, data_batch_5 and test_batch only; the others
    are checked without decoding, so a truncated data_batch_3 is still an error."""
    folder = folder_with_truncated(tmp_path, cifar_dir, "data_batch_3")
    with pytest.raises(DataError, match=r"data_batch_3: truncated or corrupt pickle") as err:
        data.load_cifar10(folder, subset=500, download=False)
    assert "\n" not in str(err.value)
    assert cli.main(["train", "--data-dir", str(folder), "--subset", "500", "--n-s", "5",
                     "--cycles", "1", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{folder / 'data_batch_3'}: truncated" in err


def test_subset_run_validates_all_six_binary_batches(tmp_path, bin_root):
    folder = folder_with_truncated(tmp_path, bin_root[0] / data.BIN_FOLDER, "data_batch_3.bin")
    with pytest.raises(DataError, match=r"data_batch_3\.bin: is 15365000 bytes, expected"):
        data.load_cifar10(folder.parent, protocol="single", subset=10, download=False)


def test_binary_truncated_and_bad_label(tmp_path, bin_root):
    good = bin_root[0] / data.BIN_FOLDER / "test_batch.bin"
    raw = good.read_bytes()
    short = tmp_path / "test_batch.bin"
    short.write_bytes(raw[:-100])
    with pytest.raises(DataError, match=r"test_batch\.bin.*bytes, expected 30730000"):
        data.read_batch(short)
    bad = bytearray(raw)
    bad[3073 * 5] = 200  # label byte of record 5
    short.write_bytes(bytes(bad))
    with pytest.raises(DataError, match=r"test_batch\.bin.*outside 0\.\.9"):
        data.read_batch(short)


# --------------------------------------------------------------------------- command line


def test_cli_reports_corrupt_data_without_traceback(tmp_path, capsys):
    write_fake_folder(tmp_path / data.PY_FOLDER, content=b"not a pickle")
    assert cli.main(["data", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "data_batch_1" in err and "Traceback" not in err
