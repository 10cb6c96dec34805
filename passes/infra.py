"""Pass infrastructure over onnx-graphsurgeon graphs (after onnx-ir / torch.fx passes).

A pass is a named object with `call(graph) -> PassResult`; `PassManager` runs a list of them,
aggregates their counters, dumps the graph around each pass when `QCOMPILE_DUMP_PASSES=<dir>`
is set, and wraps failures in a `PassError` that names the pass and the passes before it.
"""
from __future__ import annotations

import abc
import collections
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from qcompile.errors import LintError, PassError
from qcompile.passes import _graph as G

logger = logging.getLogger(__name__)

DUMP_ENV = "QCOMPILE_DUMP_PASSES"

__all__ = ["PassResult", "PassBase", "InPlacePass", "PassManager", "DUMP_ENV"]


@dataclass
class PassResult:
    """What a pass returns.

    Attributes:
        graph: the resulting graph (the input graph for in-place passes).
        modified: whether the pass changed the graph.
        stats: named counters (what the pass did, e.g. {"fused": 3}).
        declined: (node name, reason) for every candidate the pass looked at and left alone.
        notes: one-line summaries for the user of what the pass did that changes the model beyond its counters
            (e.g. "AWQ scales: 10 folded into previous ops, 2 kept as Mul (...)"); the build summary shows them.
    """

    graph: gs.Graph
    modified: bool
    stats: collections.Counter = field(default_factory=collections.Counter)
    declined: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class PassBase(abc.ABC):
    """A named graph pass: `requires(graph)`, then `call(graph)`, then `ensures(result.graph)`."""

    in_place: bool = False

    @property
    def name(self) -> str:
        return type(self).__name__

    def requires(self, graph: gs.Graph) -> None:
        """Raise if `graph` does not meet the pass's preconditions (default: none)."""

    def ensures(self, graph: gs.Graph) -> None:
        """Raise if the result does not meet the pass's postconditions (default: none)."""

    @abc.abstractmethod
    def call(self, graph: gs.Graph) -> PassResult:
        """Run the pass."""

    def __call__(self, graph: gs.Graph) -> PassResult:
        self.requires(graph)
        result = self.call(graph)
        if not isinstance(result, PassResult):
            raise TypeError(f"pass '{self.name}' returned {type(result).__name__}, expected PassResult")
        if self.in_place and result.graph is not graph:
            raise PassError(f"pass '{self.name}' is declared in-place but returned a different graph object")
        self.ensures(result.graph)
        for node, reason in result.declined:
            logger.debug("%s declined %s: %s", self.name, node, reason)
        logger.debug("%s: modified=%s %s", self.name, result.modified, dict(result.stats))
        return result


class InPlacePass(PassBase):
    """A pass that mutates the graph it is given and returns that same graph."""

    in_place = True


class PassManager:
    """Runs passes in order; the order is data (a list), not code.

    Args:
        passes (Sequence[PassBase]): the passes, run once each in order.
    """

    def __init__(self, passes):
        self.passes = list(passes)

    def run(self, graph: gs.Graph) -> PassResult:
        """Run every pass; stats are keyed "<pass>.<counter>", declines and notes prefixed with the pass name.

        Raises:
            PassError: a pass failed (message: "pass 'X' failed after [A, B]: <cause>").
            LintError: the Q/DQ linter rejected the graph (passed through unchanged).
        """
        stats: collections.Counter = collections.Counter()
        declined: list[tuple[str, str]] = []
        notes: list[str] = []
        modified = False
        done: list[str] = []
        dump_dir = os.environ.get(DUMP_ENV)
        for index, pass_ in enumerate(self.passes):
            if dump_dir:
                _dump(graph, dump_dir, f"{index:02d}_{pass_.name}_before.onnx")
            try:
                result = pass_(graph)
            except LintError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure gets the pass context
                raise PassError(f"pass '{pass_.name}' failed after [{', '.join(done)}]: {exc}") from exc
            graph = result.graph
            if dump_dir:
                _dump(graph, dump_dir, f"{index:02d}_{pass_.name}_after.onnx")
            modified |= result.modified
            for key, value in result.stats.items():
                stats[f"{pass_.name}.{key}"] += value
            declined.extend((node, f"{pass_.name}: {reason}") for node, reason in result.declined)
            notes.extend(f"{pass_.name}: {note}" for note in result.notes)
            done.append(pass_.name)
        return PassResult(graph, modified, stats, declined, notes)

    __call__ = run


def _dump(graph: gs.Graph, directory: str, file_name: str) -> None:
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    try:
        onnx.save(G.plain_export(graph), str(path / file_name))
    except Exception as exc:  # noqa: BLE001 - a failed dump must not fail the build
        logger.warning("could not dump graph to %s: %s", path / file_name, exc)
