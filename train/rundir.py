"""Ownership of a run directory: what `train --out DIR` may write into, the run lock, `--overwrite`,
and the fingerprints a resumed run is checked against.

Rules (`check_out_dir`): `--out` must be

- new or empty: a fresh run;
- a bert-jax run (it holds `config.yaml` and `bert_config.json`): continue it with `--resume`, or start
  over with `--overwrite`, which deletes only bert-jax's own files (`OWN_NAMES`; the deletion is
  announced first) and keeps anything else the directory holds;
- anything else (a non-empty directory that is not a bert-jax run, or a file): refused, whatever the flags.

Lock (`RunLock`): `RUN/.lock`, an exclusive `fcntl.flock` held by the training process for its whole
life, with the owner's pid, host and start time written inside. A second writer fails at once. The
kernel drops the lock when its process dies, so a lock file left by a killed process is stale: the next
run takes it over and says so. On a filesystem without `flock` the file alone is the lock: a lock of a
dead process on this host, or of another host, is reported with the command that clears it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from train.checkpoint import DEV_SCORES, METRICS, RunError

LOCK_NAME = ".lock"
# Everything bert-jax train writes into a run directory (and so may delete with --overwrite).
OWN_NAMES = ("config.yaml", "bert_config.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
             "tokenizer.json", "added_tokens.json", METRICS, METRICS + ".tmp", DEV_SCORES, "checkpoints", "best",
             "tensorboard")
_MARKERS = ("config.yaml", "bert_config.json")


def is_run(run: Path) -> bool:
    """Whether `run` holds a bert-jax run (its `config.yaml` and `bert_config.json`)."""
    return all((run / name).is_file() for name in _MARKERS)


def _own(p: Path) -> bool:
    name = p.name
    return name in OWN_NAMES or (name.endswith(".tmp") and name[: -len(".tmp")] in OWN_NAMES) or name == LOCK_NAME


def _blank(p: Path) -> bool:
    """A leftover that does not make a directory non-empty: our lock file, an empty checkpoints/ or best/."""
    if p.name == LOCK_NAME:
        return True
    return p.name in ("checkpoints", "best") and p.is_dir() and not any(q.is_file() for q in p.rglob("*"))


def check_out_dir(run: Path, resume: bool, overwrite: bool) -> None:
    """Refuse an `--out` that training must not write into (see the module docstring); a RunError says why
    and what to do instead."""
    if resume and overwrite:
        raise RunError(f"{run}: --resume and --overwrite exclude each other (continue the run, or start it over)")
    if not run.exists():
        return
    if not run.is_dir():
        raise RunError(f"{run}: --out exists and is not a directory; choose a new --out")
    entries = [p for p in run.iterdir() if not _blank(p)]
    if not entries:
        return
    if not is_run(run):
        shown = ", ".join(sorted(p.name for p in entries)[:5]) + (" ..." if len(entries) > 5 else "")
        raise RunError(f"{run}: --out is not empty and is not a bert-jax run (it holds {shown}); "
                       f"bert-jax writes only into a new or empty directory or its own run: choose a new --out")
    if not resume and not overwrite:
        raise RunError(f"{run}: run directory already holds a bert-jax run; continue it with --resume, start it "
                       f"over with --overwrite (deletes the run's checkpoints and files), or choose a new --out")


def own_entries(run: Path) -> tuple[list[Path], list[Path]]:
    """(bert-jax's own entries of `run` that --overwrite deletes, the other entries it keeps); the lock is neither."""
    own, other = [], []
    for p in sorted(run.iterdir()) if run.is_dir() else []:
        if p.name == LOCK_NAME:
            continue
        (own if _own(p) else other).append(p)
    return own, other


def clear_run(run: Path, say: Callable[[list[str], list[str]], None]) -> None:
    """--overwrite: announce (`say(deleted names, kept names)`), then delete bert-jax's own files in `run`."""
    own, other = own_entries(run)
    if not own:
        return
    say([p.name + ("/" if p.is_dir() else "") for p in own], [p.name for p in other])
    for p in own:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


# ------------------------------------------------------------------------------------------- lock


def _read_owner(path: Path) -> dict[str, Any]:
    try:
        owner = json.loads(path.read_text())
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(owner: Mapping[str, Any]) -> str:
    if not owner:
        return "an unknown process"
    since = owner.get("started")
    when = f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" if isinstance(since, (int, float)) else ""
    return f"pid {owner.get('pid')} on host {owner.get('host')}{when}"


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """`RUN/.lock`: an exclusive lock on a run directory (see the module docstring).

    `acquire()` creates the directory when needed (and `release()` removes it again if it is still empty,
    so a refused or failed start leaves nothing behind). `note(msg)` receives the stale-lock report.
    """

    def __init__(self, run: Path, note: Callable[[str], None] = lambda msg: None):
        self.run = Path(run)
        self.path = self.run / LOCK_NAME
        self.note = note
        self._fd: int | None = None
        self._created = False

    def _busy(self, owner: Mapping[str, Any]) -> RunError:
        return RunError(f"{self.run}: run directory is in use by another bert-jax train ({_describe(owner)}; lock "
                        f"file {self.path}); wait for it to finish or stop it, or train into another --out")

    def acquire(self) -> "RunLock":
        import fcntl

        if not self.run.exists():
            self.run.mkdir(parents=True)
            self._created = True
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self._cleanup_dir()
                raise self._busy(_read_owner(self.path)) from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    os.close(fd)
                    raise
                try:
                    self._without_flock()
                except BaseException:
                    os.close(fd)
                    self._cleanup_dir()
                    raise
                self._fd = fd
                break
            # the file may have been unlinked by its previous owner between our open and flock: retry
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                break
            os.close(fd)
        previous = _read_owner(self.path)
        if previous and previous.get("pid") != os.getpid():  # the kernel dropped that lock: its process is gone
            self.note(f"{self.path}: took over the stale lock of {_describe(previous)}, which is no longer running "
                      f"(it did not exit cleanly)")
        self._write_owner()
        return self

    def _without_flock(self) -> None:
        """A filesystem without flock: the lock file's content is the lock."""
        owner = _read_owner(self.path)
        if owner and owner.get("pid") != os.getpid():
            here = owner.get("host") == socket.gethostname()
            if here and _alive(owner.get("pid")):
                raise self._busy(owner)
            state = "not running" if here else "on another host: check it has stopped"
            raise RunError(f"{self.run}: stale lock file {self.path} ({_describe(owner)}, {state}; this filesystem "
                           f"has no flock); clear it with `rm {self.path}` and try again")

    def _write_owner(self) -> None:
        assert self._fd is not None
        data = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def _cleanup_dir(self) -> None:
        if self._created:
            try:
                os.rmdir(self.run)
            except OSError:
                pass
            self._created = False

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # unlink while still holding it (acquire() re-checks the inode)
        except FileNotFoundError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None
        self._cleanup_dir()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ------------------------------------------------------------------------------------ fingerprints


def data_fingerprint(enc: Any, index: Sequence[int] | np.ndarray) -> str:
    """sha256 of the training examples `index` of an `Encoded` task, in order: token ids (both sentences,
    token types) and labels. Equal counts with different content give different fingerprints."""
    h = hashlib.sha256()
    index = np.asarray(index, dtype=np.int64)
    for seqs in (enc.tokens1, enc.tokens2, getattr(enc, "types1", None)):
        if seqs is None:
            h.update(b"-")
            continue
        chosen = [np.asarray(seqs[i], dtype=np.int32) for i in index]
        h.update(np.asarray([len(s) for s in chosen], dtype=np.int64).tobytes())
        if chosen:
            h.update(np.concatenate(chosen).tobytes())
    h.update(np.ascontiguousarray(np.asarray(enc.labels)[index]).tobytes())
    return h.hexdigest()


def check_tokenizer(run: Path, files: Mapping[str, bytes], checkpoint: str) -> None:
    """--resume: the run's tokenizer files must equal the ones `checkpoint` gives now (same vocabulary and casing)."""
    for name, data in files.items():
        path = run / name
        if not path.is_file():
            continue  # a run written before this file travelled with it
        mine = path.read_bytes()
        if mine != data:
            a, b = hashlib.sha256(mine).hexdigest()[:12], hashlib.sha256(data).hexdigest()[:12]
            raise RunError(f"{run}: --resume with a different tokenizer: {name} of checkpoint {checkpoint!r} "
                           f"(sha256 {b}...) differs from the run's {path} (sha256 {a}...); resume with the run's "
                           f"own checkpoint (omit --checkpoint), or train into a new --out")
