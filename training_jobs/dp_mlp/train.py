"""Data-parallel MLP training on a synthetic classification task with mpi4py + numpy.

Run under OpenMPI, e.g.::

    mpirun -n 4 python3 train.py --steps 300 --checkpoint-dir /tmp/ckpt

Every rank builds the same synthetic dataset, trains on its own shard, and
averages gradients with a single ``Allreduce`` per step, so all ranks apply the
same SGD update and their parameters stay identical.  Rank 0 logs, checkpoints
and evaluates.

The math (dataset, forward/backward, flattening, sharding, checkpoint I/O) is in
plain functions that need only numpy; ``mpi4py`` is imported inside ``main()`` so
the module can be imported and unit-tested without MPI.
"""

import argparse
import os
import socket
import sys
import tempfile
import time

import numpy as np

N_FEATURES = 16
N_CLASSES = 4
N_HIDDEN = 64
N_TRAIN = 16384
N_TEST = 4096
CLUSTERS_PER_CLASS = 3
CLUSTER_SEPARATION = 5.0
MOMENTUM = 0.9
PARAM_NAMES = ("W1", "b1", "W2", "b2")
LATEST_FILE = "latest"


# ---------------------------------------------------------------- arguments


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="total optimizer steps")
    parser.add_argument("--batch-size", type=int, default=64, help="minibatch size per rank")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")
    parser.add_argument(
        "--checkpoint-dir",
        default=os.environ.get("TRAINRIG_CHECKPOINT_DIR", "./checkpoints"),
        help="where rank 0 writes checkpoints (default: $TRAINRIG_CHECKPOINT_DIR or ./checkpoints)",
    )
    parser.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    parser.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    parser.add_argument("--seed", type=int, default=0, help="seed for data, init and batches")
    parser.add_argument("--resume", action="store_true", help="continue from <checkpoint-dir>/latest")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.lr > 0:
        parser.error("--lr must be > 0")
    if args.seed < 0:
        parser.error("--seed must be >= 0")
    return args


# ------------------------------------------------------------------ dataset


def make_dataset(seed, n_train=N_TRAIN, n_test=N_TEST):
    """Return (X_train, y_train, X_test, y_test), identical on every rank.

    Each class is a mixture of CLUSTERS_PER_CLASS gaussian blobs at random
    centres, so the classes are not linearly separable (the hidden layer has
    to earn its keep) yet separated enough that loss falls far within a few
    hundred steps.  Train and test share the centres but not the samples.
    """
    rng = np.random.default_rng([seed, 1])
    n_clusters = N_CLASSES * CLUSTERS_PER_CLASS
    # Scaling by 1/sqrt(d) makes the expected centre distance independent of d.
    centres = rng.normal(0.0, CLUSTER_SEPARATION / np.sqrt(N_FEATURES), (n_clusters, N_FEATURES))
    cluster = rng.integers(0, n_clusters, n_train + n_test)
    x = centres[cluster] + rng.normal(0.0, 1.0, (n_train + n_test, N_FEATURES))
    y = cluster % N_CLASSES
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def shard_indices(n_samples, rank, world_size):
    """Indices of the samples owned by ``rank`` (strided, so sizes differ by at most 1)."""
    return np.arange(rank, n_samples, world_size)


def batch_indices(shard_size, batch_size, seed, rank, step):
    """Minibatch for one step; stateless in ``step`` so a resumed run draws the same batches."""
    rng = np.random.default_rng([seed, 2, rank, step])
    return rng.integers(0, shard_size, batch_size)


# -------------------------------------------------------------------- model


def param_shapes(n_in=N_FEATURES, n_hidden=N_HIDDEN, n_out=N_CLASSES):
    return {"W1": (n_in, n_hidden), "b1": (n_hidden,), "W2": (n_hidden, n_out), "b2": (n_out,)}


def init_params(seed, shapes=None):
    shapes = shapes or param_shapes()
    rng = np.random.default_rng([seed, 3])
    params = {}
    for name in PARAM_NAMES:
        shape = shapes[name]
        if len(shape) == 2:
            # Xavier scale keeps tanh units out of saturation at the start.
            params[name] = rng.normal(0.0, np.sqrt(1.0 / shape[0]), shape)
        else:
            params[name] = np.zeros(shape)
    return params


def forward(params, x):
    """Return (logits, hidden activations); the activations are reused by backward."""
    hidden = np.tanh(x @ params["W1"] + params["b1"])
    return hidden @ params["W2"] + params["b2"], hidden


def softmax(logits):
    # Subtracting the row max avoids overflow in exp without changing the result.
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def cross_entropy(probs, y):
    return float(-np.mean(np.log(probs[np.arange(len(y)), y] + 1e-12)))


def loss_and_grads(params, x, y):
    """Mean softmax cross-entropy over the batch and its gradients w.r.t. every parameter."""
    logits, hidden = forward(params, x)
    probs = softmax(logits)
    loss = cross_entropy(probs, y)
    d_logits = probs
    d_logits[np.arange(len(y)), y] -= 1.0
    d_logits /= len(y)
    d_hidden = (d_logits @ params["W2"].T) * (1.0 - hidden**2)
    grads = {
        "W1": x.T @ d_hidden,
        "b1": d_hidden.sum(axis=0),
        "W2": hidden.T @ d_logits,
        "b2": d_logits.sum(axis=0),
    }
    return loss, grads


def accuracy(params, x, y):
    logits, _ = forward(params, x)
    return float(np.mean(logits.argmax(axis=1) == y))


def flatten(arrays):
    """Concatenate the named arrays (in PARAM_NAMES order) into one float64 vector."""
    return np.concatenate([np.ravel(arrays[name]) for name in PARAM_NAMES]).astype(np.float64)


def unflatten(flat, shapes):
    """Split ``flat`` back into named arrays; these are views, so writes go to ``flat``."""
    out, offset = {}, 0
    for name in PARAM_NAMES:
        size = int(np.prod(shapes[name]))
        out[name] = flat[offset : offset + size].reshape(shapes[name])
        offset += size
    if offset != flat.size:
        raise ValueError(f"flat buffer has {flat.size} values, shapes need {offset}")
    return out


# ------------------------------------------------------------ communication


def allreduce_mean(comm, flat):
    """Average ``flat`` over all ranks (mpi4py's Allreduce defaults to MPI.SUM)."""
    total = np.empty_like(flat)
    comm.Allreduce(flat, total)
    return total / comm.Get_size()


def average_grads_and_loss(comm, grads, loss):
    """One Allreduce for gradients and loss together: a single latency hit per step."""
    send = np.append(flatten(grads), loss)
    mean = allreduce_mean(comm, send)
    return mean[:-1], float(mean[-1])


def host_line(comm):
    """``ranks: 0@host ...`` on rank 0, None elsewhere; ``@host/container`` for a rank inside a container."""
    where = socket.gethostname() + ("/container" if os.path.exists("/.dockerenv") else "")
    pairs = comm.gather((comm.Get_rank(), where), root=0)
    if pairs is None:
        return None
    return "ranks: " + " ".join(f"{rank}@{host}" for rank, host in sorted(pairs))


# -------------------------------------------------------------- checkpoints


def checkpoint_name(step):
    return f"ckpt-step{step}.npz"


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(directory, name, write):
    """Call ``write(fileobj)`` on a temp file in ``directory`` then rename it to ``name``.

    Readers (and a crash mid-write) never see a half-written file, because
    os.replace within one directory is atomic.
    """
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fileobj:
            write(fileobj)
        # mkstemp creates 0600; give the file the permissions a plain open() would.
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, os.path.join(directory, name))
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise


def save_checkpoint(directory, step, flat_params, velocity, shapes):
    os.makedirs(directory, exist_ok=True)
    name = checkpoint_name(step)
    arrays = {k: np.array(v) for k, v in unflatten(flat_params, shapes).items()}
    # Momentum is saved too, so a resumed run continues the same trajectory.
    atomic_write(directory, name, lambda f: np.savez(f, step=step, velocity=velocity, **arrays))
    atomic_write(directory, LATEST_FILE, lambda f: f.write((name + "\n").encode()))
    return os.path.join(directory, name)


def load_latest_checkpoint(directory, shapes):
    """Return (step, flat_params, velocity) from ``<directory>/latest``, or None if absent."""
    latest = os.path.join(directory, LATEST_FILE)
    if not os.path.isfile(latest):
        return None
    with open(latest) as fileobj:
        name = fileobj.read().strip()
    with np.load(os.path.join(directory, name)) as data:
        flat = flatten({k: data[k] for k in PARAM_NAMES})
        velocity = data["velocity"] if "velocity" in data.files else np.zeros_like(flat)
        step = int(data["step"])
    if flat.size != sum(int(np.prod(s)) for s in shapes.values()):
        raise ValueError(f"checkpoint {name} does not match the model shape")
    return step, flat, np.asarray(velocity, dtype=np.float64)


# ----------------------------------------------------------------- training


def initial_state(comm, args, shapes):
    """Rank 0 builds or loads the state and broadcasts it.

    Broadcasting (rather than trusting every rank to init identically) also
    covers --resume when the checkpoint dir is only visible on rank 0's host.
    """
    state = None
    if comm.Get_rank() == 0:
        loaded = load_latest_checkpoint(args.checkpoint_dir, shapes) if args.resume else None
        if loaded is None:
            flat = flatten(init_params(args.seed, shapes))
            loaded = (0, flat, np.zeros_like(flat))
        state = loaded
    return comm.bcast(state, root=0)


def shard_mean_loss(comm, params, x, y):
    """Global mean loss over every rank's full shard (used when no step was run)."""
    loss, _ = loss_and_grads(params, x, y)
    return float(allreduce_mean(comm, np.array([loss]))[0])


def local_data(seed, rank, world_size):
    """(x_shard, y_shard, x_test, y_test): this rank's training shard plus the test set."""
    x_train, y_train, x_test, y_test = make_dataset(seed)
    mine = shard_indices(len(x_train), rank, world_size)
    return x_train[mine], y_train[mine], x_test, y_test


def sgd_step(comm, args, step, flat, velocity, x_shard, y_shard, shapes):
    """One data-parallel momentum-SGD step, updating ``flat`` in place; returns the global loss."""
    idx = batch_indices(len(x_shard), args.batch_size, args.seed, comm.Get_rank(), step)
    local_loss, grads = loss_and_grads(unflatten(flat, shapes), x_shard[idx], y_shard[idx])
    mean_grad, loss = average_grads_and_loss(comm, grads, local_loss)
    velocity *= MOMENTUM
    velocity += mean_grad
    flat -= args.lr * velocity
    return loss


class ProgressLog:
    """Emits the ``step i/N loss L samples/s R`` lines, timing throughput between them."""

    def __init__(self, say, args, world_size, start_step):
        self.say, self.args, self.world_size = say, args, world_size
        self.last_step, self.last_time = start_step, time.perf_counter()

    def after(self, step, loss):
        if step % self.args.log_every and step != self.args.steps:
            return
        now = time.perf_counter()
        samples = self.args.batch_size * self.world_size * (step - self.last_step)
        rate = samples / max(now - self.last_time, 1e-9)
        self.say(f"step {step}/{self.args.steps} loss {loss:.6f} samples/s {rate:.1f}")
        self.last_step, self.last_time = step, now


def train(comm, args, log=print):
    """Run the training loop; returns a dict of results on rank 0 (None elsewhere)."""
    rank, world_size = comm.Get_rank(), comm.Get_size()
    is_root = rank == 0
    say = log if is_root else (lambda line: None)
    say(host_line(comm))
    say(f"world_size: {world_size}")

    x_shard, y_shard, x_test, y_test = local_data(args.seed, rank, world_size)
    shapes = param_shapes()
    start_step, flat, velocity = initial_state(comm, args, shapes)
    flat, velocity = np.array(flat, dtype=np.float64), np.array(velocity, dtype=np.float64)
    ckpt_path, ckpt_step = None, None
    if start_step:
        say(f"resumed from step {start_step}")
        # The checkpoint we resumed from already holds this state; don't rewrite it.
        ckpt_path, ckpt_step = os.path.join(args.checkpoint_dir, checkpoint_name(start_step)), start_step

    loss, progress = None, ProgressLog(say, args, world_size, start_step)
    for step in range(start_step + 1, args.steps + 1):
        loss = sgd_step(comm, args, step, flat, velocity, x_shard, y_shard, shapes)
        progress.after(step, loss)
        if is_root and (step % args.checkpoint_every == 0 or step == args.steps):
            ckpt_path, ckpt_step = save_checkpoint(args.checkpoint_dir, step, flat, velocity, shapes), step

    params = unflatten(flat, shapes)
    if loss is None:  # resumed at or past --steps: report the loss of the loaded model
        loss = shard_mean_loss(comm, params, x_shard, y_shard)
    if not is_root:
        return None
    final_step = max(start_step, args.steps)
    if ckpt_step != final_step:
        ckpt_path = save_checkpoint(args.checkpoint_dir, final_step, flat, velocity, shapes)
    acc = accuracy(params, x_test, y_test)
    say(f"final loss {loss:.6f}")
    say(f"checkpoint {ckpt_path}")
    say(f"accuracy {acc:.4f}")
    return {"loss": loss, "accuracy": acc, "checkpoint": ckpt_path, "step": final_step}


def main(argv=None):
    args = parse_args(argv)
    from mpi4py import MPI  # imported here so the math above is testable without MPI

    train(MPI.COMM_WORLD, args, log=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
