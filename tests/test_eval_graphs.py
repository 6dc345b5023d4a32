"""The batched evaluation's CUDA-graph path (``evaluation.GraphedActions``), run on the CPU with stand-ins for torch's
graph API: a stand-in graph records the forward captured into it and recomputes it into the same output tensor on
each replay, from whatever its input buffers then hold, as a CUDA graph does. The returns must be those of plain
forwards (the rows are computed one by one, so that row padding cannot change a row's rounding)."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from test_evaluation import RowwiseModel, make_model, norm_stats

from decision_transformer import evaluation as ev


class FakeGraph:
    capturing = None

    def __init__(self):
        self.replays = []

    def capture_begin(self, pool=None):
        FakeGraph.capturing = self

    def capture_end(self):
        FakeGraph.capturing = None

    def replay(self):
        for f in self.replays:
            f()


class FakeStream:
    def __init__(self, *a):
        pass

    def wait_stream(self, other):
        pass


class Capturable(RowwiseModel):
    """A forward called during a stand-in capture is recorded into the graph; ``fail`` makes the capture raise."""

    def __init__(self, model, fail=False):
        super().__init__(model)
        self.fail, self.calls = fail, 0

    def get_action(self, *xs):
        self.calls += 1
        graph = FakeGraph.capturing
        if graph is not None and self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        out = super().get_action(*xs)
        if graph is not None:
            graph.replays.append(lambda: out.copy_(super(Capturable, self).get_action(*xs)))
        return out


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(ev, "_CAPTURE_STREAMS", {})
    modes = []     # (the CPU build has no sync debug mode: the settings are recorded)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: modes[-1] if modes else 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    return modes


def graphed_eval(model, env, n, pool, groups=None):
    mean, std = norm_stats(env)
    graphed = ev.GraphedActions(model, torch.device("cpu"))
    res = ev._evaluate_batched(graphed, model.config.max_length, env, 3600.0, n, mean, std, 1, "normal",
                               torch.device("cpu"), pool, None, groups)
    return res, graphed


@pytest.mark.parametrize("groups", [2, 3])
def test_overlapped_groups_replay_their_own_graphs(fake_cuda, groups):
    """Groups of different sizes share graphs by shape; each group's actions are its own (cloned at once)."""
    model = make_model("hopper")
    mean, std = norm_stats("hopper")
    with contextlib.closing(ev.EnvPool("hopper")) as pool:
        plain = ev.evaluate_episodes(RowwiseModel(model), "hopper", 3600.0, 7, mean, std, seed=1, pool=pool,
                                     overlap_groups=groups)
        res, graphed = graphed_eval(Capturable(model), "hopper", 7, pool, groups)
    assert np.array_equal(res.returns, plain.returns) and np.array_equal(res.lengths, plain.lengths)
    assert not graphed.eager and fake_cuda[:2] == ["error", 0]     # each warm-up refuses host syncs


def test_a_capture_error_names_the_forward_s_own_error(fake_cuda, monkeypatch):
    model = Capturable(make_model("hopper"))
    inner = Capturable.get_action

    def fails_in_capture(self, *xs):
        if FakeGraph.capturing is not None:
            raise RuntimeError("the real cause: nonzero in the forward")
        return inner(self, *xs)

    def end_fails(self):
        FakeGraph.capturing = None
        raise RuntimeError("operation failed due to a previous error during capture")

    monkeypatch.setattr(Capturable, "get_action", fails_in_capture)
    monkeypatch.setattr(FakeGraph, "capture_end", end_fails)
    with contextlib.closing(ev.EnvPool("hopper")) as pool:
        with pytest.warns(RuntimeWarning, match="the real cause: nonzero in the forward"):
            _, graphed = graphed_eval(model, "hopper", 2, pool)
    assert graphed.eager


@pytest.mark.parametrize("env, n", [("hopper", 5), ("halfcheetah", 2)])
def test_graph_replays_give_the_returns_of_plain_forwards(fake_cuda, env, n):
    model = make_model(env)
    mean, std = norm_stats(env)
    with contextlib.closing(ev.EnvPool(env)) as pool:
        plain = ev.evaluate_episodes(RowwiseModel(model), env, 3600.0, n, mean, std, seed=1, pool=pool)
        res, graphed = graphed_eval(Capturable(model), env, n, pool)
    assert np.array_equal(res.returns, plain.returns) and np.array_equal(res.lengths, plain.lengths)
    assert not graphed.eager
    K = model.config.max_length
    rows = 1 << (n - 1).bit_length()
    # every window length while the history is shorter than K, then one shape per power-of-two row count
    assert {(rows, t) for t in range(1, K + 1)} <= set(graphed.graphs)
    assert all(r in (1, 2, 4, 8) and 1 <= t <= K for r, t in graphed.graphs)
    if env == "hopper":     # episodes of different lengths: fewer rows later, captured once each
        assert len(np.unique(plain.lengths)) > 1 and any(r < rows for r, _ in graphed.graphs)


def test_a_forward_that_cannot_be_captured_is_a_warning_and_plain_forwards(fake_cuda):
    model = make_model("hopper")
    mean, std = norm_stats("hopper")
    with contextlib.closing(ev.EnvPool("hopper")) as pool:
        plain = ev.evaluate_episodes(RowwiseModel(model), "hopper", 3600.0, 3, mean, std, seed=1, pool=pool)
        with pytest.warns(RuntimeWarning, match="could not be captured as a CUDA graph"):
            res, graphed = graphed_eval(Capturable(model, fail=True), "hopper", 3, pool)
    assert graphed.eager and graphed.graphs == {(4, 1): None}
    assert np.array_equal(res.returns, plain.returns) and np.array_equal(res.lengths, plain.lengths)


def test_cuda_graphs_are_refused_on_the_cpu():
    model = make_model("hopper")
    mean, std = norm_stats("hopper")
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        ev.evaluate_episodes(model, "hopper", 3600.0, 1, mean, std, cuda_graphs=True, device="cpu")
