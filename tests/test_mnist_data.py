"""Tests of latticeflow.mnist (files, protocol, baseline, the CLI): IDX parsing, checksums, download, the MAF
protocol, bits/dim."""

from __future__ import annotations

import gzip
import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from latticeflow import mnist
from latticeflow.mnist import (
    DequantizedBatches,
    GaussianBaseline,
    MNISTDownloadError,
    MNISTFormatError,
    dequantize,
    download_mnist,
    inverse_logit_transform,
    load_idx,
    load_mnist,
    logit_to_pixels,
    logit_transform,
    nll_logit_to_bits_per_dim,
    split_train_validation,
    tile_images,
    train_validation_indices,
    verify_checksums,
)

SHARED_MNIST = Path(__file__).parents[1] / ".." / "shared" / "data" / "mnist"
NAMES = mnist.MNIST_FILES


# ---------------------------------------------------------------------------------------------
# Helpers: write tiny IDX files ourselves
# ---------------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    array = np.asarray(array, dtype=np.uint8)
    if magic is None:
        magic = 0x00000800 + array.ndim
    header = magic.to_bytes(4, "big") + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.tobytes()


def write(path: Path, data: bytes, gz: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def tiny(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Five training and three test images of 28x28 with labels."""
    return {
        "train_images": rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8),
        "train_labels": np.array([5, 0, 4, 1, 9], dtype=np.uint8),
        "test_images": rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8),
        "test_labels": np.array([7, 2, 1], dtype=np.uint8),
    }


def write_set(directory: Path, arrays: dict[str, np.ndarray], gz: bool = True) -> dict[str, Path]:
    return {role: write(directory / NAMES[role], idx_bytes(arrays[role]), gz) for role in NAMES}


@pytest.fixture
def tiny_md5(tiny: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point the checksum table at the tiny files (the real MD5s are for the real MNIST)."""
    table = {NAMES[role]: hashlib.md5(idx_bytes(tiny[role])).hexdigest() for role in NAMES}
    monkeypatch.setattr(mnist.files, "MNIST_MD5", table)  # where download and verify read it
    return table


# ---------------------------------------------------------------------------------------------
# IDX parsing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_load_idx_round_trip(tmp_path: Path, tiny: dict[str, np.ndarray], gz: bool) -> None:
    images = write(tmp_path / "img-idx3-ubyte", idx_bytes(tiny["train_images"]), gz)
    labels = write(tmp_path / "lab-idx1-ubyte", idx_bytes(tiny["train_labels"]), gz)
    got = load_idx(images)
    assert got.dtype == np.uint8 and got.shape == (5, 28, 28)
    np.testing.assert_array_equal(got, tiny["train_images"])
    np.testing.assert_array_equal(load_idx(labels, magic=0x801), tiny["train_labels"])
    got[0, 0, 0] = 1  # the array is writable (torch.from_numpy warns on read-only buffers)


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_round_trip(tmp_path: Path, tiny: dict[str, np.ndarray], gz: bool) -> None:
    write_set(tmp_path, tiny, gz)
    data = load_mnist(tmp_path)
    assert data.directory == tmp_path and data.image_shape == (28, 28)
    assert data.train_images.shape == (5, 784) and data.test_images.shape == (3, 784)
    # flattening is row-major: pixel (row, col) sits at index row*28 + col
    assert data.train_images[2, 3 * 28 + 17] == tiny["train_images"][2, 3, 17]
    for role in NAMES:
        np.testing.assert_array_equal(getattr(data, role).reshape(tiny[role].shape), tiny[role])


def test_torchvision_layout_found(tmp_path: Path, tiny: dict[str, np.ndarray]) -> None:
    write_set(tmp_path / "MNIST" / "raw", tiny, gz=False)
    data = load_mnist(tmp_path)
    assert data.directory == tmp_path / "MNIST" / "raw"
    np.testing.assert_array_equal(data.test_labels, tiny["test_labels"])


def test_default_search_uses_cwd_data(tmp_path: Path, tiny: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    write_set(tmp_path / "data", tiny, gz=True)
    monkeypatch.chdir(tmp_path)
    data = load_mnist()
    assert data.directory.resolve() == (tmp_path / "data").resolve()
    np.testing.assert_array_equal(data.train_labels, tiny["train_labels"])


def test_missing_files_message(tmp_path: Path, tiny: dict[str, np.ndarray]) -> None:
    write(tmp_path / NAMES["train_images"], idx_bytes(tiny["train_images"]), gz=True)
    with pytest.raises(FileNotFoundError) as err:
        load_mnist(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and str(tmp_path / "MNIST" / "raw") in message
    assert "t10k-labels-idx1-ubyte" in message and "train-images-idx3-ubyte[" not in message
    assert "python -m latticeflow.mnist --download" in message and "data/" in message


def _corrupt_cases(tiny: dict[str, np.ndarray]) -> dict[str, tuple[bytes, bool, str]]:
    """name -> (file content, whether the content is already the .gz bytes, expected message part)."""
    good = idx_bytes(tiny["train_images"])
    packed = gzip.compress(good)
    flipped = bytearray(packed)
    flipped[len(flipped) // 2] ^= 0xFF
    return {
        "wrong magic": (idx_bytes(tiny["train_images"], magic=0x00000804), False, "bad magic number 0x00000804"),
        "labels magic": (idx_bytes(tiny["train_labels"]), False, "should hold images"),
        "truncated data": (good[:-100], False, "truncated"),
        "truncated header": (good[:10], False, "truncated header"),
        "tiny file": (good[:3], False, "truncated header"),
        "trailing bytes": (good + b"\x00", False, "trailing bytes"),
        "not gzip": (b"this is not a gzip stream at all", True, "corrupt gzip"),
        "truncated gzip": (packed[: len(packed) // 2], True, "corrupt gzip"),
        "flipped gzip byte": (bytes(flipped), True, "corrupt gzip"),
    }


@pytest.mark.parametrize(
    "case",
    ["wrong magic", "labels magic", "truncated data", "truncated header", "tiny file", "trailing bytes",
     "not gzip", "truncated gzip", "flipped gzip byte"],
)
def test_corrupt_file_raises_naming_file(tmp_path: Path, tiny: dict[str, np.ndarray], case: str) -> None:
    content, packed, expected = _corrupt_cases(tiny)[case]
    paths = write_set(tmp_path, tiny, gz=False)
    bad = paths["train_images"]
    if packed:
        bad.unlink()
        bad = bad.with_name(bad.name + ".gz")
    bad.write_bytes(content)
    with pytest.raises(MNISTFormatError) as err:
        load_mnist(tmp_path)
    assert str(bad) in str(err.value) and expected in str(err.value)
    assert isinstance(err.value, ValueError)
    if case != "labels magic":  # load_idx alone accepts any MNIST kind
        with pytest.raises(MNISTFormatError, match="train-images-idx3-ubyte"):
            load_idx(bad)


def test_count_mismatch_names_both_files(tmp_path: Path, tiny: dict[str, np.ndarray]) -> None:
    tiny = dict(tiny, train_labels=tiny["train_labels"][:4])
    paths = write_set(tmp_path, tiny, gz=True)
    with pytest.raises(MNISTFormatError) as err:
        load_mnist(tmp_path)
    message = str(err.value)
    assert str(paths["train_images"]) in message and str(paths["train_labels"]) in message
    assert "5 images" in message and "4 labels" in message


def test_bad_label_and_shape_mismatch(tmp_path: Path, tiny: dict[str, np.ndarray]) -> None:
    write_set(tmp_path / "a", dict(tiny, test_labels=np.array([7, 12, 1], dtype=np.uint8)))
    with pytest.raises(MNISTFormatError, match="label 12 outside"):
        load_mnist(tmp_path / "a")
    write_set(tmp_path / "b", dict(tiny, test_images=tiny["test_images"][:, :27, :]))
    with pytest.raises(MNISTFormatError, match=r"\(28, 28\) images but .* holds \(27, 28\)"):
        load_mnist(tmp_path / "b")


# ---------------------------------------------------------------------------------------------
# Checksums and download (file:// mirrors, no internet)
# ---------------------------------------------------------------------------------------------


def test_real_md5_table_is_the_published_one() -> None:
    assert mnist.MNIST_MD5 == {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    }


def test_verify_checksums(tmp_path: Path, tiny: dict[str, np.ndarray], tiny_md5: dict[str, str]) -> None:
    paths = write_set(tmp_path, tiny, gz=True)
    assert verify_checksums(tmp_path) == {name: True for name in NAMES.values()}
    assert load_mnist(tmp_path, verify=True).train_images.shape == (5, 784)
    # same header and size, one pixel changed: only the MD5 can tell
    changed = tiny["test_images"].copy()
    changed[0, 0, 0] ^= 1
    write(tmp_path / NAMES["test_images"], idx_bytes(changed), gz=True)
    ok = verify_checksums(tmp_path)
    assert ok == {name: name != NAMES["test_images"] for name in NAMES.values()}
    load_mnist(tmp_path)  # still loads without verify
    with pytest.raises(MNISTFormatError, match=f"{paths['test_images']}: MD5"):
        load_mnist(tmp_path, verify=True)


def test_main_verify_exit_codes(tmp_path: Path, tiny: dict[str, np.ndarray], tiny_md5: dict[str, str],
                                capsys: pytest.CaptureFixture[str]) -> None:
    write_set(tmp_path, tiny, gz=True)
    assert mnist.main(["--verify", "--data-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("OK ") == 4
    write(tmp_path / NAMES["train_labels"], idx_bytes(tiny["train_labels"][::-1]), gz=True)
    assert mnist.main(["--verify", "--data-dir", str(tmp_path)]) == 1
    assert "BAD" in capsys.readouterr().out
    assert mnist.main(["--verify", "--data-dir", str(tmp_path / "nowhere")]) == 1
    assert "--download" in capsys.readouterr().err


def test_download_from_file_mirror(tmp_path: Path, tiny: dict[str, np.ndarray], tiny_md5: dict[str, str]) -> None:
    source = tmp_path / "mirror"
    write_set(source, tiny, gz=True)
    dead = (tmp_path / "no-such-mirror").as_uri() + "/"
    target = tmp_path / "data"
    assert download_mnist(target, mirrors=[dead, source.as_uri()]) == target
    assert sorted(p.name for p in target.iterdir()) == sorted(f"{n}.gz" for n in NAMES.values())  # no temp files
    assert verify_checksums(target) == {name: True for name in NAMES.values()}
    np.testing.assert_array_equal(load_mnist(target).test_labels, tiny["test_labels"])
    # present and verified files are kept: no mirror is contacted
    download_mnist(target, mirrors=[dead])


def test_download_replaces_bad_file(tmp_path: Path, tiny: dict[str, np.ndarray], tiny_md5: dict[str, str]) -> None:
    source = tmp_path / "mirror"
    write_set(source, tiny, gz=True)
    target = tmp_path / "data"
    write_set(target, tiny, gz=False)  # unpacked copies, which load_mnist prefers over .gz
    (target / NAMES["train_labels"]).write_bytes(b"garbage")
    download_mnist(target, mirrors=[source.as_uri()])
    assert verify_checksums(target) == {name: True for name in NAMES.values()}
    np.testing.assert_array_equal(load_mnist(target).train_labels, tiny["train_labels"])


def test_download_failure_lists_mirrors(tmp_path: Path, tiny: dict[str, np.ndarray], tiny_md5: dict[str, str]) -> None:
    wrong = tmp_path / "wrong"
    write_set(wrong, dict(tiny, train_images=tiny["train_images"][::-1]), gz=True)  # right size, wrong content
    dead = (tmp_path / "no-such-mirror").as_uri()
    target = tmp_path / "data"
    with pytest.raises(MNISTDownloadError) as err:
        download_mnist(target, mirrors=[dead, wrong.as_uri()])
    message = str(err.value)
    assert "train-images-idx3-ubyte.gz" in message
    assert f"{dead}/train-images-idx3-ubyte.gz: URLError" in message
    assert f"{wrong.as_uri()}/train-images-idx3-ubyte.gz: MD5 of the unpacked content" in message
    assert tiny_md5["train-images-idx3-ubyte"] in message
    assert list(target.iterdir()) == []  # nothing half-written left behind


def test_interrupted_download_leaves_no_partial_file(
    tmp_path: Path, tiny: dict[str, np.ndarray], tiny_md5: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "mirror"
    write_set(source, tiny, gz=True)
    target = tmp_path / "data"

    def fail(*args: object) -> None:
        raise KeyboardInterrupt  # e.g. Ctrl-C between writing and renaming

    monkeypatch.setattr(mnist.files.os, "replace", fail)
    with pytest.raises(KeyboardInterrupt):
        download_mnist(target, mirrors=[source.as_uri()])
    assert list(target.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Protocol: split, dequantisation, logit transform
# ---------------------------------------------------------------------------------------------


def test_split_sizes_and_determinism() -> None:
    images = np.arange(60000)
    train, validation = split_train_validation(images)
    assert train.shape == (50000,) and validation.shape == (10000,)
    assert len(np.intersect1d(train, validation)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, validation])), images)
    again_train, again_validation = split_train_validation(images, seed=0)
    np.testing.assert_array_equal(train, again_train)
    np.testing.assert_array_equal(validation, again_validation)
    _, other = split_train_validation(images, seed=1)
    assert not np.array_equal(validation, other)
    # the split is a numpy Generator permutation with the given seed
    np.testing.assert_array_equal(validation, np.sort(np.random.default_rng(0).permutation(60000)[:10000]))
    # seed=None: the last 10000, as in deeplearning.net's mnist.pkl.gz used by the MAF code
    last_train, last_validation = split_train_validation(images, seed=None)
    np.testing.assert_array_equal(last_validation, np.arange(50000, 60000))
    np.testing.assert_array_equal(last_train, np.arange(50000))


def test_split_tensor_and_labels_follow() -> None:
    images = torch.arange(20).reshape(10, 2)
    labels = np.arange(10) * 100
    train, validation = split_train_validation(images, n_validation=3, seed=5)
    train_idx, val_idx = train_validation_indices(10, 3, seed=5)
    assert isinstance(train, torch.Tensor) and train.shape == (7, 2) and validation.shape == (3, 2)
    np.testing.assert_array_equal(validation[:, 0].numpy() // 2 * 100, labels[val_idx])
    np.testing.assert_array_equal(train[:, 0].numpy() // 2, train_idx)
    with pytest.raises(ValueError, match="n_validation must be <= n=10, got n_validation=11"):
        split_train_validation(images, n_validation=11)


def test_dequantize_range_and_floor() -> None:
    pixels = torch.arange(256, dtype=torch.uint8).repeat(40, 1)
    for dtype in (torch.float64, torch.float32):
        u = dequantize(pixels, torch.Generator().manual_seed(0), dtype=dtype)
        assert u.dtype == dtype and u.shape == pixels.shape
        assert u.min() >= 0 and u.max() < 1
        torch.testing.assert_close(torch.floor(256 * u).to(torch.uint8), pixels, rtol=0, atol=0)
    # noise fills each bin: mean of (u*256 - pixel) is 1/2 with std 1/sqrt(12*N)
    assert abs((256 * u.double() - pixels).mean().item() - 0.5) < 5 / math.sqrt(12 * pixels.numel())
    with pytest.raises(TypeError, match="dtype uint8"):
        dequantize(pixels.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dequantize_noise_near_one_stays_in_bin(dtype: torch.dtype) -> None:
    # regression: (pixel + n)/256 with n = 1 - 2**-53 rounds up to (pixel + 1)/256, i.e. the next
    # pixel bin, and to exactly 1.0 for pixel 255 (in float32 already for n = 1 - 2**-24)
    pixels = torch.tensor([0, 1, 100, 254, 255], dtype=torch.uint8)
    for n in (1 - 2.0**-53, 1 - 2.0**-24):
        u = mnist.protocol._dequantize_with_noise(pixels, torch.full((5,), n, dtype=torch.float64), dtype)
        assert (u < 1).all()
        torch.testing.assert_close(torch.floor(256 * u).to(torch.uint8), pixels, rtol=0, atol=0)
        torch.testing.assert_close(u.double(), (pixels.double() + 1) / 256, rtol=0, atol=2e-7)


def test_fresh_and_fixed_noise() -> None:
    pixels = torch.randint(0, 256, (30, 16), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    # training: the same generator gives new noise each pass, and a new order
    train = DequantizedBatches(pixels, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert len(train) == 5 and [len(y) for y, _ in train] == [7, 7, 7, 7, 2]
    first = torch.cat([y for y, _ in train])
    second = torch.cat([y for y, _ in train])
    assert not torch.equal(first, second)
    assert not torch.equal(torch.sort(first, 0).values, torch.sort(second, 0).values)  # new noise, not just order
    # every image of a pass is a dequantised image of the data
    recovered = logit_to_pixels(first)
    assert sorted(map(tuple, recovered.tolist())) == sorted(map(tuple, pixels.tolist()))
    # evaluation: fixed noise, same every pass, same for every batch size, in data order
    test = DequantizedBatches(pixels, 7, seed=11, dtype=torch.float64)
    a = torch.cat([y for y, _ in test])
    b = torch.cat([y for y, _ in test])
    c = torch.cat([y for y, _ in DequantizedBatches(pixels, 30, seed=11, dtype=torch.float64)])
    assert torch.equal(a, b) and torch.equal(a, c)
    torch.testing.assert_close(logit_to_pixels(a), pixels, rtol=0, atol=0)
    d = torch.cat([y for y, _ in DequantizedBatches(pixels, 7, seed=12, dtype=torch.float64)])
    assert not torch.equal(a, d)
    # log_det travels with y
    for y, log_det in test:
        torch.testing.assert_close(log_det, logit_transform(inverse_logit_transform(y))[1])
    with pytest.raises(ValueError, match="exactly one of generator"):
        DequantizedBatches(pixels, 7)
    with pytest.raises(ValueError, match="exactly one of generator"):
        DequantizedBatches(pixels, 7, generator=torch.Generator(), seed=1)
    assert len(DequantizedBatches(pixels, 7, seed=0, drop_last=True)) == 4


def test_logit_log_det_against_autograd() -> None:
    g = torch.Generator().manual_seed(0)
    u = torch.rand(4, 6, generator=g, dtype=torch.float64)
    u[0, 0], u[1, 1] = 0.0, 1.0 - 2.0**-53  # the ends of [0, 1): lam keeps y finite
    for lam in (1e-6, 0.05):
        y, log_det = logit_transform(u, lam)
        assert y.shape == (4, 6) and log_det.shape == (4,) and torch.isfinite(y).all()
        for b in range(4):
            jac = torch.autograd.functional.jacobian(lambda v: logit_transform(v, lam)[0], u[b])
            torch.testing.assert_close(log_det[b], torch.linalg.slogdet(jac).logabsdet)
        # closed form at u = 1/2: y = 0, dy/du = 4 (1 - 2 lam)
        y_half, log_det_half = logit_transform(torch.full((3,), 0.5, dtype=torch.float64), lam)
        torch.testing.assert_close(y_half, torch.zeros(3, dtype=torch.float64))
        torch.testing.assert_close(log_det_half, torch.tensor(3 * math.log(4 * (1 - 2 * lam)), dtype=torch.float64))
        torch.testing.assert_close(inverse_logit_transform(y, lam), u, rtol=0, atol=1e-9)
    assert logit_transform(u)[0][0, 0].item() == pytest.approx(math.log(1e-6 / (1 - 1e-6)))


def test_pixels_round_trip() -> None:
    pixels = torch.arange(256, dtype=torch.uint8).repeat(8, 1)
    y, _ = logit_transform(dequantize(pixels, torch.Generator().manual_seed(5)))
    torch.testing.assert_close(logit_to_pixels(y), pixels, rtol=0, atol=0)
    assert logit_to_pixels(torch.tensor([-1e3, 1e3], dtype=torch.float64)).tolist() == [0, 255]


def test_tile_images() -> None:
    pixels = torch.arange(5, dtype=torch.uint8).repeat_interleave(4).reshape(5, 4)  # five 2x2 images
    grid = tile_images(pixels, n_cols=3, image_shape=(2, 2), pad=1)
    assert grid.shape == (5, 8)
    assert grid[0, 0] == 0 and grid[0, 3] == 1 and grid[1, 7] == 2 and grid[3, 0] == 3 and grid[4, 4] == 4
    assert grid[2].sum() == 0 and grid[:, 2].sum() == 0  # padding
    with pytest.raises(ValueError, match=r"shape \(B, 4\)"):
        tile_images(pixels[:, :3], image_shape=(2, 2))


# ---------------------------------------------------------------------------------------------
# Bits per dimension
# ---------------------------------------------------------------------------------------------


def test_bits_per_dim_uniform_is_eight() -> None:
    # uniform on u: p_U = 1, i.e. log p_Y(y) = -log_det; the discrete model is uniform on 256 values
    D = 784
    pixels = torch.randint(0, 256, (10, D), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    y, log_det = logit_transform(dequantize(pixels, torch.Generator().manual_seed(1)))
    bpd = nll_logit_to_bits_per_dim(-log_det, log_det, D)
    torch.testing.assert_close(bpd, torch.full((10,), 8.0, dtype=torch.float64))
    assert nll_logit_to_bits_per_dim(0.0, 0.0, 1) == pytest.approx(8.0)


def test_bits_per_dim_piecewise_constant_model_is_exact() -> None:
    # A density on u that is constant on each pixel bin, p_U(u) = prod_i 256 q(floor(256 u_i)),
    # is exactly the discrete model q on pixel values: bits/dim = mean of -log2 q(pixel), for any noise.
    D = 5
    q = torch.softmax(torch.randn(256, generator=torch.Generator().manual_seed(2), dtype=torch.float64), 0)
    pixels = torch.randint(0, 256, (50, D), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    u = dequantize(pixels, torch.Generator().manual_seed(4))
    y, log_det = logit_transform(u)
    log_p_u = (math.log(256.0) + torch.log(q[pixels.long()])).sum(-1)
    logp_y = log_p_u - log_det  # change of variables u -> y
    bpd = nll_logit_to_bits_per_dim(logp_y, log_det, D)
    torch.testing.assert_close(bpd, -torch.log2(q[pixels.long()]).mean(-1))


def test_paper_numbers() -> None:
    assert mnist.PAPER_TEST_NLL == {
        "MADE": (1380.8, 4.8),
        "Real NVP": (1323.2, 6.6),
        "MAF": (1300.5, 1.7),
        "MA flow": (1255.5, 2.0),
    }


# ---------------------------------------------------------------------------------------------
# Gaussian baseline
# ---------------------------------------------------------------------------------------------


def test_gaussian_baseline_matches_scipy(rng: np.random.Generator) -> None:
    D, N = 5, 400
    A = rng.normal(size=(D, D))
    y = torch.from_numpy(rng.normal(size=(N, D)) @ A.T + rng.normal(size=D))
    model = GaussianBaseline.fit(y, ridge=0.0)
    np.testing.assert_allclose(model.mean.numpy(), y.numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(model.covariance.numpy(), np.cov(y.numpy().T, bias=True), rtol=1e-10)
    test = torch.from_numpy(rng.normal(size=(7, D)))
    expected = multivariate_normal(model.mean.numpy(), model.covariance.numpy()).logpdf(test.numpy())
    np.testing.assert_allclose(model.log_prob(test).numpy(), expected, rtol=1e-10)
    assert model.log_prob(test[0]).shape == ()
    # the MLE maximises the training likelihood: any other covariance scores lower
    other = GaussianBaseline(model.mean, model.covariance * 1.1)
    assert model.log_prob(y).mean() > other.log_prob(y).mean()
    # samples have the fitted moments
    s = model.sample(20000, torch.Generator().manual_seed(0))
    np.testing.assert_allclose(s.mean(0).numpy(), model.mean.numpy(), atol=0.1 * np.sqrt(np.diag(model.covariance.numpy())).max())


def test_gaussian_baseline_ridge_on_singular_data(rng: np.random.Generator) -> None:
    # a constant pixel (and N < D) makes the MLE covariance singular; the ridge keeps it usable
    y = torch.from_numpy(rng.normal(size=(3, 6)))
    y[:, 2] = -13.8
    with pytest.raises(ValueError, match="not positive definite"):
        GaussianBaseline.fit(y, ridge=0.0)
    model = GaussianBaseline.fit(y, ridge=1e-3)
    centred = y - y.mean(0)
    raw = centred.T @ centred / 3
    expected = raw + 1e-3 * torch.trace(raw) / 6 * torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(model.covariance, expected)
    expected_logp = multivariate_normal(model.mean.numpy(), expected.numpy()).logpdf(y.numpy())
    np.testing.assert_allclose(model.log_prob(y).numpy(), expected_logp, rtol=1e-9)


# ---------------------------------------------------------------------------------------------
# The real MNIST, where this workplace has it
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_mnist() -> mnist.MNIST:
    if not SHARED_MNIST.is_dir():
        pytest.skip(f"no shared MNIST copy at {SHARED_MNIST} (only on the project's machines)")
    return load_mnist(SHARED_MNIST)


def test_real_mnist_files(real_mnist: mnist.MNIST) -> None:
    assert real_mnist.train_images.shape == (60000, 784) and real_mnist.train_labels.shape == (60000,)
    assert real_mnist.test_images.shape == (10000, 784) and real_mnist.test_labels.shape == (10000,)
    assert real_mnist.train_images.dtype == np.uint8 and real_mnist.image_shape == (28, 28)
    assert real_mnist.train_labels[0] == 5 and real_mnist.test_labels[0] == 7
    assert np.bincount(real_mnist.test_labels, minlength=10).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert verify_checksums(SHARED_MNIST) == {name: True for name in NAMES.values()}


def test_real_mnist_protocol(real_mnist: mnist.MNIST) -> None:
    splits = mnist.protocol_splits(SHARED_MNIST)
    assert {k: tuple(v.shape) for k, v in splits.items()} == {
        "train": (50000, 784), "validation": (10000, 784), "test": (10000, 784)
    }
    y, log_det = DequantizedBatches(splits["test"][:500], seed=0, dtype=torch.float64).fixed()
    torch.testing.assert_close(logit_to_pixels(y), splits["test"][:500], rtol=0, atol=0)
    # mostly-black images: log_det per pixel near E[-log u] = ln 256 + 1 for a black pixel
    assert 5.5 < log_det.mean().item() / 784 < 6.5


# ---------------------------------------------------------------------------------------------
# The package: its public names and its command line
# ---------------------------------------------------------------------------------------------


def test_the_package_keeps_every_name_of_the_old_module() -> None:
    # regression: latticeflow/mnist.py became the package latticeflow/mnist/; code importing these kept working
    old = ["DEFAULT_MIRRORS", "DequantizedBatches", "GaussianBaseline", "LAMBDA", "MNIST", "MNISTDownloadError",
           "MNISTFormatError", "MNIST_FILES", "MNIST_MD5", "PAPER_TEST_NLL", "Whitening", "default_data_dir",
           "dequantize", "download_mnist", "find_mnist_dir", "inverse_logit_transform", "load_idx", "load_mnist",
           "logit_to_pixels", "logit_transform", "main", "nll_logit_to_bits_per_dim", "protocol_splits",
           "split_train_validation", "tile_images", "train_validation_indices", "verify_checksums"]
    assert set(old) <= set(mnist.__all__)
    for name in mnist.__all__:
        assert getattr(mnist, name) is not None, name
    assert mnist.main is mnist.__main__.main


def test_python_dash_m_runs_the_command_line_without_warnings() -> None:
    import subprocess
    import sys

    repo = Path(mnist.__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-W", "error", "-m", "latticeflow.mnist"], cwd=repo, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]  # no action: the help and status 2
    assert "--download" in proc.stdout and "--baseline" in proc.stdout and proc.stderr == ""
