"""Declarative ensemble specs (YAML or JSON) and their compilation into one weight matrix.

A spec names members (run directories) and nodes that combine members or other nodes, nested to any depth::

    members:                 # id -> run directory, relative to the results dir (see below)
      mt_1e5: sum-lr1e-5
      para: task-para-finetune
    nodes:                   # name -> node; children are member ids or node names
      ens2: {type: task, sst: mt_1e5, para: para, sts: mt_5e5}
      ens3: {type: average, children: [mt_1e5, para, mt_5e5]}
      ens7: {type: average, children: [ens2, ens3, ens5], weights: [1, 1, 1]}
    output: ens7             # the node whose predictions are written (default: the last node)

Node types (the scores combined are the raw ones: SST logits [N, 5], paraphrase logits [N], STS
predictions [N]):
  average  weighted mean of the children's scores, `weights` optional (default equal; >= 0, sum > 0)
  task     per task (the registry's evaluated tasks: sst, para, sts) take one child's scores, as the report's
           task-based ensembles

Run directories are resolved relative to the results dir: the `results_dir` argument (CLI
`--results-dir`), else the spec's `results_dir` key (relative to the spec file), else the spec file's
own directory. Absolute paths are used as they are.

Every node is linear in the members' scores, so each node (and each member) compiles to a weight matrix
`W[task, model]` over the unique models (distinct run directories): node scores for task t are
`sum_m W[t, m] * scores_m[t]`. `combine` applies it; `naive_scores` is the direct recursive evaluation.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import yaml

from train.registry import Registry
from train.tasks import evaluated_tasks

_TOP_KEYS = ("members", "nodes", "output", "results_dir", "description")


class SpecError(ValueError):
    """An invalid ensemble spec (the message names the member / node at fault)."""


@dataclasses.dataclass(frozen=True)
class Node:
    """`kind` "average": `children` with `weights` (normalised to sum 1); "task": `children[i]` serves the spec's
    `tasks[i]`."""

    name: str
    kind: str
    children: tuple[str, ...]
    weights: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True, eq=False)
class EnsembleSpec:
    members: dict[str, Path]  # member id -> run directory (resolved)
    nodes: dict[str, Node]  # name -> node, in file order
    output: str | None = None
    results_dir: Path | None = None
    tasks: tuple[str, ...] = ()  # the tasks scored (rows of every weight matrix): the registry's evaluated tasks

    def __post_init__(self) -> None:
        if not self.tasks:
            object.__setattr__(self, "tasks", evaluated_tasks())

    @property
    def models(self) -> list[Path]:
        """The unique run directories, in order of first appearance."""
        return list(dict.fromkeys(self.members.values()))

    def columns(self) -> dict[str, int]:
        """Member id -> its column (index into `models`)."""
        index = {p: i for i, p in enumerate(self.models)}
        return {m: index[p] for m, p in self.members.items()}

    @property
    def names(self) -> list[str]:
        """Every member id then every node name, in file order."""
        return list(self.members) + list(self.nodes)

    def default_node(self) -> str:
        """The spec's `output`, else its last node, else its last member."""
        if self.output is not None:
            return self.output
        return list(self.nodes)[-1] if self.nodes else list(self.members)[-1]


def _as_mapping(x: Any, what: str) -> Mapping:
    if not isinstance(x, Mapping):
        raise SpecError(f"{what} must be a mapping, got {type(x).__name__}")
    return x


def _parse_average(name: str, d: Mapping, tasks: tuple[str, ...]) -> Node:
    unknown = sorted(set(d) - {"type", "children", "weights"})
    if unknown:
        raise SpecError(f"node {name!r}: unknown key(s) {unknown} for an average node (keys: type, children, weights)")
    children = d.get("children")
    if not isinstance(children, (list, tuple)) or not children or not all(isinstance(c, str) for c in children):
        raise SpecError(f"node {name!r}: 'children' must be a non-empty list of member ids / node names")
    weights = d.get("weights")
    if weights is None:
        w = np.ones(len(children))
    else:
        if not isinstance(weights, (list, tuple)) or len(weights) != len(children):
            raise SpecError(f"node {name!r}: 'weights' must be a list of {len(children)} numbers (one per child)")
        try:
            w = np.asarray([float(x) for x in weights], np.float64)
        except (TypeError, ValueError):
            raise SpecError(f"node {name!r}: 'weights' must be numbers, got {weights}") from None
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise SpecError(f"node {name!r}: weights must be finite, >= 0 and not all 0, got {list(weights)}")
    return Node(name, "average", tuple(children), tuple(float(x) for x in w / w.sum()))


def _parse_task(name: str, d: Mapping, tasks: tuple[str, ...]) -> Node:
    unknown = sorted(set(d) - {"type", *tasks})
    if unknown:
        raise SpecError(f"node {name!r}: unknown task(s) {unknown}; a task node maps each of {list(tasks)} to a child")
    missing = [t for t in tasks if t not in d]
    if missing:
        raise SpecError(f"node {name!r}: task node has no child for task(s) {missing}")
    for t in tasks:
        if not isinstance(d[t], str):
            raise SpecError(f"node {name!r}: task {t!r} must name one member or node, got {d[t]!r}")
    return Node(name, "task", tuple(d[t] for t in tasks))


@dataclasses.dataclass(frozen=True)
class NodeType:
    """One kind of ensemble node. `parse(name, mapping, tasks) -> Node` (raises SpecError); `weights(node, kids)`:
    its weight matrix `[len(tasks), M]` from its children's (`compile_weights`); `scores(node, kids, tasks)`: its
    scores `{task: array}` from its children's (`naive_scores`, the reference for the compiled weights)."""

    name: str
    parse: Callable[[str, Mapping, tuple[str, ...]], Node]
    weights: Callable[[Node, list[np.ndarray]], np.ndarray]
    scores: Callable[[Node, list[dict[str, np.ndarray]], tuple[str, ...]], dict[str, np.ndarray]]


NODE_TYPES: Registry[NodeType] = Registry(
    "ensemble node type", lambda name, known: f"type must be one of {known}, got {name!r}")
register_node_type = NODE_TYPES.register


register_node_type(NodeType(
    "average", _parse_average,
    weights=lambda node, kids: sum(w * k for w, k in zip(node.weights, kids)),
    scores=lambda node, kids, tasks: {t: sum(w * k[t] for w, k in zip(node.weights, kids)) for t in kids[0]},
))
register_node_type(NodeType(
    "task", _parse_task,
    weights=lambda node, kids: np.stack([k[i] for i, k in enumerate(kids)]),
    scores=lambda node, kids, tasks: {t: kids[i][t] for i, t in enumerate(tasks) if t in kids[i]},
))


def _parse_node(name: str, d: Any, tasks: tuple[str, ...]) -> Node:
    d = _as_mapping(d, f"node {name!r}")
    kind = d.get("type")
    if kind not in NODE_TYPES:
        raise SpecError(f"node {name!r}: type must be one of {list(NODE_TYPES)}, got {kind!r}")
    return NODE_TYPES[kind].parse(name, d, tasks)


def _check_graph(members: Mapping[str, Path], nodes: Mapping[str, Node]) -> None:
    known = list(members) + list(nodes)
    for node in nodes.values():
        for c in node.children:
            if c not in members and c not in nodes:
                raise SpecError(f"node {node.name!r} refers to unknown member or node {c!r} (known: {', '.join(known)})")
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(name: str, path: list[str]) -> None:
        if name in members or state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = path[path.index(name):] + [name]
            raise SpecError(f"cycle in ensemble spec: {' -> '.join(cycle)}")
        state[name] = 1
        for c in nodes[name].children:
            visit(c, path + [name])
        state[name] = 2

    for n in nodes:
        visit(n, [])


def parse_spec(d: Any, base_dir: str | Path = ".", results_dir: str | Path | None = None, check_runs: bool = True) -> EnsembleSpec:
    """Validate a spec dict (see module docstring). Member paths are resolved against the results dir.

    With `check_runs`, a member whose run directory does not exist is a `SpecError`.
    """
    d = _as_mapping(d, "ensemble spec")
    unknown = sorted(set(d) - set(_TOP_KEYS))
    if unknown:
        raise SpecError(f"unknown top-level key(s) {unknown} in ensemble spec (keys: {', '.join(_TOP_KEYS)})")
    base_dir = Path(base_dir)
    if results_dir is not None:
        root = Path(results_dir)
    elif d.get("results_dir") is not None:
        root = base_dir / str(d["results_dir"])
    else:
        root = base_dir
    raw_members = _as_mapping(d.get("members") or {}, "'members'")
    if not raw_members:
        raise SpecError("ensemble spec has no members")
    members: dict[str, Path] = {}
    for mid, run in raw_members.items():
        if not isinstance(run, (str, Path)) or str(run) == "":
            raise SpecError(f"member {mid!r}: expected a run directory path, got {run!r}")
        members[str(mid)] = (root / str(run)).resolve()
    nodes: dict[str, Node] = {}
    tasks = evaluated_tasks()
    for name, nd in _as_mapping(d.get("nodes") or {}, "'nodes'").items():
        name = str(name)
        if name in members:
            raise SpecError(f"node {name!r} has the same name as a member (names must be unique)")
        nodes[name] = _parse_node(name, nd, tasks)
    _check_graph(members, nodes)
    output = d.get("output")
    if output is not None and output not in nodes and output not in members:
        raise SpecError(f"output {output!r} is not a member or node of the spec")
    if check_runs:
        for mid, run in members.items():
            if not run.is_dir():
                raise SpecError(f"member {mid!r}: run directory {run} not found "
                                f"(member paths are relative to the results dir {root.resolve()}; see --results-dir)")
    return EnsembleSpec(members=members, nodes=nodes, output=output, results_dir=root.resolve(), tasks=tasks)


class _DuplicateKey(Exception):
    def __init__(self, key: Any, where: str):
        super().__init__(key, where)
        self.key, self.where = key, where


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key repeated in one mapping (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in seen:
                    raise _DuplicateKey(key, f"line {key_node.start_mark.line + 1}, first on line {seen[key] + 1}")
            except TypeError:  # an unhashable key: SafeLoader reports it
                break
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for k, v in pairs:
        if k in d:
            raise _DuplicateKey(k, "JSON object")
        d[k] = v
    return d


def load_spec(path: str | Path, results_dir: str | Path | None = None, check_runs: bool = True) -> EnsembleSpec:
    """Read a YAML (or JSON, a subset of YAML) spec file; see `parse_spec`. A key given twice in one mapping
    (e.g. a member or node defined twice) is an error naming the key, not the last one silently winning."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: ensemble spec file not found")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            d = json.loads(text, object_pairs_hook=_unique_pairs)
        else:
            d = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise SpecError(f"{path}: cannot parse the spec ({e})") from None
    except _DuplicateKey as e:
        raise SpecError(f"{path}: duplicate key {e.key!r} ({e.where}); each key, member and node may appear "
                        f"only once: rename or remove one") from None
    try:
        return parse_spec(d, path.parent, results_dir, check_runs)
    except SpecError as e:
        raise SpecError(f"{path}: {e}") from None


def compile_weights(spec: EnsembleSpec) -> dict[str, np.ndarray]:
    """Every member and node -> its weight matrix `W [len(spec.tasks), len(spec.models)]` (float64).

    A member is a one-hot row per task; an average node is the weighted sum of its children's matrices;
    a task node takes row t from the child named for task t.
    """
    cols, n = spec.columns(), len(spec.models)
    out: dict[str, np.ndarray] = {}
    for mid, c in cols.items():
        w = np.zeros((len(spec.tasks), n))
        w[:, c] = 1.0
        out[mid] = w

    def get(name: str) -> np.ndarray:
        if name not in out:
            node = spec.nodes[name]
            out[name] = NODE_TYPES[node.kind].weights(node, [get(c) for c in node.children])
        return out[name]

    for name in spec.nodes:
        get(name)
    return out


def combine(w: np.ndarray, model_scores: Mapping[str, np.ndarray], tasks: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Scores of one compiled member/node: `{task: sum_m w[t, m] * model_scores[task][m]}`.

    `model_scores[task]`: `[M, N, ...]` (M unique models); returns `[N, ...]` float64 per task present.
    """
    return {t: np.tensordot(w[tasks.index(t)], np.asarray(s, np.float64), axes=(0, 0))
            for t, s in model_scores.items() if t in tasks}


def naive_scores(spec: EnsembleSpec, name: str, member_scores: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Direct recursive evaluation of `name` from `member_scores[member_id][task]` (the reference for `combine`)."""
    if name in spec.members:
        return {t: np.asarray(s, np.float64) for t, s in member_scores[name].items()}
    node = spec.nodes[name]
    return NODE_TYPES[node.kind].scores(node, [naive_scores(spec, c, member_scores) for c in node.children], spec.tasks)
