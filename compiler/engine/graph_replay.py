"""One input shape of a CUDA engine captured as a CUDA graph and replayed.

An engine run launches every kernel from the host. At decode sizes (one token per sequence) the kernels are
short, and the launches cost more than the work: on the H200 the fp16 engine of two Llama-3-8B-sized layers
takes 0.44 ms where its weights stream in 0.20 ms (BENCHMARKS.md). Replaying a captured graph issues the whole
run as one launch. The graph is fixed to the shapes it was captured with. New feeds are copied into its
static input buffers, and the outputs are its static output tensors, which the next replay overwrites.

    engine = qcompile.load(path, run_single_threaded=True)  # the runner that capture needs
    replay = GraphReplay(engine, feeds)      # checks the feeds, warms up, captures
    outs = replay.run(new_feeds)             # same shapes; returns the static outputs
"""
from __future__ import annotations

import torch

from qcompile.errors import EngineError


class GraphReplay:
    """A captured run of `engine` at the shapes of `feeds` (CUDA engines only)."""

    def __init__(self, engine, feeds: dict, warmup: int = 3):
        if engine.device.type != "cuda":
            raise EngineError(f"CUDA graph replay needs a CUDA engine; {engine.path} runs on {engine.device}")
        if not engine.single_threaded:  # AOTInductor's default runner fails in capture ("operation not permitted")
            raise EngineError(f"CUDA graph replay needs the engine loaded with "
                              f"qcompile.load({str(engine.path)!r}, run_single_threaded=True)")
        self.engine = engine
        self._inputs = [t.clone() for t in engine.check_inputs(feeds)]
        self.shapes = {n: tuple(t.shape) for n, t in zip(engine.input_names, self._inputs)}
        side = torch.cuda.Stream(engine.device)
        side.wait_stream(torch.cuda.current_stream(engine.device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(warmup):  # first runs allocate workspaces and pick kernels outside the capture
                engine.run_torch(dict(zip(engine.input_names, self._inputs)))
        torch.cuda.current_stream(engine.device).wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        try:
            with torch.inference_mode(), torch.cuda.graph(self._graph):
                outs = engine.run_torch(dict(zip(engine.input_names, self._inputs)))
        except Exception as exc:  # an op that synchronizes or allocates on the host cannot be captured
            raise EngineError(f"engine {engine.path} cannot be captured as a CUDA graph "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0]}); run it without replay") from exc
        self._outputs = outs

    def run(self, feeds: dict) -> dict[str, torch.Tensor]:
        """Copy `feeds` (the captured shapes) into the graph's inputs, replay, return its output tensors."""
        for name, buf, value in zip(self.engine.input_names, self._inputs, self.engine.check_inputs(feeds)):
            if tuple(value.shape) != tuple(buf.shape):
                raise EngineError(f"input {name!r}: the graph was captured with shape {list(buf.shape)}, "
                                  f"got {list(value.shape)}; capture another GraphReplay for this shape")
            buf.copy_(value)
        self._graph.replay()
        return self._outputs

    def replay(self) -> dict[str, torch.Tensor]:
        """Replay on the inputs already in place (for timing)."""
        self._graph.replay()
        return self._outputs
