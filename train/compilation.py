"""XLA compilation: JAX's persistent compilation cache and compile-time accounting.

The cache (`jax_compilation_cache_dir`) is on by default for the command line, in
`$XDG_CACHE_HOME/bert-jax/jax` (else `~/.cache/bert-jax/jax`): a second run of the same preset loads its
compiled programs instead of compiling them. `BERT_JAX_COMPILE_CACHE=DIR` moves it, `=off` disables it;
the `--compile-cache DIR|off` flag overrides both.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

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

    path = resolve_cache_dir(flag)
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


class CompileEvents:
    """Sums jax.monitoring compile-event durations (trace, lowering, backend compile) while active, and counts
    XLA compiles and persistent-cache hits."""

    NAMES = {"/jax/core/compile/jaxpr_trace_duration": "trace_s",
             "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
             "/jax/core/compile/backend_compile_duration": "backend_compile_s"}
    _installed: "CompileEvents | None" = None

    def __init__(self) -> None:
        self.active = False
        self.totals: dict[str, float] = defaultdict(float)
        self.compiles = 0
        self.cache_hits = 0
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

    def _on_count(self, name: str, **kwargs: Any) -> None:
        if self.active and name == "/jax/compilation_cache/cache_hits":
            self.cache_hits += 1

    def reset(self) -> None:
        self.totals = defaultdict(float)
        self.compiles = 0
        self.cache_hits = 0

    def __enter__(self) -> "CompileEvents":
        self.active = True
        return self

    def __exit__(self, *exc: Any) -> None:
        self.active = False

    def summary(self) -> dict[str, float]:
        t = {k: round(self.totals.get(k, 0.0), 4) for k in self.NAMES.values()}
        return {**t, "total_s": round(sum(t.values()), 4), "xla_compiles": self.compiles, "cache_hits": self.cache_hits}
