"""Choices made for CUDA devices, checked on the CPU with torch's CUDA queries stood in for: device numbers beyond
the machine's, bfloat16 only on GPUs that compute it natively, and training states moved between device kinds."""
import pytest
import torch

from decision_transformer import errors, run
from decision_transformer.errors import UserError


@pytest.fixture
def one_gpu(monkeypatch):
    """torch reports one CUDA device of compute capability 7.0 (a V100: bfloat16 only emulated)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)


def test_a_gpu_number_the_machine_lacks_is_one_line(one_gpu):
    with pytest.raises(UserError, match=r"--device cuda:7: this machine has 1 CUDA device\(s\) \(cuda:0 to cuda:0\)"):
        run.resolve_device("cuda:7", threads=None)
    with pytest.raises(UserError, match=r"device 'cuda:3': this machine has 1 CUDA device\(s\)"):
        errors.checked_device("cuda:3")


def test_bf16_only_where_the_gpu_computes_it_natively(one_gpu, monkeypatch):
    """torch.cuda.is_bf16_supported() counts emulation: a V100 would train in slow emulated bf16 under auto."""
    cuda = torch.device("cuda")
    assert run.autocast_dtype("auto", cuda) is None
    with pytest.raises(UserError, match=r"--precision bf16: this GPU \(Tesla V100\) has no native bfloat16"):
        run.autocast_dtype("bf16", cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert run.autocast_dtype("auto", cuda) is torch.bfloat16


def test_a_sampler_stream_saved_on_another_device_kind_is_reseeded_with_a_warning(capsys):
    """A CUDA generator's state is 16 bytes (seed, offset), a CPU one's the Mersenne Twister: a run resumed on the
    other kind of device draws from a new stream, seeded from the run's seed and iteration, the same on every
    resume, and says so."""
    gen = torch.Generator()
    run.restore_generator(gen, torch.zeros(16, dtype=torch.uint8), seed=666, iteration=3)
    assert "saved on another kind of device than cpu" in capsys.readouterr().err
    first = torch.rand(4, generator=gen)
    run.restore_generator(gen, torch.zeros(16, dtype=torch.uint8), seed=666, iteration=3)
    assert torch.equal(torch.rand(4, generator=gen), first)
    capsys.readouterr()
    same = torch.Generator().manual_seed(5)
    state = same.get_state()
    run.restore_generator(gen, state, seed=666, iteration=3)      # the same kind: the saved stream exactly
    assert torch.equal(torch.rand(4, generator=gen), torch.rand(4, generator=same))
    assert capsys.readouterr().err == ""


def test_rng_states_keep_the_run_devices_cuda_state_only():
    """A CPU run records no CUDA state; a CUDA state recorded by a GPU run is not applied on the CPU (older states
    listing every GPU's are read too)."""
    st = run.rng_state(torch.device("cpu"))
    assert st["cuda"] == [] and st["cuda_of_run"]
    before = torch.rand(3)
    run.set_rng_state(st, torch.device("cpu"))
    run.set_rng_state({**st, "cuda": [torch.zeros(16, dtype=torch.uint8)] * 2, "cuda_of_run": False}, "cpu")
    torch.testing.assert_close(torch.rand(3), before)
