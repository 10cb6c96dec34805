"""ONNX If, Loop and Scan through the lowering, on fresh random data against ONNX's reference evaluator or ONNX
Runtime: subgraphs reading outer-scope values, an initializer inside a branch, loop-carried values and scan outputs,
a runtime loop condition, scan directions and axes, a Loop whose body holds an If; and torch.export of an If with a
runtime condition and of a Scan over a symbolic length. ONNX's own node cases run in test_conformance.py."""
import numpy as np
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from qc_testutil import ort_session

from qcompile.lowering import lower_onnx

F32, I64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL


def _value(name, elem_type, shape):
    return helper.make_tensor_value_info(name, elem_type, shape)


def _model(nodes, inputs, outputs, initializers=(), opset=16):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _lowered(model, feeds):
    """The lowering's outputs as numpy arrays."""
    got = lower_onnx(model)(*[torch.from_numpy(np.asarray(feeds[v.name])) for v in model.graph.input])
    return [g.numpy() for g in got]


def _assert_matches(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape, (g.shape, w.shape)
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def _if_model():
    """out = If(c): then (x + y) * w (w an initializer of the branch), else (x + y) - x - 2 (a Constant)."""
    rng = np.random.default_rng()
    w = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "w")
    then_branch = helper.make_graph([helper.make_node("Mul", ["s", "w"], ["t"])], "then", [],
                                    [_value("t", F32, [3, 4])], initializer=[w])
    two = helper.make_tensor("two_value", F32, [], [2.0])
    else_branch = helper.make_graph([helper.make_node("Sub", ["s", "x"], ["d"]),
                                     helper.make_node("Constant", [], ["two"], value=two),
                                     helper.make_node("Sub", ["d", "two"], ["e"])], "else", [],
                                    [_value("e", F32, [3, 4])])
    nodes = [helper.make_node("Add", ["x", "y"], ["s"]),
             helper.make_node("If", ["c"], ["out"], then_branch=then_branch, else_branch=else_branch)]
    return _model(nodes, [_value("c", BOOL, []), _value("x", F32, [3, 4]), _value("y", F32, [3, 4])],
                  [_value("out", F32, [3, 4])])


def _if_feeds(rng, condition: bool, rows: int = 3):
    return {"c": np.array(condition), "x": rng.standard_normal((rows, 4)).astype(np.float32),
            "y": rng.standard_normal((rows, 4)).astype(np.float32)}


def test_if_with_a_runtime_condition_outer_values_and_a_branch_initializer_matches_the_reference():
    """Both branches taken; they read the outer `s` and `x`; the then branch's initializer is a buffer."""
    model, rng = _if_model(), np.random.default_rng()
    assert any(name.endswith(".c_w") for name, _ in lower_onnx(model).named_buffers())
    for condition in (True, False):
        feeds = _if_feeds(rng, condition)
        _assert_matches(_lowered(model, feeds), ReferenceEvaluator(model).run(None, feeds))


def test_if_with_a_runtime_condition_exports_through_torch_cond_and_runs_both_ways():
    model, rng = _if_model(), np.random.default_rng()
    rows = torch.export.Dim("rows", min=2, max=64)
    args = tuple(torch.from_numpy(v) for v in _if_feeds(rng, True).values())
    exported = torch.export.export(lower_onnx(model), args, dynamic_shapes=(({}, {0: rows}, {0: rows}),))
    assert any(n.target is torch.ops.higher_order.cond for n in exported.graph.nodes)
    for condition, count in ((True, 5), (False, 7)):
        feeds = _if_feeds(rng, condition, count)
        got = exported.module()(*[torch.from_numpy(v) for v in feeds.values()])
        want = ReferenceEvaluator(model).run(None, feeds)
        _assert_matches([g.numpy() for g in got], want)


def _loop_body(carried_and_scans, nodes, cond_out="cond_in"):
    """A Loop body: inputs (i, cond_in, *carried), outputs (cond_out, *carried outputs, *scan outputs)."""
    ins, outs = carried_and_scans
    inputs = [_value("i", I64, []), _value("cond_in", BOOL, []), *[_value(n, F32, None) for n in ins]]
    if cond_out == "cond_in":
        nodes = [*nodes, helper.make_node("Identity", ["cond_in"], ["cond_out"])]
    return helper.make_graph(nodes, "body", inputs, [_value("cond_out", BOOL, []),
                                                     *[_value(n, F32, None) for n in outs]])


def test_loop_with_a_static_trip_count_carried_value_and_scan_output_matches_onnx_runtime():
    """4 iterations (M an initializer, no condition): acc += x * i (x from the outer graph); scans 2 * acc."""
    body = _loop_body((["acc_in"], ["acc_out", "twice"]), [
        helper.make_node("Cast", ["i"], ["fi"], to=F32), helper.make_node("Mul", ["x", "fi"], ["xi"]),
        helper.make_node("Add", ["acc_in", "xi"], ["acc_out"]), helper.make_node("Add", ["acc_out", "acc_out"],
                                                                                 ["twice"])])
    model = _model([helper.make_node("Loop", ["m", "", "acc0"], ["acc", "scanned"], body=body)],
                   [_value("x", F32, [2, 3]), _value("acc0", F32, [2, 3])],
                   [_value("acc", F32, [2, 3]), _value("scanned", F32, [4, 2, 3])],
                   [numpy_helper.from_array(np.array(4, np.int64), "m")])
    rng = np.random.default_rng()
    feeds = {name: rng.standard_normal((2, 3)).astype(np.float32) for name in ("x", "acc0")}
    got = _lowered(model, feeds)
    assert got[1].shape == (4, 2, 3)
    _assert_matches(got, ort_session(model).run(None, feeds))


def _early_stop_model():
    """acc += x while sum(acc) < limit (an outer value), at most m times (m and the condition are graph inputs)."""
    body = _loop_body((["acc_in"], ["acc_out"]), [
        helper.make_node("Add", ["acc_in", "x"], ["acc_out"]), helper.make_node("ReduceSum", ["acc_out"], ["total"],
                                                                                keepdims=0),
        helper.make_node("Less", ["total", "limit"], ["cond_out"])], cond_out="cond_out")
    return _model([helper.make_node("Loop", ["m", "go", "acc0"], ["acc"], body=body)],
                  [_value("m", I64, []), _value("go", BOOL, []), _value("x", F32, [5]), _value("acc0", F32, [5]),
                   _value("limit", F32, [])], [_value("acc", F32, [5])])


def test_loop_with_a_runtime_condition_stops_early_like_onnx_runtime_also_exported_as_a_while_loop():
    rng = np.random.default_rng()
    x = rng.uniform(0.5, 1.0, 5).astype(np.float32)
    feeds = {"m": np.array(10, np.int64), "go": np.array(True), "x": x, "acc0": np.zeros(5, np.float32),
             "limit": np.array(2.5 * x.sum(), np.float32)}
    got = _lowered(_early_stop_model(), feeds)
    np.testing.assert_allclose(got[0], 3 * x, rtol=1e-5)  # stopped after 3 of 10 iterations
    _assert_matches(got, ort_session(_early_stop_model()).run(None, feeds))
    exported = torch.export.export(lower_onnx(_early_stop_model()), tuple(torch.from_numpy(v) for v in feeds.values()))
    assert any(n.target is torch.ops.higher_order.while_loop for n in exported.graph.nodes)
    for m, go, iterations in ((10, True, 3), (2, True, 2), (10, False, 0)):
        feeds.update(m=np.array(m, np.int64), go=np.array(go))
        _assert_matches(_lowered(_early_stop_model(), feeds), [iterations * x])
        got = exported.module()(*[torch.from_numpy(v) for v in feeds.values()])
        _assert_matches([g.numpy() for g in got], [iterations * x])


def _scan_model():
    """Scan-16: state s [4]; scan inputs a [2, L, 4] (axis 1) and b [4, L] (axis -1, reversed); s += sum(a_t) * b_t;
    scan outputs s (reversed, axis 0) and 2 * a_t (axis 1)."""
    body = helper.make_graph([
        helper.make_node("ReduceSum", ["a_t", "zero"], ["a_sum"], keepdims=0),
        helper.make_node("Mul", ["a_sum", "b_t"], ["ab"]), helper.make_node("Add", ["s_in", "ab"], ["s_out"]),
        helper.make_node("Identity", ["s_out"], ["y1"]), helper.make_node("Add", ["a_t", "a_t"], ["y2"])],
        "body", [_value("s_in", F32, [4]), _value("a_t", F32, [2, 4]), _value("b_t", F32, [4])],
        [_value("s_out", F32, [4]), _value("y1", F32, [4]), _value("y2", F32, [2, 4])],
        initializer=[numpy_helper.from_array(np.array([0], np.int64), "zero")])
    node = helper.make_node("Scan", ["s0", "a", "b"], ["s", "y1s", "y2s"], body=body, num_scan_inputs=2,
                            scan_input_axes=[1, -1], scan_input_directions=[0, 1], scan_output_axes=[0, 1],
                            scan_output_directions=[1, 0])
    return _model([node], [_value("s0", F32, [4]), _value("a", F32, [2, "L", 4]), _value("b", F32, [4, "L"])],
                  [_value("s", F32, [4]), _value("y1s", F32, None), _value("y2s", F32, None)])


def _scan_feeds(rng, length):
    return {"s0": rng.standard_normal(4).astype(np.float32),
            "a": rng.standard_normal((2, length, 4)).astype(np.float32),
            "b": rng.standard_normal((4, length)).astype(np.float32)}


def test_scan_with_two_inputs_a_reverse_direction_and_nonzero_axes_matches_onnx_runtime():
    rng = np.random.default_rng()
    feeds = _scan_feeds(rng, 5)
    got = _lowered(_scan_model(), feeds)
    assert [g.shape for g in got] == [(4,), (5, 4), (2, 5, 4)]
    _assert_matches(got, ort_session(_scan_model()).run(None, feeds))


def test_scan_over_a_symbolic_length_exports_and_matches_at_two_lengths():
    model, rng = _scan_model(), np.random.default_rng()
    length = torch.export.Dim("length", min=2, max=64)
    args = tuple(torch.from_numpy(v) for v in _scan_feeds(rng, 3).values())
    exported = torch.export.export(lower_onnx(model), args, dynamic_shapes=(({}, {1: length}, {1: length}),))
    assert any(n.target is torch.ops.higher_order.scan for n in exported.graph.nodes)
    session = ort_session(model)
    for steps in (4, 9):
        feeds = _scan_feeds(rng, steps)
        got = exported.module()(*[torch.from_numpy(v) for v in feeds.values()])
        _assert_matches([g.numpy() for g in got], session.run(None, feeds))


def test_loop_whose_body_holds_an_if_matches_onnx_runtime():
    """Per iteration: acc = acc + x if sum(acc) > 0 else acc - 2x; the If reads the body's acc and the graph's x."""
    then_branch = helper.make_graph([helper.make_node("Add", ["acc_in", "x"], ["plus"])], "then", [],
                                    [_value("plus", F32, [6])])
    else_branch = helper.make_graph([helper.make_node("Add", ["x", "x"], ["x2"]),
                                     helper.make_node("Sub", ["acc_in", "x2"], ["minus"])], "else", [],
                                    [_value("minus", F32, [6])])
    body = _loop_body((["acc_in"], ["acc_out"]), [
        helper.make_node("ReduceSum", ["acc_in"], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["positive"]),
        helper.make_node("If", ["positive"], ["acc_out"], then_branch=then_branch, else_branch=else_branch)])
    model = _model([helper.make_node("Loop", ["m", "", "acc0"], ["acc"], body=body)],
                   [_value("x", F32, [6]), _value("acc0", F32, [6])], [_value("acc", F32, [6])],
                   [numpy_helper.from_array(np.array(6, np.int64), "m"),
                    numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    rng = np.random.default_rng()
    feeds = {"x": rng.standard_normal(6).astype(np.float32), "acc0": rng.standard_normal(6).astype(np.float32)}
    _assert_matches(_lowered(model, feeds), ort_session(model).run(None, feeds))
