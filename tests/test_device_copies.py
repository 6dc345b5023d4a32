"""Host-to-device copies that must not wait for the device: ``to_device_async`` (pinned memory, non-blocking on CUDA),
one index copy per evaluation step shared by the overlapped groups, and one order copy per pass of the LM text
stream. The machine has no GPU, so the CUDA branch is checked with ``pin_memory`` and ``to`` recorded."""
import numpy as np
import torch

from decision_transformer import evaluation as ev
from decision_transformer.training import lm_cotrain, trainer


def test_to_device_async_pins_and_does_not_block_on_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin") or self)
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        if args and str(args[0]).startswith("cuda"):
            calls.append(("to", str(args[0]), kwargs.get("non_blocking")))
            return self
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    t = torch.arange(3)
    assert trainer.to_device_async(t, "cuda:0") is t
    assert calls == ["pin", ("to", "cuda:0", True)]
    calls.clear()
    assert torch.equal(trainer.to_device_async(t, "cpu"), t) and calls == []     # the CPU: a plain copy


def test_evaluation_copies_the_indices_once_per_step_for_all_groups(monkeypatch):
    """With 3 overlap groups, one copy of the live indices a step (it was one blocking copy per group), and the
    groups' rows are those of np.array_split."""
    from test_evaluation import make_model, norm_stats

    copies = []
    real = ev.to_device_async
    monkeypatch.setattr(ev, "to_device_async", lambda t, d: copies.append(t.clone()) or real(t, d))
    mean, std = norm_stats("hopper")
    model = make_model("hopper")
    res = ev.evaluate_episodes(model, "hopper", 3600.0, 5, mean, std, seed=1, overlap_groups=3)
    steps = int(res.lengths.max())
    assert len(copies) == steps and copies[0].tolist() == [0, 1, 2, 3, 4]
    again = ev.evaluate_episodes(model, "hopper", 3600.0, 5, mean, std, seed=1, overlap_groups=1)
    np.testing.assert_array_equal(res.returns, again.returns)             # grouping changes no episode


def test_the_lm_text_stream_copies_its_order_once_per_pass(monkeypatch):
    copies = []
    real = lm_cotrain.to_device_async
    monkeypatch.setattr(lm_cotrain, "to_device_async", lambda t, d: copies.append(len(t)) or real(t, d))
    blocks = torch.arange(40).view(10, 4)
    stream = lm_cotrain.TextBatches(blocks, 2, seed=0)
    seen = torch.cat([stream.next() for _ in range(5)])                   # one pass: every block once
    assert sorted(seen[:, 0].tolist()) == list(range(0, 40, 4))
    assert copies == [10]
    stream.next()                                                          # the next pass: a new order, one copy
    assert copies == [10, 10]
    state = stream.state_dict()
    resumed = lm_cotrain.TextBatches(blocks, 2, seed=0)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next(), stream.next())                      # the order on the device is restored


def test_forked_rng_also_keeps_the_gpu_stream(monkeypatch):
    """Seeding inside a merge (Fisher, rebuilt initialisations) reseeds every GPU; the fork covers them all (it
    covered the CPU only), and the CPU alone where CUDA is not available."""
    from decision_transformer import merge_setup

    seen = []
    monkeypatch.setattr(torch.random, "fork_rng", lambda devices: seen.append(devices) or torch.no_grad())
    with trainer.forked_rng():
        pass
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with merge_setup.forked_rng():
        pass
    assert seen == [[], [0, 1]]                                  # every GPU: a run on cuda:1 keeps its stream too
    state = torch.random.get_rng_state()
    monkeypatch.undo()
    with trainer.forked_rng():
        torch.manual_seed(123)
        torch.rand(3)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_lm_pretraining_copies_each_steps_window_starts_without_blocking(tmp_path, monkeypatch):
    """pretrain_chibit's window starts go to the device through to_device_async, once a step."""
    from decision_transformer.training import lm_pretrain

    copies = []
    real = lm_pretrain.to_device_async
    monkeypatch.setattr(lm_pretrain, "to_device_async",
                        lambda t, d: copies.append((t.shape, t.dtype, str(d))) or real(t, d))
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog.\n" * 20)
    lm_pretrain.pretrain_chibit(text, tmp_path / "out", vocab_size=300, n_layer=1, n_embd=16, n_head=2,
                                n_positions=16, block_size=8, batch_size=2, steps=2, warmup_steps=1, log_every=1)
    assert copies == [(torch.Size([2]), torch.int64, "cpu")] * 2
