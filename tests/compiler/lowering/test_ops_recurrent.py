"""LSTM, GRU, RNN and ReverseSequence through the lowering on fresh random data, against ONNX Runtime (the recurrent
ops: ONNX's reference evaluator ignores sequence_lens and most attributes) and ONNX's reference evaluator
(ReverseSequence); and LSTM under torch.export with a dynamic sequence length. ONNX's own node cases run in
test_conformance.py."""
import numpy as np
import pytest
import torch
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator
from qc_testutil import ort_session

from qcompile.lowering import lower_onnx

F32, I32, I64 = TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64


def _model(op: str, inputs: dict, outputs: list[str], opset: int = 22, **attrs):
    """One `op` node; `inputs` maps its input slots in order to (type, shape), None for an absent one."""
    names = [name if spec else "" for name, spec in inputs.items()]
    node = helper.make_node(op, names, outputs, **attrs)
    values = [helper.make_tensor_value_info(name, *spec) for name, spec in inputs.items() if spec]
    graph = helper.make_graph([node], "g", values, [helper.make_tensor_value_info(o, F32, None) for o in outputs if o])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _random_feeds(model, rng, ints: dict) -> dict:
    """Normal floats for the float inputs; integer inputs from `ints`."""
    feeds = {}
    for value in model.graph.input:
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = ints[value.name] if value.name in ints else rng.standard_normal(shape).astype(np.float32)
    return feeds


def _lower_and_run(model, feeds) -> list[np.ndarray]:
    got = lower_onnx(model)(*[torch.from_numpy(feeds[v.name]) for v in model.graph.input])
    return [g.numpy() for g in got]


def _check_against_ort(model, feeds) -> list[np.ndarray]:
    want = ort_session(model).run(None, feeds)
    got = _lower_and_run(model, feeds)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5)
    return got


def _lstm_inputs(seq, batch, size, hidden, directions, batch_first=False) -> dict:
    outer = [batch, seq] if batch_first else [seq, batch]
    state = [batch, directions, hidden] if batch_first else [directions, batch, hidden]
    return {"X": (F32, [*outer, size]), "W": (F32, [directions, 4 * hidden, size]),
            "R": (F32, [directions, 4 * hidden, hidden]), "B": (F32, [directions, 8 * hidden]),
            "lens": (I32, [batch]), "h0": (F32, state), "c0": (F32, state), "P": (F32, [directions, 3 * hidden])}


def test_bidirectional_lstm_with_peepholes_bias_initial_states_and_sequence_lens_matches_onnxruntime():
    """Every input and output; sequences shorter than the input give zeros past their length, and Y_h / Y_c are
    each direction's state at its last valid step (the reverse direction starting from it)."""
    rng = np.random.default_rng(11)
    seq, batch, hidden = 6, 4, 5
    model = _model("LSTM", _lstm_inputs(seq, batch, 3, hidden, 2), ["Y", "Y_h", "Y_c"], hidden_size=hidden,
                   direction="bidirectional")
    lens = np.array([6, 2, 4, 1], np.int32)
    y, y_h, y_c = _check_against_ort(model, _random_feeds(model, rng, {"lens": lens}))
    assert y.shape == (seq, 2, batch, hidden) and y_h.shape == y_c.shape == (2, batch, hidden)
    for b, n in enumerate(lens):
        assert not y[n:, :, b].any() and y[:n, :, b].all()
        np.testing.assert_array_equal(y_h[0, b], y[n - 1, 0, b])  # forward ends at the last valid step
        np.testing.assert_array_equal(y_h[1, b], y[0, 1, b])  # reverse ends at the first


def test_lstm_coupled_gates_and_activation_parameters_consumed_in_order_match_onnxruntime():
    """input_forget, and activation_alpha / beta taken in turn by the activations that use them (HardSigmoid takes
    alpha and beta, LeakyRelu the second alpha, Elu the third) in a reverse LSTM with only its Y_c output."""
    rng = np.random.default_rng(12)
    inputs = {**_lstm_inputs(5, 3, 4, 6, 1), "lens": None}
    model = _model("LSTM", inputs, ["", "", "Y_c"], hidden_size=6, direction="reverse", input_forget=1,
                   activations=["HardSigmoid", "LeakyRelu", "Elu"], activation_alpha=[0.3, 0.4, 0.7],
                   activation_beta=[0.6])
    (y_c,) = _check_against_ort(model, _random_feeds(model, rng, {}))
    assert y_c.shape == (1, 3, 6)


@pytest.mark.parametrize("linear_before_reset", [0, 1])
def test_batch_first_bidirectional_gru_matches_onnxruntime(linear_before_reset):
    """layout 1 (X, initial_h, Y and Y_h batch first; ONNX Runtime has no layout 1, so it runs the layout 0 node on
    the transposed tensors), both linear_before_reset forms, sequence_lens."""
    rng = np.random.default_rng(13 + linear_before_reset)
    batch, seq, size, hidden = 3, 5, 4, 6
    inputs = {"X": (F32, [batch, seq, size]), "W": (F32, [2, 3 * hidden, size]), "R": (F32, [2, 3 * hidden, hidden]),
              "B": (F32, [2, 6 * hidden]), "lens": (I32, [batch]), "h0": (F32, [batch, 2, hidden])}
    attrs = {"hidden_size": hidden, "direction": "bidirectional", "linear_before_reset": linear_before_reset}
    model = _model("GRU", inputs, ["Y", "Y_h"], layout=1, **attrs)
    feeds = _random_feeds(model, rng, {"lens": np.array([5, 3, 1], np.int32)})
    y, y_h = _lower_and_run(model, feeds)
    seq_first = {**inputs, "X": (F32, [seq, batch, size]), "h0": (F32, [2, batch, hidden])}
    want_y, want_h = ort_session(_model("GRU", seq_first, ["Y", "Y_h"], **attrs)).run(
        None, {**feeds, "X": feeds["X"].transpose(1, 0, 2), "h0": feeds["h0"].transpose(1, 0, 2)})
    np.testing.assert_allclose(y, want_y.transpose(2, 0, 1, 3), atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(y_h, want_h.transpose(1, 0, 2), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("activation,params", [("LeakyRelu", {"activation_alpha": [0.2]}),
                                               ("Affine", {"activation_alpha": [0.5], "activation_beta": [0.1]})])
def test_rnn_with_a_non_default_activation_matches_onnxruntime(activation, params):
    rng = np.random.default_rng(15)
    inputs = {"X": (F32, [4, 2, 3]), "W": (F32, [1, 5, 3]), "R": (F32, [1, 5, 5]), "B": (F32, [1, 10]),
              "lens": None, "h0": (F32, [1, 2, 5])}
    model = _model("RNN", inputs, ["Y", "Y_h"], hidden_size=5, activations=[activation], **params)
    _check_against_ort(model, _random_feeds(model, rng, {}))


@pytest.mark.parametrize("batch_axis,time_axis", [(0, 1), (1, 0)])
def test_reverse_sequence_matches_the_reference(batch_axis, time_axis):
    rng = np.random.default_rng(16 + batch_axis)
    shape = [0, 0, 3]
    shape[batch_axis], shape[time_axis] = 4, 6
    model = _model("ReverseSequence", {"x": (F32, shape), "lens": (I64, [4])}, ["y"], opset=10,
                   batch_axis=batch_axis, time_axis=time_axis)
    feeds = _random_feeds(model, rng, {"lens": np.array([6, 1, 3, 4], np.int64)})
    (want,) = ReferenceEvaluator(model).run(None, feeds)
    (got,) = _lower_and_run(model, feeds)
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, feeds["x"])


def test_lstm_exports_with_a_dynamic_sequence_length_and_matches_onnxruntime_at_two_lengths():
    """A symbolic sequence length makes the recurrence torch's scan (one traced step): the exported program runs
    other lengths, with sequence_lens and both directions."""
    rng = np.random.default_rng(17)
    batch, size, hidden = 3, 4, 5
    inputs = {**_lstm_inputs(7, batch, size, hidden, 2), "P": None}
    model = _model("LSTM", inputs, ["Y", "Y_h", "Y_c"], hidden_size=hidden, direction="bidirectional")
    feeds = _random_feeds(model, rng, {"lens": np.array([7, 2, 5], np.int32)})
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "seq"
    seq = torch.export.Dim("seq", min=2, max=64)
    examples = tuple(torch.from_numpy(feeds[v.name]) for v in model.graph.input)
    exported = torch.export.export(lower_onnx(model), examples, dynamic_shapes=(({0: seq},) + (None,) * 6,))
    assert "scan" in str(exported.graph)
    for length in (7, 12):
        feeds["X"] = rng.standard_normal((length, batch, size)).astype(np.float32)
        got = exported.module()(*[torch.from_numpy(feeds[v.name]) for v in model.graph.input])
        for g, w in zip(got, ort_session(model).run(None, feeds)):
            np.testing.assert_allclose(g.numpy(), w, atol=2e-5, rtol=2e-5)
