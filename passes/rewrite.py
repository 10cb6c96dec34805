"""Rewrite rules (after the onnxscript rewriter): `match`, `check`, `rewrite`, and a pass to run them.

A rule anchors on one node (its op type is in `pattern`). `match` binds the surrounding structure
(returning None when the graph does not even look like the pattern, which is not a decline);
`check` decides and explains (`MatchResult.fail("weight scale is not constant")`); `rewrite`
changes the graph and returns the new nodes, which are tagged with the rule's name.
"""
from __future__ import annotations

import abc
import collections
import logging
from typing import Any, ClassVar

import onnx_graphsurgeon as gs

from qcompile.passes._graph import RULE_KEY, node_metadata
from qcompile.passes.infra import InPlacePass, PassResult

logger = logging.getLogger(__name__)

__all__ = ["MatchResult", "RewriteRule", "RewritePass"]


class MatchResult:
    """The outcome of `RewriteRule.check`: truthy when the rule applies, else carries the reason."""

    __slots__ = ("reason",)

    def __init__(self, reason: str | None = None):
        self.reason = reason

    @classmethod
    def ok(cls) -> "MatchResult":
        return cls()

    @classmethod
    def fail(cls, reason: str) -> "MatchResult":
        return cls(reason)

    def __bool__(self) -> bool:
        return self.reason is None

    def __repr__(self) -> str:
        return "MatchResult.ok()" if self else f"MatchResult.fail({self.reason!r})"


class RewriteRule(abc.ABC):
    """One fusion or rewrite. Subclasses set `pattern` and implement `match`, `check`, `rewrite`."""

    pattern: ClassVar[tuple[str, ...]] = ()

    @property
    def name(self) -> str:
        return type(self).__name__

    @abc.abstractmethod
    def match(self, graph: gs.Graph, node: gs.Node) -> dict[str, Any] | None:
        """Bind the structure around `node` (a dict of names -> nodes/tensors), or None."""

    def check(self, graph: gs.Graph, **bound) -> MatchResult:
        """Decide whether to rewrite; `MatchResult.fail(reason)` to decline."""
        return MatchResult.ok()

    @abc.abstractmethod
    def rewrite(self, graph: gs.Graph, **bound) -> list[gs.Node]:
        """Change the graph; return the nodes created (they get tagged with the rule name)."""


class RewritePass(InPlacePass):
    """Applies rules once over every node (in graph order); counts rewrites per rule, collects declines.

    Args:
        rules (Sequence[RewriteRule]): tried in order on each node; the first that rewrites wins.
        name (str): the pass name (defaults to "RewritePass").
    """

    def __init__(self, rules, name: str | None = None):
        self.rules = list(rules)
        self._name = name

    @property
    def name(self) -> str:
        return self._name or type(self).__name__

    def skips(self, graph: gs.Graph, node: gs.Node) -> bool:
        """Whether `node` is another pass's to handle: no rule is tried on it and nothing is declined."""
        return False

    def call(self, graph: gs.Graph) -> PassResult:
        stats: collections.Counter = collections.Counter()
        declined: list[tuple[str, str]] = []
        meta = node_metadata(graph)
        for node in list(graph.nodes):
            if not node.outputs:  # removed by an earlier rewrite
                continue
            if any(node.op in rule.pattern for rule in self.rules) and self.skips(graph, node):
                continue
            for rule in self.rules:
                if node.op not in rule.pattern:
                    continue
                bound = rule.match(graph, node)
                if bound is None:
                    continue
                verdict = rule.check(graph, **bound)
                if not verdict:
                    declined.append((node.name, f"{rule.name}: {verdict.reason}"))
                    stats[f"{rule.name}.declined"] += 1
                    continue
                for new in rule.rewrite(graph, **bound):
                    meta.setdefault(new.name, {})[RULE_KEY] = rule.name
                stats[rule.name] += 1
                break
        modified = any(v for k, v in stats.items() if not k.endswith(".declined"))
        if modified:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(graph, modified, stats, declined)
