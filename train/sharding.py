"""Data parallelism over a `jax.sharding` device mesh: one mesh axis, ``"data"``, one or many hosts.

A :class:`DataParallel` wraps ``jax.make_mesh((N,), ("data",))``:

* every batch array ``[B, ...]`` is split along its first dimension over the ``data`` axis
  (``NamedSharding(mesh, P("data"))``), so each device holds ``B / N`` rows;
* params and optimizer state are replicated (``P()``), or with ``shard_params=True`` (FSDP style) every
  leaf of at least ``min_shard_size`` elements is split along one of its dimensions that ``N`` divides
  (the largest); the step then all-gathers the weights for the forward/backward pass and each device
  keeps and updates only its slice of params and optimizer moments.

The train step is one ``jax.jit`` over the whole mesh with explicit ``in_shardings`` / ``out_shardings``
(see :func:`train.step.make_train_step`). Its semantics are those of the single-device program on the
*global* batch: a task loss is the masked mean over all ``B`` rows (``sum(loss * valid) / sum(valid)``,
reduced across devices by XLA), so gradients, the PCGrad Gram matrix and the AdamW update are global
too, and the result equals the single-device run up to float reassociation (tests/test_sharding.py).
Dropout masks are identical as well: ``jax_threefry_partitionable`` (the default) makes random bits
independent of the sharding.

The mesh axis is ``AxisType.Auto`` (the partitioner propagates shardings from the jit's in/out
shardings), not ``AxisType.Explicit`` (``jax.make_mesh``'s default since jax 0.9, sharding in types):
under explicit axes every gather whose output sharding is ambiguous must name it, and Flax's
``nn.Embed`` (``jnp.take(embedding, ids)`` with replicated table and batch-sharded ids) fails with
``ShardingTypeError``; the model code is kept free of sharding annotations instead.

Multi-host (``jax.distributed``): every process runs the same program on the same deterministic data
plan; each builds the (cheap, numpy) global batch and transfers to its own devices only the rows those
devices own (``jax.make_array_from_callback``), so no process ever holds another's device data.
Outputs the host reads (metrics, eval scores) are replicated, hence readable on every process.
"""

from __future__ import annotations

import argparse  # noqa: F401  (from_args takes the CLI's namespace)
import dataclasses
import math
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"
DEFAULT_MIN_SHARD_SIZE = 2**14  # FSDP: leaves smaller than this (biases, LayerNorms, heads) stay replicated


def parse_mesh(text: str) -> int:
    """``"data=N"`` -> N (the only mesh axis; ``data=all`` = every device of every process)."""
    key, sep, value = text.partition("=")
    if key.strip() != AXIS or not sep:
        raise ValueError(f"--mesh {text!r}: expected data=N (data parallelism over N devices)")
    value = value.strip()
    if value == "all":
        return jax.device_count()
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"--mesh {text!r}: N must be a positive integer or 'all'") from None
    if n < 1:
        raise ValueError(f"--mesh {text!r}: N must be >= 1")
    return n


def fsdp_spec(shape: tuple[int, ...], n: int, min_shard_size: int = DEFAULT_MIN_SHARD_SIZE) -> P:
    """FSDP partition spec of a leaf: split along its largest dimension that `n` divides, when it has at
    least `min_shard_size` elements; else replicated (`P()`)."""
    if n == 1 or math.prod(shape) < min_shard_size:
        return P()
    dims = [d for d in sorted(range(len(shape)), key=lambda d: -shape[d]) if shape[d] % n == 0]
    if not dims:
        return P()
    return P(*[AXIS if d == dims[0] else None for d in range(len(shape))])


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """A 1-D ``data`` mesh and the shardings of batches, params and optimizer state on it."""

    mesh: Mesh
    shard_params: bool = False
    min_shard_size: int = DEFAULT_MIN_SHARD_SIZE

    @property
    def size(self) -> int:
        return int(self.mesh.shape[AXIS])

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def batch(self) -> NamedSharding:
        """Rows split over the ``data`` axis (a prefix spec: later dimensions are not split)."""
        return NamedSharding(self.mesh, P(AXIS))

    def check_batch_size(self, batch_size: int, name: str = "batch_size") -> None:
        if batch_size % self.size:
            raise ValueError(f"{name} {batch_size} is not divisible by the {self.size} devices of --mesh data={self.size}; "
                             f"use a {name} that is a multiple of {self.size}")

    # ------------------------------------------------------------------ params / optimizer state
    def spec(self, shape: tuple[int, ...]) -> P:
        """Partition spec of a param/optimizer leaf of `shape` (a pure function of the shape, so a
        param and its AdamW moments always get the same one)."""
        return fsdp_spec(shape, self.size, self.min_shard_size) if self.shard_params else P()

    def shardings(self, tree: Any) -> Any:
        """A pytree of `NamedSharding`s matching `tree` (arrays or `ShapeDtypeStruct`s)."""
        return jax.tree.map(lambda x: NamedSharding(self.mesh, self.spec(tuple(np.shape(x)))), tree)

    def put(self, tree: Any, shardings: Any = None) -> Any:
        """Place every leaf of `tree` (host or single-device values, identical on every process) on the
        mesh with `shardings` (default `self.shardings(tree)`). Leaves already placed are kept."""
        shardings = self.shardings(tree) if shardings is None else shardings
        return jax.tree.map(_put, tree, shardings)

    # ------------------------------------------------------------------ batches
    def put_batch(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """A global batch (numpy ``[B, ...]`` arrays, the same on every process) as arrays split by rows."""
        out = {}
        for k, v in batch.items():
            if np.shape(v)[0] % self.size:
                raise ValueError(f"batch array {k!r} has {np.shape(v)[0]} rows, not divisible by --mesh data={self.size}")
            out[k] = _put(v, self.batch)
        return out

    def pad_batch(self, batch: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        """`batch` with its rows padded (zeros, ``valid=0``) up to a multiple of the mesh size, and the
        original row count. Used for evaluation: rows are independent, so the real rows' scores are
        unchanged and the padding rows' are dropped (as for `train.data.eval_batches`' last batch)."""
        n = int(np.shape(next(iter(batch.values())))[0])
        extra = -n % self.size
        if not extra:
            return dict(batch), n
        return {k: np.concatenate([np.asarray(v), np.zeros((extra,) + np.shape(v)[1:], np.asarray(v).dtype)]) for k, v in batch.items()}, n

    def gather(self, tree: Any) -> Any:
        """Inside jit: all-gather (FSDP) params to replicated for compute; identity when not sharded."""
        if not self.shard_params:
            return tree
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, self.replicated), tree)


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    if isinstance(x, jax.Array):
        if x.sharding == sharding:
            return x
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = _put(jax.random.key_data(x), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        if not x.is_fully_addressable:  # already a global (multi-host) array: reshard on the devices
            return jax.device_put(x, sharding)
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    host = np.asarray(x)  # multi-host: each process materialises only its own devices' slices
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def data_parallel(n: int, shard_params: bool = False, min_shard_size: int = DEFAULT_MIN_SHARD_SIZE) -> DataParallel:
    """A `DataParallel` over `n` devices: the first `n` (single process) or all of them (multi-host)."""
    total = jax.device_count()
    if n > total:
        raise ValueError(f"--mesh data={n}: only {total} device(s) available ({jax.default_backend()}"
                         f"{', set XLA_FLAGS=--xla_force_host_platform_device_count=N to simulate CPU devices' if jax.default_backend() == 'cpu' else ''})")
    if jax.process_count() > 1 and n != total:
        raise ValueError(f"--mesh data={n}: a multi-process run must use every device ({total} over {jax.process_count()} processes)")
    devices = jax.devices()[:n] if jax.process_count() == 1 else None
    mesh = jax.make_mesh((n,), (AXIS,), axis_types=(AxisType.Auto,), devices=devices)
    return DataParallel(mesh=mesh, shard_params=shard_params, min_shard_size=min_shard_size)


# ---------------------------------------------------------------------------------------- multi-host

ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}


def init_distributed(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
                     auto: bool = False) -> bool:
    """`jax.distributed.initialize` from arguments, else ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
    ``JAX_PROCESS_ID``; with `auto`, what is still missing is detected by jax (SLURM, Open MPI, TPU, K8s).
    Does nothing (returns False) when none is given and not `auto`. Must run before any JAX computation."""
    if jax.distributed.is_initialized():
        return True
    env = {k: os.environ.get(v) for k, v in ENV.items()}
    coordinator = coordinator or env["coordinator"]
    num_processes = num_processes if num_processes is not None else (int(env["num_processes"]) if env["num_processes"] else None)
    process_id = process_id if process_id is not None else (int(env["process_id"]) if env["process_id"] else None)
    given = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    if not auto:
        if all(v is None for v in given.values()):
            return False
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise ValueError(f"multi-process run: also give {', '.join(missing)} (or {', '.join(ENV[k.strip('-').replace('-', '_')] for k in missing)}), "
                             "or --distributed to auto-detect a SLURM / Open MPI / TPU launch")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    return True


def from_args(args: argparse.Namespace) -> DataParallel | None:
    """Initialise `jax.distributed` when asked, then the `DataParallel` of ``--mesh`` (None without it;
    a multi-process run without ``--mesh`` uses every device). `args` carries the flags of
    `scripts.cli.add_mesh_args`: mesh, shard_params, and optionally coordinator, num_processes,
    process_id, distributed. Call it first in a command, before any JAX computation."""
    multi = init_distributed(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
                             getattr(args, "process_id", None), getattr(args, "distributed", False))
    if getattr(args, "mesh", None) is None:
        if getattr(args, "shard_params", False):
            raise ValueError("--shard-params needs --mesh data=N")
        return data_parallel(jax.device_count()) if multi else None
    return data_parallel(parse_mesh(args.mesh), shard_params=getattr(args, "shard_params", False))


def is_main_process() -> bool:
    """True on process 0 (the one that writes files and prints) and in single-process runs."""
    return jax.process_index() == 0
