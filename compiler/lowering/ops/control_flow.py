"""ONNX control flow: `If` (opset 1-25), `Loop` (1-25) and `Scan` (8; 9 on).

Their GRAPH attributes arrive lowered: the interpreter makes each a `SubgraphProgram` once (its initializers and
Constants are buffers of the program), and `graph.call(inputs, outer)` runs it, `outer` (the converter's `outer=`
keyword) holding the enclosing values the subgraph reads by name.

How each runs, in eager runs and under `torch.export` (tracing):
- If: a static condition (a constant, shape arithmetic) runs only the chosen branch, inlined. A runtime condition
  picks the branch with Python in eager runs; under export it becomes `torch.cond`, which needs both branches to
  return tensors of the same shapes and dtypes (else a LoweringError).
- Loop: in eager runs a Python loop. Under export, a static trip count with an absent or static condition (one that
  stays a constant, e.g. the body passes it through) is unrolled; anything else becomes torch's `while_loop`,
  whose carried values must keep their shapes and dtypes, and which cannot give scan outputs (their count is only
  known at run time): such a Loop does not export.
- Scan: a Python loop over a static sequence length, torch's `scan` (one traced step, exported as a loop) over a
  symbolic one. Opset 8's batched form runs per batch entry: it exports with a static batch size and absent or
  static `sequence_lens`.
"""
from __future__ import annotations

import torch
from torch._higher_order_ops.scan import scan
from torch._higher_order_ops.while_loop import while_loop

from qcompile.lowering.registry import register_converter as reg
from qcompile.lowering.values import IntList, as_tensor

_TRUE = IntList((1,), True, torch.bool)


class _RuntimeCondition(Exception):
    """A loop condition became a runtime tensor while tracing: the loop cannot be unrolled."""


@reg("If")
def if_(ctx, cond, *, outer):
    then_branch, else_branch = ctx.attr("then_branch"), ctx.attr("else_branch")
    chosen = _static_bool(cond)
    if chosen is None and not _tracing():
        chosen = bool(cond)
    if chosen is not None:
        return _results(ctx, (then_branch if chosen else else_branch).call([], outer))
    names = [n for n, v in outer.items() if isinstance(v, torch.Tensor)]

    def branch(graph):
        def run(*values):
            outputs = graph.call([], {**outer, **dict(zip(names, values))})
            return tuple(_unaliased(as_tensor(v), values) for v in outputs)
        return run

    pred = as_tensor(cond).reshape(()).bool()
    try:
        return _results(ctx, torch.cond(pred, branch(then_branch), branch(else_branch), [outer[n] for n in names]))
    except Exception as exc:
        raise ctx.fail("under export a runtime condition needs torch.cond, whose branches must return tensors of the "
                       f"same shapes and dtypes: {type(exc).__name__}: {str(exc)[:300]}") from exc


@reg("Loop")
def loop(ctx, trip_count=None, cond=None, *carried, outer):
    body = ctx.attr("body")
    limit = _static_int(trip_count)
    if not _tracing():
        return _python_loop(ctx, int(trip_count) if limit is None and trip_count is not None else limit,
                            cond, carried, outer)
    if (trip_count is None or limit is not None) and (cond is None or _static_bool(cond) is not None):
        try:
            return _python_loop(ctx, limit, cond, carried, outer)
        except _RuntimeCondition:
            pass  # the unrolled steps traced so far are dead code
    if len(body.output_names) > 1 + len(carried):
        raise ctx.fail("a Loop with scan outputs exports only with a static trip count and a static condition (a "
                       "runtime one needs torch's while_loop, which cannot give outputs of a data-dependent count)")
    return _while_loop(ctx, trip_count, cond, carried, outer)


@reg("Scan", since=9)
def scan9(ctx, *inputs, outer):
    count = ctx.attr("num_scan_inputs")
    states, xs = list(inputs[:len(inputs) - count]), [as_tensor(x) for x in inputs[len(inputs) - count:]]
    axes = ctx.attr("scan_input_axes") or [0] * count
    xs = [x.movedim(axis % x.ndim, 0) for x, axis in zip(xs, axes)]
    states, ys = _scan(ctx, states, xs, ctx.attr("scan_input_directions") or [0] * count, outer)
    out_axes = ctx.attr("scan_output_axes") or [0] * len(ys)
    out_directions = ctx.attr("scan_output_directions") or [0] * len(ys)
    ys = [(y.flip(0) if reverse else y).movedim(0, axis % y.ndim) for y, axis, reverse in zip(ys, out_axes,
                                                                                               out_directions)]
    return (*states, *ys)


@reg("Scan", since=8)
def scan8(ctx, sequence_lens, *inputs, outer):
    """Opset 8: axis 0 of every input is a batch; each entry scans its first `sequence_lens[b]` steps (outputs are
    zero past them)."""
    count = ctx.attr("num_scan_inputs")
    inputs = [as_tensor(x) for x in inputs]
    directions = ctx.attr("directions") or [0] * count
    lengths = None if sequence_lens is None else _lengths(ctx, sequence_lens)
    finals, outputs = [], []
    for b in range(inputs[0].shape[0]):
        xs = [x[b] for x in inputs[len(inputs) - count:]]
        if lengths is not None:
            xs = [x[:lengths[b]] for x in xs]
        states, ys = _scan(ctx, [s[b] for s in inputs[:len(inputs) - count]], xs, directions, outer)
        finals.append(states)
        outputs.append(ys)
    steps = inputs[-1].shape[1]
    outputs = [[_pad_steps(y, steps) for y in ys] for ys in outputs]
    return tuple(torch.stack(values) for values in [*zip(*finals), *zip(*outputs)])


def _results(ctx, outputs):
    """The node's outputs: one value, or a tuple of them."""
    outputs = tuple(outputs)
    return outputs[0] if ctx.num_outputs == 1 and len(outputs) == 1 else outputs


def _tracing() -> bool:
    return torch.compiler.is_compiling()


def _static_bool(value) -> bool | None:
    """The truth of a static condition (an IntList of Python ints), None for a runtime (or symbolic) one."""
    if isinstance(value, IntList) and all(isinstance(v, int) for v in value.values):
        return bool(value.values[0])
    return None


def _static_int(value) -> int | None:
    """A static trip count as an int (None when absent, runtime or symbolic)."""
    if isinstance(value, IntList) and all(isinstance(v, int) for v in value.values):
        return value.values[0]
    return None


def _truth(value) -> bool:
    """A loop condition's truth: with Python outside tracing, else only when it is static."""
    static = _static_bool(value)
    if static is not None:
        return static
    if _tracing():
        raise _RuntimeCondition()
    return bool(value)


def _unaliased(value: torch.Tensor, inputs) -> torch.Tensor:
    """`value`, copied when it is one of `inputs` (torch's control-flow ops forbid outputs aliasing inputs)."""
    return value.clone() if any(value is x for x in inputs) else value


def _python_loop(ctx, limit: int | None, cond, carried, outer):
    """Iterate the body in Python (`limit` None: no bound); the final carried values, then the scan outputs."""
    body, count = ctx.attr("body"), len(carried)
    keep = _TRUE if cond is None else cond
    steps, i = [], 0
    while (limit is None or i < limit) and _truth(keep):
        outputs = body.call([IntList((i,), True), keep, *carried], outer)
        keep, carried = outputs[0], outputs[1:1 + count]
        steps.append(outputs[1 + count:])
        i += 1
    scans = [torch.stack([as_tensor(s[k]) for s in steps]) if steps else _empty(body, 1 + count + k)
             for k in range(len(body.output_names) - 1 - count)]
    return _results(ctx, [*carried, *scans])


def _empty(body, index: int) -> torch.Tensor:
    """A scan output of no iterations."""
    return torch.empty(0, dtype=body.output_dtype(index) or torch.float32)


def _while_loop(ctx, trip_count, cond, carried, outer):
    """torch's while_loop over (iteration, condition, *carried values); carried values keep shapes and dtypes."""
    body = ctx.attr("body")
    limit = None if trip_count is None else as_tensor(trip_count).reshape(())
    keep = as_tensor(_TRUE if cond is None else cond).reshape(()).bool()
    carried = [as_tensor(v) for v in carried]

    def go_on(i, keep, *values):
        return keep if limit is None else keep & (i < limit)

    def step(i, keep, *values):
        outputs = body.call([i, keep, *values], outer)
        new = [_unaliased(as_tensor(v).to(old.dtype), (i, keep, *values)) for v, old in zip(outputs[1:], values)]
        return i + 1, as_tensor(outputs[0]).reshape(()).bool().clone(), *new

    start = torch.zeros((), dtype=torch.int64 if limit is None else limit.dtype)
    try:
        _, _, *final = while_loop(go_on, step, (start, keep, *carried))
    except Exception as exc:
        raise ctx.fail("under export a runtime trip count or condition needs torch's while_loop, whose carried "
                       f"values must keep their shapes and dtypes: {type(exc).__name__}: {str(exc)[:300]}") from exc
    return _results(ctx, final)


def _scan(ctx, states, xs, directions, outer):
    """Run the body over axis 0 of `xs` (reversed where `directions` says 1); the final states and the scan outputs
    stacked along axis 0 in step order."""
    body = ctx.attr("body")
    xs = [x.flip(0) if reverse else x for x, reverse in zip(xs, directions)]
    states = [as_tensor(s) for s in states]
    steps = xs[0].shape[0]
    if isinstance(steps, int):
        outputs = []
        for t in range(steps):
            values = body.call([*states, *[x[t] for x in xs]], outer)
            states, step_outputs = values[:len(states)], values[len(states):]
            outputs.append([as_tensor(y) for y in step_outputs])
        count = len(body.output_names) - len(states)
        ys = [torch.stack([o[k] for o in outputs]) if outputs else _empty(body, len(states) + k)
              for k in range(count)]
        return [as_tensor(s) for s in states], ys

    count = len(states)
    dummy = [] if states else [torch.zeros((), device=xs[0].device)]  # torch's scan needs a carry

    def combine(carry, inputs):
        state = carry[:count]
        values = [as_tensor(v) for v in body.call([*state, *inputs], outer)]
        new = [_unaliased(v.to(old.dtype), (*state, *inputs)) for v, old in zip(values, state)]
        ys = [_unaliased(y, (*state, *inputs, *new)) for y in values[count:]]
        return new + [d.clone() for d in carry[count:]], ys

    final, ys = scan(combine, states + dummy, xs)
    return list(final)[:count], list(ys)


def _lengths(ctx, sequence_lens) -> list:
    """Opset 8's per-batch sequence lengths as Python ints."""
    if isinstance(sequence_lens, IntList):
        return list(sequence_lens.values)
    if _tracing():
        raise ctx.fail("Scan-8 with runtime sequence_lens does not export (each batch entry's length is data)")
    return [int(v) for v in sequence_lens.reshape(-1).tolist()]


def _pad_steps(y: torch.Tensor, steps) -> torch.Tensor:
    """A batch entry's scan output padded with zeros to `steps` steps."""
    missing = steps - y.shape[0]
    return y if isinstance(missing, int) and missing == 0 else torch.cat([y, y.new_zeros(missing, *y.shape[1:])])
