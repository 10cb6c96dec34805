"""ONNX recurrent layers `LSTM`, `GRU`, `RNN` (opset 7 on; 14 adds `layout`, 22 bfloat16) and `ReverseSequence`.

The input projection `X W^T + Wb` is one matmul over all time steps; the recurrence runs a step per time step: a
Python loop when the sequence length is a static int, torch's `scan` (one traced step, exported as a loop, which
AOTInductor compiles) when it is symbolic. Semantics (the schemas): gates in ONNX's order (LSTM i, o, f, c; GRU z, r,
h); `activations` per direction (LSTM f, g, h; GRU f, g; RNN f), with `activation_alpha` / `activation_beta`
consumed in the order of the activations that take them (as ONNX Runtime does; absent ones default as the
corresponding ONNX op's); `clip` bounds every activation's input; `input_forget` couples LSTM's forget gate to
1 - input gate. With `sequence_lens`, a batch entry's steps from its length on leave its state unchanged and give
zero outputs, so Y_h / Y_c are the state at its last valid step, and the reverse direction starts at that step.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch._higher_order_ops.scan import scan

from qcompile.lowering.registry import get_converter, register_converter as reg
from qcompile.lowering.values import as_tensor

Activation = Callable[[torch.Tensor], torch.Tensor]
State = tuple  # (H,) or LSTM's (H, C), each [batch, hidden]
Step = Callable[[State, torch.Tensor], State]  # (state, the step's input projection) -> the next state

# ONNX's activation names -> the parameters each consumes; those without an ONNX op of their own are here
_PARAMETERS = {"Relu": (), "Tanh": (), "Sigmoid": (), "Softsign": (), "Softplus": (), "Affine": ("alpha", "beta"),
               "LeakyRelu": ("alpha",), "ThresholdedRelu": ("alpha",), "ScaledTanh": ("alpha", "beta"),
               "HardSigmoid": ("alpha", "beta"), "Elu": ("alpha",)}
_NON_OPS = {"Affine": lambda x, alpha=1.0, beta=0.0: alpha * x + beta,
            "ScaledTanh": lambda x, alpha=1.0, beta=1.0: alpha * torch.tanh(beta * x)}
_CANONICAL = {name.lower(): name for name in _PARAMETERS}


@dataclass(frozen=True)
class _Cell:
    """One recurrent op: its gate count, default activations and `make_step(ctx, R, Rb, activations, P)`."""

    gates: int
    activations: tuple[str, ...]
    make_step: Callable[..., Step]
    states: int = 1


def _lstm_step(ctx, r: torch.Tensor, rb: torch.Tensor, acts: list[Activation], p: torch.Tensor | None) -> Step:
    f, g, h = acts
    p_i, p_o, p_f = (0, 0, 0) if p is None else p.chunk(3)
    input_forget = bool(ctx.attr("input_forget", 0))

    def step(state: State, xw: torch.Tensor) -> State:
        h_prev, c_prev = state
        i, o, forget, c = (xw + h_prev @ r.T + rb).chunk(4, -1)
        i = f(i + p_i * c_prev)
        forget = 1 - i if input_forget else f(forget + p_f * c_prev)
        c = forget * c_prev + i * g(c)
        return f(o + p_o * c) * h(c), c
    return step


def _gru_step(ctx, r: torch.Tensor, rb: torch.Tensor, acts: list[Activation], p=None) -> Step:
    f, g = acts
    hidden = r.shape[-1]
    (r_zr, r_h), (rb_zr, rb_h) = r.split([2 * hidden, hidden]), rb.split([2 * hidden, hidden])
    linear_before_reset = bool(ctx.attr("linear_before_reset", 0))

    def step(state: State, xw: torch.Tensor) -> State:
        (h_prev,) = state
        x_zr, x_h = xw.split([2 * hidden, hidden], -1)
        z, reset = f(x_zr + h_prev @ r_zr.T + rb_zr).chunk(2, -1)
        if linear_before_reset:
            candidate = g(x_h + reset * (h_prev @ r_h.T + rb_h))
        else:
            candidate = g(x_h + (reset * h_prev) @ r_h.T + rb_h)
        return ((1 - z) * candidate + z * h_prev,)
    return step


def _rnn_step(ctx, r: torch.Tensor, rb: torch.Tensor, acts: list[Activation], p=None) -> Step:
    (f,) = acts
    return lambda state, xw: (f(xw + state[0] @ r.T + rb),)


_LSTM = _Cell(4, ("Sigmoid", "Tanh", "Tanh"), _lstm_step, states=2)
_GRU = _Cell(3, ("Sigmoid", "Tanh"), _gru_step)
_RNN = _Cell(1, ("Tanh",), _rnn_step)


@reg("LSTM", since=7)
def lstm(ctx, x, w, r, b=None, sequence_lens=None, initial_h=None, initial_c=None, p=None):
    return _recurrent(ctx, _LSTM, x, w, r, b, sequence_lens, [initial_h, initial_c], p)


@reg("GRU", since=7)
def gru(ctx, x, w, r, b=None, sequence_lens=None, initial_h=None):
    return _recurrent(ctx, _GRU, x, w, r, b, sequence_lens, [initial_h])


@reg("RNN", since=7)
def rnn(ctx, x, w, r, b=None, sequence_lens=None, initial_h=None):
    return _recurrent(ctx, _RNN, x, w, r, b, sequence_lens, [initial_h])


def _recurrent(ctx, cell: _Cell, x, w, r, b, sequence_lens, initial_states: list, p=None):
    """Y [seq, directions, batch, hidden] and the final states [directions, batch, hidden] (layout 1: batch first),
    as many as the node has outputs."""
    x = as_tensor(x)
    w, r = as_tensor(w).to(x.dtype), as_tensor(r).to(x.dtype)
    batch_first = bool(ctx.attr("layout", 0))
    if batch_first:
        x = x.transpose(0, 1)
    reverses = _directions(ctx)
    hidden = r.shape[-1]
    if w.shape[0] != len(reverses):
        raise ctx.fail(f"direction {ctx.attr('direction', 'forward')!r} needs W with {len(reverses)} directions, "
                       f"not {w.shape[0]}")
    b = x.new_zeros(len(reverses), 2 * cell.gates * hidden) if b is None else as_tensor(b).to(x.dtype)
    states = [_initial_state(s, batch_first, x, len(reverses), hidden) for s in initial_states]
    lens = None if sequence_lens is None else as_tensor(sequence_lens, x.device).reshape(-1, 1)
    acts = _activations(ctx, cell.activations, len(reverses))
    ys, finals = [], []
    for d, reverse in enumerate(reverses):
        wb, rb = b[d].chunk(2)
        peephole = None if p is None else as_tensor(p)[d].to(x.dtype)
        step = cell.make_step(ctx, r[d], rb, acts[d], peephole)
        final, y = _run(step, tuple(s[d] for s in states), x @ w[d].T + wb, lens, reverse)
        ys.append(y)
        finals.append(final)
    y = torch.stack(ys, 1)
    final_states = [torch.stack(s, 0) for s in zip(*finals)]
    if batch_first:
        y, final_states = y.permute(2, 0, 1, 3), [s.transpose(0, 1) for s in final_states]
    return (y, *final_states)[:max(ctx.num_outputs, 1)]


def _directions(ctx) -> list[bool]:
    """Whether each direction runs in reverse, in ONNX's order (forward first)."""
    direction = ctx.attr("direction", "forward")
    choices = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}
    if direction not in choices:
        raise ctx.fail(f"direction {direction!r} is not one of forward, reverse, bidirectional")
    return choices[direction]


def _initial_state(state, batch_first: bool, x: torch.Tensor, directions: int, hidden) -> torch.Tensor:
    """An initial state as [directions, batch, hidden] (zeros when absent)."""
    if state is None:
        return x.new_zeros(directions, x.shape[1], hidden)
    state = as_tensor(state).to(x.dtype)
    return state.transpose(0, 1) if batch_first else state


def _activations(ctx, defaults: tuple[str, ...], directions: int) -> list[list[Activation]]:
    """Each direction's activation functions, `clip` applied to their inputs."""
    needed = len(defaults) * directions
    names = list(ctx.attr("activations") or defaults * directions)
    if len(names) < needed:
        raise ctx.fail(f"{len(names)} activations given where {needed} are needed")
    alphas, betas = iter(ctx.attr("activation_alpha") or ()), iter(ctx.attr("activation_beta") or ())
    acts = [_activation(ctx, name, alphas, betas) for name in names[:needed]]  # RNN's schema default lists 2
    clip = ctx.attr("clip")
    if clip is not None:
        acts = [_clipped(act, float(clip)) for act in acts]
    return [acts[d * len(defaults):(d + 1) * len(defaults)] for d in range(directions)]


def _activation(ctx, name: str, alphas, betas) -> Activation:
    """The activation `name` (case-insensitive), taking its parameters from `alphas` / `betas` while they last;
    those named like an ONNX op are that op's converter."""
    canonical = _CANONICAL.get(name.lower())
    if canonical is None:
        raise ctx.fail(f"activation {name!r} is not one of {', '.join(_PARAMETERS)}")
    params = {}
    for key in _PARAMETERS[canonical]:
        value = next(alphas if key == "alpha" else betas, None)
        if value is not None:
            params[key] = float(value)
    if canonical in _NON_OPS:
        return lambda x: _NON_OPS[canonical](x, **params)
    op_ctx = dataclasses.replace(ctx, op_type=canonical, attrs=params, num_outputs=1, extra={})
    converter = get_converter("", canonical, ctx.opset, ctx.name)
    return lambda x: converter(op_ctx, x)


def _clipped(act: Activation, clip: float) -> Activation:
    return lambda x: act(torch.clamp(x, -clip, clip))


def _run(step: Step, state: State, xw: torch.Tensor, lens: torch.Tensor | None, reverse: bool):
    """Run `step` over the time steps of `xw` [seq, batch, gates * hidden]; returns the final state and the hidden
    states [seq, batch, hidden]. Steps at or past a batch entry's length (`lens` [batch, 1]) keep its state and
    output zeros."""

    def masked(state: State, inputs) -> tuple[State, torch.Tensor]:
        xw_t, t = inputs
        new = step(state, xw_t)
        if lens is None:
            return new, new[0].clone()  # scan's outputs may not alias its carry
        valid = t < lens
        new = tuple(torch.where(valid, n, s) for n, s in zip(new, state))
        return new, torch.where(valid, new[0], torch.zeros((), dtype=xw.dtype, device=xw.device))

    steps = xw.shape[0]
    if not isinstance(steps, int):  # symbolic length under torch.export: one traced step in a loop
        times = torch.arange(steps, device=xw.device)
        return scan(masked, state, (xw, times), reverse=reverse)
    outputs = [None] * steps
    for t in (reversed(range(steps)) if reverse else range(steps)):
        state, outputs[t] = masked(state, (xw[t], t))
    return state, torch.stack(outputs) if outputs else xw.new_zeros(0, *state[0].shape)


@reg("ReverseSequence", since=10)
def reverse_sequence(ctx, x, sequence_lens):
    """Reverses the first `sequence_lens[i]` elements along `time_axis` of each slice i along `batch_axis`."""
    x = as_tensor(x)
    time_axis, batch_axis = ctx.attr("time_axis", 0) % x.ndim, ctx.attr("batch_axis", 1) % x.ndim
    t = torch.arange(x.shape[time_axis], device=x.device).reshape(_along(time_axis, x.ndim))
    lens = as_tensor(sequence_lens, x.device).to(torch.int64).reshape(_along(batch_axis, x.ndim))
    index = torch.where(t < lens, lens - 1 - t, t)
    return torch.gather(x, time_axis, index.expand(x.shape))


def _along(axis: int, ndim: int) -> list[int]:
    """A view shape putting a vector on `axis` of a rank-`ndim` tensor."""
    return [-1 if i == axis else 1 for i in range(ndim)]
