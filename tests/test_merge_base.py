"""The base θ₀ of task-vector merges is where the merged models started, whatever the merge run's own flags: the LM
initialisation their runs record (rebuilt with their seed, as merge_cli rebuilds it), the --load_checkpoint file they
were trained from; a TIES density that keeps nothing is refused."""
import pytest
import torch

import experiment
from conftest import fails, listed
from decision_transformer import merge_cli, merging
from decision_transformer.checkpoint import load_checkpoint
from decision_transformer.errors import UserError
from test_merging import tiny_lm

TINY = ["--env", "hopper", "--K", "5", "--batch_size", "4", "--warmup_steps", "2", "--num_eval_episodes", "0",
        "--max_iters", "1"]


def _train(data, *flags):
    """One tiny training run that writes its last model to models/hopper/; the model's path."""
    before = set(listed_models())
    experiment.main([*TINY, "--data_path", str(data), "--num_steps_per_iter", "3", "--save_model", "--outdir", "",
                     *map(str, flags)])
    (new,) = set(listed_models()) - before
    return new


def listed_models():
    from pathlib import Path

    folder = Path("models") / "hopper"
    return sorted(folder.glob("*.pt")) if folder.is_dir() else []


def _sd(path):
    return load_checkpoint(path)["state_dict"]


def test_lm_trained_models_take_their_recorded_lm_start_whatever_the_merge_runs_seed(tmp_path, monkeypatch,
                                                                                       hopper_data, capsys):
    monkeypatch.chdir(tmp_path)
    lm = tiny_lm(tmp_path / "lm")
    a = _train(hopper_data, "--pretrained_lm", lm, "--seed", "666")
    b = _train(hopper_data, "--pretrained_lm", lm, "--seed", "666", "--dataset", "medium", "--learning_rate", "3e-3")
    ta = ["--merge_method", "task_arithmetic", "--merge_lambda", "1"]   # every tensor: the embeddings and heads too
    merge_cli.main(["--models", str(a), str(b), *ta, "--out", str(tmp_path / "cli.pt")])
    experiment.main([*TINY, "--data_path", str(hopper_data), "--num_steps_per_iter", "0", "--pretrained_lm", str(lm),
                     "--seed", "1", "--pretrained_models", str(a), str(b), *ta, "--copy_model", "--outdir", "ck"])
    (rd,) = listed(tmp_path / "ck")
    got, want = _sd(rd / "model_0.pt"), _sd(tmp_path / "cli.pt")
    assert got.keys() == want.keys()
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)


def test_a_model_trained_from_a_checkpoint_takes_it_as_its_start(tmp_path, monkeypatch, hopper_data, capsys):
    """Model 1 finetuned from --load_checkpoint H: θ₀ = H, so with λ = 1 and H itself as model 2 the merge over S is
    model 1 (θ₀ + (θ₁ − H) + (H − H)); once H is gone, one line asks for --merge_base."""
    monkeypatch.chdir(tmp_path)
    h = _train(hopper_data, "--seed", "666")
    f = _train(hopper_data, "--seed", "666", "--load_checkpoint", h, "--learning_rate", "3e-3")
    merge_cli.main(["--models", str(f), str(h), "--merge_method", "task_arithmetic", "--merge_lambda", "1",
                    "--include", "attn", "mlp", "--out", str(tmp_path / "m.pt")])
    err = capsys.readouterr().err
    assert f"merge base: {h.resolve()} (the --load_checkpoint {f} was trained from)" in err, err
    merged, ft = _sd(tmp_path / "m.pt"), _sd(f)
    keys = [k for k in ft if ("attn" in k or "mlp" in k) and ft[k].is_floating_point()]
    assert keys and not all(torch.equal(ft[k], _sd(h)[k]) for k in keys)
    for k in keys:
        torch.testing.assert_close(merged[k], ft[k], rtol=0, atol=1e-6, msg=k)
    moved = tmp_path / "moved.pt"
    h.rename(moved)
    msg = fails(merge_cli.main, ["--models", f, moved, "--merge_method", "ties", "--include", "attn", "--out",
                                 tmp_path / "n.pt"], capsys)
    assert msg.endswith(f"its run started from --load_checkpoint {h}, which is gone; pass --merge_base "
                        f"(that file, or the run's model_0.pt)"), msg


def test_a_ties_density_that_keeps_nothing_is_refused():
    base = {"w": torch.zeros(10)}
    states = [{"w": torch.randn(10)}, {"w": torch.randn(10)}]
    with pytest.raises(UserError, match=r"TIES density 0.01 keeps none of a task vector's 10 entries"):
        merging.merge_ties(states, base, ["w"], density=0.01)
    merging.merge_ties(states, base, ["w"], density=0.1)      # one entry each: kept
