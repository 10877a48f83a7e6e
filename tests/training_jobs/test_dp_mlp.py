"""Tests for the pure-numpy parts of training_jobs/dp_mlp/train.py (no MPI needed)."""

import importlib.util
import os
import re
from pathlib import Path

import numpy as np
import pytest

TRAIN_PY = Path(__file__).resolve().parents[2] / "training_jobs" / "dp_mlp" / "train.py"
STEP_LINE = re.compile(r"^step (\d+)/(\d+) loss (\d+\.\d+) samples/s (\d+\.\d+)$")


def load_train_module():
    # training_jobs is not a package, so load the script straight from its path.
    spec = importlib.util.spec_from_file_location("dp_mlp_train", TRAIN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train = load_train_module()


class SingleRankComm:
    """The subset of mpi4py's Comm that train() uses, for a world of one rank."""

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1

    def Allreduce(self, sendbuf, recvbuf):
        recvbuf[...] = sendbuf

    def gather(self, obj, root=0):
        return [obj]

    def bcast(self, obj, root=0):
        return obj


def run_training(argv):
    lines = []
    result = train.train(SingleRankComm(), train.parse_args(argv), log=lines.append)
    return result, lines


def step_losses(lines):
    return [float(m.group(3)) for m in map(STEP_LINE.match, lines) if m]


def test_module_imports_without_mpi4py():
    assert "mpi4py" not in train.__dict__


def test_backward_matches_finite_differences():
    rng = np.random.default_rng(0)
    shapes = train.param_shapes(n_in=3, n_hidden=5, n_out=4)
    params = train.init_params(seed=1, shapes=shapes)
    params["b1"] += rng.normal(0, 0.1, shapes["b1"])  # non-zero biases exercise their grads
    x = rng.normal(size=(7, 3))
    y = rng.integers(0, 4, 7)

    _, grads = train.loss_and_grads(params, x, y)
    eps = 1e-6
    for name in train.PARAM_NAMES:
        numeric = np.zeros_like(params[name])
        for i in np.ndindex(params[name].shape):
            saved = params[name][i]
            params[name][i] = saved + eps
            plus, _ = train.loss_and_grads(params, x, y)
            params[name][i] = saved - eps
            minus, _ = train.loss_and_grads(params, x, y)
            params[name][i] = saved
            numeric[i] = (plus - minus) / (2 * eps)
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-5, atol=1e-8, err_msg=name)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
def test_shards_partition_the_dataset(world_size):
    n = 1001
    shards = [train.shard_indices(n, rank, world_size) for rank in range(world_size)]
    combined = np.concatenate(shards)
    assert len(combined) == n
    assert np.array_equal(np.sort(combined), np.arange(n))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_dataset_is_deterministic_and_uses_all_classes():
    first = train.make_dataset(seed=5, n_train=500, n_test=100)
    second = train.make_dataset(seed=5, n_train=500, n_test=100)
    for a, b in zip(first, second, strict=True):
        assert np.array_equal(a, b)
    x_train, y_train, x_test, y_test = first
    assert x_train.shape == (500, train.N_FEATURES) and x_test.shape == (100, train.N_FEATURES)
    assert set(np.unique(y_train)) == set(range(train.N_CLASSES))


def test_averaged_shard_grads_equal_union_grad():
    x, y, _, _ = train.make_dataset(seed=0, n_train=256, n_test=0)
    params = train.init_params(seed=0)
    shard_grads = []
    for rank in range(2):
        idx = train.shard_indices(len(x), rank, 2)
        _, grads = train.loss_and_grads(params, x[idx], y[idx])
        shard_grads.append(train.flatten(grads))
    _, union_grads = train.loss_and_grads(params, x, y)
    np.testing.assert_allclose((shard_grads[0] + shard_grads[1]) / 2, train.flatten(union_grads), rtol=1e-10)


def test_flatten_unflatten_round_trip_shares_memory():
    shapes = train.param_shapes()
    params = train.init_params(seed=3, shapes=shapes)
    flat = train.flatten(params)
    views = train.unflatten(flat, shapes)
    for name in train.PARAM_NAMES:
        assert np.array_equal(views[name], params[name])
    flat += 1.0  # the training loop relies on in-place updates reaching the views
    assert np.array_equal(views["W2"], params["W2"] + 1.0)
    with pytest.raises(ValueError):
        train.unflatten(flat[:-1], shapes)


def test_host_line_format():
    class FourRanksOnRoot(SingleRankComm):
        def gather(self, obj, root=0):
            return [(2, "node1"), (0, "node0"), (3, "node1"), (1, "node0")]

    assert train.host_line(FourRanksOnRoot()) == "ranks: 0@node0 1@node0 2@node1 3@node1"


def test_single_process_training_reduces_loss_and_checkpoints(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    result, lines = run_training(["--steps", "120", "--checkpoint-every", "50", "--checkpoint-dir", str(ckpt_dir)])

    # A rank says when it runs inside a container (as it does in every trainrig run; tests may too).
    where = train.socket.gethostname() + ("/container" if train.os.path.exists("/.dockerenv") else "")
    assert lines[0] == f"ranks: 0@{where}"
    assert lines[1] == "world_size: 1"
    losses = step_losses(lines)
    assert len(losses) == 12
    assert losses[-1] < 0.5 * losses[0]
    assert result["accuracy"] > 0.6  # chance is 1 / N_CLASSES
    assert lines[-3:] == [
        f"final loss {result['loss']:.6f}",
        f"checkpoint {ckpt_dir / 'ckpt-step120.npz'}",
        f"accuracy {result['accuracy']:.4f}",
    ]
    assert sorted(os.listdir(ckpt_dir)) == ["ckpt-step100.npz", "ckpt-step120.npz", "ckpt-step50.npz", "latest"]
    assert (ckpt_dir / "latest").read_text().strip() == "ckpt-step120.npz"
    with np.load(ckpt_dir / "ckpt-step120.npz") as data:
        assert int(data["step"]) == 120
        assert data["W1"].shape == train.param_shapes()["W1"]


def test_resume_continues_the_same_trajectory(tmp_path):
    straight, _ = run_training(["--steps", "80", "--checkpoint-dir", str(tmp_path / "a")])

    run_training(["--steps", "40", "--checkpoint-dir", str(tmp_path / "b")])
    resumed, lines = run_training(["--steps", "80", "--resume", "--checkpoint-dir", str(tmp_path / "b")])

    assert "resumed from step 40" in lines
    assert [int(STEP_LINE.match(line).group(1)) for line in lines if STEP_LINE.match(line)] == [50, 60, 70, 80]
    assert resumed["loss"] == pytest.approx(straight["loss"], rel=1e-12)
    with np.load(tmp_path / "a" / "ckpt-step80.npz") as a, np.load(tmp_path / "b" / "ckpt-step80.npz") as b:
        for name in train.PARAM_NAMES:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-12)


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    result, lines = run_training(["--steps", "10", "--resume", "--checkpoint-dir", str(tmp_path)])
    assert not any(line.startswith("resumed") for line in lines)
    assert result["step"] == 10


def test_checkpoint_dir_defaults_to_env(monkeypatch):
    monkeypatch.setenv("TRAINRIG_CHECKPOINT_DIR", "/some/where")
    assert train.parse_args([]).checkpoint_dir == "/some/where"
    monkeypatch.delenv("TRAINRIG_CHECKPOINT_DIR")
    assert train.parse_args([]).checkpoint_dir == "./checkpoints"


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--batch-size", "-1"], ["--lr", "0"], ["--steps", "x"]])
def test_bad_arguments_exit_with_usage_error(argv):
    with pytest.raises(SystemExit) as info:
        train.parse_args(argv)
    assert info.value.code == 2
