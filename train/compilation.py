"""XLA compilation: JAX's persistent compilation cache and compile-time accounting.

The cache (`jax_compilation_cache_dir`) is on by default for the command line, in
`$XDG_CACHE_HOME/bert-jax/jax` (else `~/.cache/bert-jax/jax`): a second run of the same preset loads its
compiled programs instead of compiling them. `BERT_JAX_COMPILE_CACHE=DIR` moves it, `=off` disables it;
the `--compile-cache DIR|off` flag overrides both.

JAX's cache skips XLA's compile only: every process still traces and lowers each program before it can look
the executable up (~0.8 s of a ~1.3 s cache hit for a per-task train program on the 2-core CPU).
`StoredProgram` wraps the programs a run compiles many shapes of (the split step's per-task gradients, the
dev-set scorer) so that a later process loads their executables straight from `DIR/executables`, keyed by
what determines the program without tracing it: the function, its static arguments, the abstract values
of its inputs, this package's source, the library versions, the device and the JAX / XLA settings.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import importlib.metadata
import os
import pickle
import time
import warnings
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator

ENV_VAR = "BERT_JAX_COMPILE_CACHE"
_OFF = ("off", "none", "0", "false", "no")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bert-jax" / "jax"


def resolve_cache_dir(flag: str | None = None) -> Path | None:
    """The cache directory: `flag`, else `$BERT_JAX_COMPILE_CACHE`, else the default; None when disabled."""
    value = flag if flag not in (None, "") else os.environ.get(ENV_VAR)
    if value in (None, ""):
        return default_cache_dir()
    if value.strip().lower() in _OFF:
        return None
    return Path(value).expanduser()


def enable_cache(flag: str | None = None) -> Path | None:
    """Point JAX's persistent compilation cache at `resolve_cache_dir(flag)` (every program, however quick
    to compile, is cached). Returns the directory, or None when disabled. Call before the first compile."""
    import jax

    global _STORE_DIR
    path = resolve_cache_dir(flag)
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
        _STORE_DIR = None
        return None
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _STORE_DIR = path / "executables"
    return path


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Keep the garbage collector off every object alive on entry (modules, data, parameters) until exit.

    Tracing a program allocates many short-lived Python objects; each full collection then rescans the
    process's long-lived objects. Measured on the 2-core CPU (a `cpu-recipe` run, 14 per-task programs):
    tracing them took 8.8 s with the collector on and 5.6 s with it off. On exit the objects are handed back
    (`gc.unfreeze`), so a process that trains several runs (the tests) can still collect the earlier ones."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


# --- executable store -------------------------------------------------------------------------------------

STORE_LOAD_EVENT = "/bert_jax/compile/executable_store_load_duration"
STORE_HIT_EVENT = "/bert_jax/compile/executable_store_hits"
_STORE_DIR: Path | None = None  # set by enable_cache; None: StoredProgram is a plain jitted call
_SOURCE_PACKAGES = ("bert_jax", "train")  # what the stored programs trace
_UNKEYED_CONFIG = ("compilation_cache", "persistent_cache", "log", "explain_cache")  # settings that do not change programs


@functools.cache
def source_digest() -> str:
    """sha256 over every .py file of the packages the stored programs trace (any edit invalidates the store)."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for pkg in _SOURCE_PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def environment_digest() -> str:
    """sha256 over the library versions, the devices, XLA_FLAGS and JAX's settings (all but cache / logging ones)."""
    import jax

    versions = {m: importlib.metadata.version(m) for m in ("jax", "jaxlib", "flax", "optax", "numpy")}
    devices = jax.devices()
    config = {k: repr(v) for k, v in sorted(jax.config.values.items()) if not any(u in k for u in _UNKEYED_CONFIG)}
    parts = (versions, devices[0].client.platform, devices[0].client.platform_version, devices[0].device_kind,
             len(devices), os.environ.get("XLA_FLAGS", ""), config)
    return hashlib.sha256(repr(parts).encode()).hexdigest()


# XLA options at their defaults, given explicitly: the executable is the same, JAX's cache key is not. The store's
# compiles never write to JAX's cache (`_jax_cache_writes_off`), so JAX's cache never answers them. (Versions before
# this one compiled under `xla_embed_ir_in_executable` alone and did write: those entries made a source edit that
# left a program's HLO unchanged store nothing, so every later run loaded that program from JAX's cache instead.)
_FRESH = {"xla_embed_ir_in_executable": False, "xla_hlo_profile": False}
_NEVER = 1e9  # seconds: a compile-time floor no compile reaches


@contextlib.contextmanager
def _jax_cache_writes_off() -> Iterator[None]:
    """JAX's persistent cache writes nothing inside (it still reads): what the store keeps, JAX need not."""
    import jax

    name = "jax_persistent_cache_min_compile_time_secs"
    before = jax.config.values[name]
    jax.config.update(name, _NEVER)
    try:
        yield
    finally:
        jax.config.update(name, before)


class StoredProgram:
    """A jitted function whose compiled executables persist across processes (`jax.experimental.serialize_executable`).

    `StoredProgram(jitted, name)(*args, **static)` computes `jitted(*args, **static)`: with the store off
    (`enable_cache("off")`, or never enabled: tests, the Python API), or on more than one device, by calling
    `jitted`; else through one `jax.stages.Compiled` per input shape, loaded from the store when it has the
    program and compiled (then written, atomically) when not. `static` are `jitted`'s static keyword arguments;
    their `repr` is part of the key, so they must be values whose repr states them fully (frozen dataclasses,
    strings, tuples). `salt`: what else determines the program and is neither an argument nor this package's
    source (the optimizer a closure was built from, see `train.step.optimizer_key`); it must state it fully.
    Loads are recorded as `STORE_LOAD_EVENT` (counted by `CompileEvents`).
    """

    def __init__(self, jitted: Callable, name: str, salt: str = ""):
        self.jitted, self.name, self.salt = jitted, name, salt
        self._compiled: dict[Any, Any] = {}  # by the stored key's shapes
        self._by_signature: dict[Any, Any] = {}  # the same executables by the per-call signature

    def __call__(self, *args: Any, **static: Any) -> Any:
        import jax

        if _STORE_DIR is None or jax.device_count() != 1:
            return self.jitted(*args, **static)
        return self._executable(args, static)(*args)

    def prepare(self, *args: Any, **static: Any) -> Any:
        """Load (or compile and store) the executable a call with these arguments would run, without running it,
        and return it (a `jax.stages.Compiled`: its `out_info` states the outputs). `args` may be arrays or
        `jax.ShapeDtypeStruct`s. None (nothing done) when the store is off: the plain jitted function then
        compiles on its first call."""
        import jax

        if _STORE_DIR is None or jax.device_count() != 1:
            return None
        return self._executable(args, static)

    def _executable(self, args: tuple, static: dict[str, Any]) -> Any:
        import jax

        leaves, treedef = jax.tree.flatten(args)
        # the per-call lookup: shape, dtype and weak type of every leaf (the update call's 649 leaves: 0.24 ms, idle
        # 2-core EPYC; `str(jax.typeof(x))`, the stored key's form, 3.3 ms), so the key is built once per shape
        fast = (treedef, tuple((x.shape, x.dtype, getattr(x, "weak_type", False)) if hasattr(x, "dtype") else type(x)
                               for x in leaves), tuple(sorted(static.items())))
        compiled = self._by_signature.get(fast)
        if compiled is None:
            shapes = (treedef, tuple(str(jax.typeof(x)) for x in leaves), fast[2])
            compiled = self._compiled.get(shapes)
            if compiled is None:
                compiled = self._compiled[shapes] = self._load_or_compile(args, static, shapes, _STORE_DIR)
            self._by_signature[fast] = compiled
        return compiled

    def forget(self) -> None:
        """Drop this process's executables: the next call loads (or compiles) as a new process would."""
        self._compiled.clear()
        self._by_signature.clear()

    def _cache_size(self) -> int:
        """Programs of this process: stored-path executables plus the plain jitted function's cache."""
        return len(self._compiled) + self.jitted._cache_size()

    def key(self, shapes: tuple) -> str:
        parts = (self.name, self.salt, repr(shapes[0]), shapes[1], repr(shapes[2]), source_digest(), environment_digest())
        return hashlib.sha256(repr(parts).encode()).hexdigest()

    def _load_or_compile(self, args: tuple, static: dict[str, Any], shapes: tuple, store: Path) -> Any:
        import jax
        from jax.experimental import serialize_executable

        path = store / f"{self.name}-{self.key(shapes)}.bin"
        if path.is_file():
            t0 = time.perf_counter()
            try:
                payload, in_tree, out_tree = pickle.loads(zlib.decompress(path.read_bytes()))
                compiled = serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
            except Exception as e:  # a truncated or foreign file: compile instead, and overwrite it
                warnings.warn(f"{path}: unreadable stored executable ({type(e).__name__}: {e}); compiling")
            else:
                jax.monitoring.record_event_duration_secs(STORE_LOAD_EVENT, time.perf_counter() - t0)
                jax.monitoring.record_event(STORE_HIT_EVENT)
                return compiled
        # Compiled fresh: an executable that JAX loaded from its own cache serializes without its kernels (XLA CPU:
        # "Function ... not found" when the stored copy runs), so the store compiles under options JAX's cache key
        # sees (`_FRESH`, a no-op for the program) and JAX's cache never keeps them; should it answer all the same
        # (a cache written by something else), nothing is stored.
        # traced and lowered before the hit count starts: what tracing runs eagerly (a backend probe such as
        # `bert_jax.matmul.mixed_dot_supported`) may itself be answered by JAX's cache
        lowered = self.jitted.trace(*args, **static).lower()
        hits = CompileEvents.jax_cache_hits()
        with _jax_cache_writes_off():
            compiled = lowered.compile(compiler_options=_FRESH)
        if CompileEvents.jax_cache_hits() != hits:
            warnings.warn(f"{self.name}: JAX's compilation cache answered the store's compile; not stored")
            return compiled
        try:
            blob = zlib.compress(pickle.dumps(serialize_executable.serialize(compiled)), 1)
            store.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(blob)
            os.replace(tmp, path)  # readers see the old file or the whole new one
        except (OSError, ValueError, NotImplementedError) as e:  # a full disk or an unserializable program: run on
            warnings.warn(f"{path}: executable not stored ({type(e).__name__}: {e})")
        return compiled


class CompileEvents:
    """Sums jax.monitoring compile-event durations (trace, lowering, backend compile, executable-store loads)
    while active, and counts XLA compiles, persistent-cache hits and executable-store hits."""

    NAMES = {"/jax/core/compile/jaxpr_trace_duration": "trace_s",
             "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
             "/jax/core/compile/backend_compile_duration": "backend_compile_s",
             STORE_LOAD_EVENT: "store_load_s"}
    _installed: "CompileEvents | None" = None
    _process_cache_hits = 0  # every persistent-cache hit of this process, whether or not an instance is active

    def __init__(self) -> None:
        self.active = False
        self.totals: dict[str, float] = defaultdict(float)
        self.compiles = 0
        self.cache_hits = 0
        self.store_hits = 0
        import jax

        if CompileEvents._installed is None:
            jax.monitoring.register_event_duration_secs_listener(self._on_event)
            jax.monitoring.register_event_listener(self._on_count)
            CompileEvents._installed = self
        else:  # one listener per process; reuse it
            self.__dict__ = CompileEvents._installed.__dict__
            self.reset()

    def _on_event(self, name: str, secs: float, **kwargs: Any) -> None:
        if self.active and name in self.NAMES:
            self.totals[self.NAMES[name]] += secs
            if name == "/jax/core/compile/backend_compile_duration":
                self.compiles += 1

    @classmethod
    def jax_cache_hits(cls) -> int:
        """JAX persistent-cache hits of this process so far (installs the listener on first use)."""
        if cls._installed is None:
            cls()
        return cls._process_cache_hits

    def _on_count(self, name: str, **kwargs: Any) -> None:
        if name == "/jax/compilation_cache/cache_hits":
            CompileEvents._process_cache_hits += 1
            self.cache_hits += self.active
        elif self.active and name == STORE_HIT_EVENT:
            self.store_hits += 1

    def reset(self) -> None:
        self.totals = defaultdict(float)
        self.compiles = 0
        self.cache_hits = 0
        self.store_hits = 0

    def __enter__(self) -> "CompileEvents":
        self.active = True
        return self

    def __exit__(self, *exc: Any) -> None:
        self.active = False

    def summary(self) -> dict[str, float]:
        t = {k: round(self.totals.get(k, 0.0), 4) for k in self.NAMES.values()}
        return {**t, "total_s": round(sum(t.values()), 4), "xla_compiles": self.compiles, "cache_hits": self.cache_hits,
                "store_hits": self.store_hits}
