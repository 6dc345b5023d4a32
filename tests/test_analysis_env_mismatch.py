"""A checkpoint whose model was built for another env (copied into a run folder) is a one-line error naming it, in
every analysis that loads checkpoints, instead of a shape error deep in a forward pass."""
import shutil

import pytest
from test_analysis_support import expect_exit, load_script, write_run

from decision_transformer.analysis.runs import RunKey, load_model, load_state_dict
from decision_transformer.errors import UserError


@pytest.fixture
def mismatched(tmp_path, hopper_data):
    """checkpoints/ with hopper dt runs (K=20 and K=1) whose model_1.pt is a halfcheetah checkpoint."""
    ck = tmp_path / "checkpoints"
    data_file = hopper_data / "hopper-medium-v2.pkl"
    other = write_run(tmp_path / "other", "dt", env="halfcheetah", epochs=(1,))
    for K in (20, 1):
        d = write_run(ck, "dt", K=K, epochs=(0, 1), data_file=data_file)
        shutil.copy(other / "model_1.pt", d / "model_1.pt")
    return ck


def test_loaders_refuse_another_envs_checkpoint(mismatched, tmp_path):
    key = RunKey("dt", "medium", "hopper", 666)
    load_model(mismatched, key, 0)   # the run's own checkpoint loads
    for load in (load_model, load_state_dict):
        with pytest.raises(UserError, match=r"dt_medium_hopper_666/model_1.pt: the model takes 17-dim states and "
                                            r"6-dim actions, but hopper has 11 and 3"):
            load(mismatched, key, 1)
    # walker2d has halfcheetah's sizes: the env the checkpoint records tells them apart
    other = write_run(tmp_path / "w", "dt", env="walker2d", epochs=(1,))
    shutil.copy(other / "model_1.pt", write_run(tmp_path / "c", "dt", env="halfcheetah", epochs=(1,)) / "model_1.pt")
    with pytest.raises(UserError, match="trained on walker2d, but its run folder is for halfcheetah"):
        load_model(tmp_path / "c", RunKey("dt", "medium", "halfcheetah", 666), 1)


def test_loaders_refuse_a_checkpoint_of_another_run_of_the_same_env(tmp_path, capsys):
    """A checkpoint copied between run folders of one env (another K, model, seed, dataset or block) is refused,
    naming what it records against what its folder says; an analysis script stops with that one line."""
    ck = tmp_path / "checkpoints"
    k20, k1 = write_run(ck, "dt", epochs=(0, 1)), write_run(ck, "dt", K=1, epochs=(0, 1))
    gpt2, seed42 = write_run(ck, "gpt2", epochs=(0, 1)), write_run(ck, "dt", seed=42, epochs=(0, 1))
    block = write_run(ck, "dt", K=1, block=0, epochs=(0, 1))
    key = RunKey("dt", "medium", "hopper", 666)
    load_model(ck, key, 1)                                        # its own file loads
    for src, says in ((k1, "K 1 (the folder: 20)"), (gpt2, "model_name 'gpt2' (the folder: 'dt')"),
                      (seed42, "seed 42 (the folder: 666)")):
        shutil.copy(src / "model_1.pt", k20 / "model_1.pt")
        with pytest.raises(UserError, match=r"dt_medium_hopper_666/model_1.pt: the checkpoint records "
                                            + says.replace("(", r"\(").replace(")", r"\)")
                                            + "; it belongs to another run than its folder dt_medium_hopper_666$"):
            load_state_dict(ck, key, 1)
    shutil.copy(block / "model_1.pt", k1 / "model_1.pt")
    with pytest.raises(UserError, match=r"records pretrained_block 0 \(the folder: None\)"):
        load_model(ck, RunKey("dt", "medium", "hopper", 666, K=1), 1)
    # a block run of iGPT named `dt` by an earlier version, renamed dt-igpt_... as the README says: still its own run
    from decision_transformer.checkpoint import atomic_save, load_checkpoint

    old = write_run(ck, "dt-igpt", K=1, block=0, epochs=(1,))
    ckpt = load_checkpoint(old / "model_1.pt")
    ckpt["config"].update(model_name="dt", pretrained_lm="openai/imagegpt-small")
    atomic_save(ckpt, old / "model_1.pt")
    load_state_dict(ck, RunKey("dt-igpt", "medium", "hopper", 666, K=1, block=0), 1)
    shutil.copy(gpt2 / "model_1.pt", k20 / "model_1.pt")
    params = load_script("analysis/section-53-parameter-similarity/parameter_similarity_analysis.py").main
    err = expect_exit(capsys, params, ["-plm", ck, "--model_name_list", "dt", "--epoch2", "1",
                                       "--results_dir", tmp_path / "r", "--figs_dir", tmp_path / "f"])
    assert "model_name 'gpt2' (the folder: 'dt')" in err and not list((tmp_path / "r").glob("*"))


@pytest.mark.parametrize("script, argv", [
    ("analysis/section-51-activation-similarity/compute_cka.py",
     ["--model_name1", "dt", "--model_name2", "dt", "--epoch1", "0", "--epoch2", "1", "--K", "3", "--batch_size", "6",
      "--no_heatmap"]),
    ("analysis/section-54-gradient-analysis/compute_grad_norm.py",
     ["--model_name_list", "dt", "--epoch", "1", "--K", "3", "--batch_size", "6"]),
    ("analysis/section-54-gradient-analysis/compute_grad_confusion.py",
     ["--model_name_list", "dt", "--epoch", "1", "--K", "3", "--batch_size", "6"]),
    ("analysis/section-56-dependence-on-context/compute_attention_distance.py",
     ["--model_name_list", "dt", "--epoch1", "0", "--epoch2", "1", "--batch_size", "6"]),
    ("analysis/section-52-mutual-information/save_activation.py",
     ["--model_name", "dt", "--epoch", "1", "--batch_size", "6"]),
])
def test_scripts_refuse_another_envs_checkpoint(mismatched, tmp_path, capsys, script, argv):
    main = load_script(script).main
    base = ["--checkpoint_dir", mismatched, "--env_name_list", "hopper", "--results_dir", tmp_path / "res"]
    if "save_activation" not in script:
        base += ["--figs_dir", tmp_path / "figs"]
    msg = expect_exit(capsys, main, base + argv)
    assert "model_1.pt: the model takes 17-dim states and 6-dim actions, but hopper has 11 and 3" in msg


def test_parameter_similarity_refuses_another_envs_checkpoint(mismatched, tmp_path, capsys):
    main = load_script("analysis/section-53-parameter-similarity/parameter_similarity_analysis.py").main
    msg = expect_exit(capsys, main, ["-plm", mismatched, "--model_name_list", "dt", "--epoch1", "0", "--epoch2", "1",
                                     "--results_dir", tmp_path / "res", "--figs_dir", tmp_path / "figs"])
    assert "model_1.pt: the model takes 17-dim states" in msg


@pytest.mark.parametrize("script, argv, out", [
    ("analysis/section-54-gradient-analysis/compute_grad_norm.py", ["--model_name_list", "dt", "gpt2", "--epoch", "40"],
     "gradnorm_perparam_40_{m}_hopper_medium_666_bs4_ctx3.npy"),     # (--batch_size 4, --K 3: tagged)
    ("mine/save_activation.py", ["--model_name", "dt", "gpt2", "--epoch", "40"],
     "activation_40_{m}_hopper_medium_666_bs4_ctx3.npz"),
])
def test_models_recording_different_data_files_are_analysed_on_one_batch(tmp_path, monkeypatch, hopper_data, capsys,
                                                                         script, argv, out):
    """Two runs whose checkpoints record different data files (copies made with other seeds): every model is
    analysed on the first model's data, so they see the same batch as the README says, with a note naming the file
    each run recorded; the results equal those of --data_path naming that file."""
    import numpy as np

    from decision_transformer.synthetic import make_dataset

    other = tmp_path / "other"
    make_dataset(other, "hopper", "medium", 2000, seed=5, max_ep_len=100)
    ck = tmp_path / "ck"
    write_run(ck, "dt", epochs=(40,), data_file=hopper_data / "hopper-medium-v2.pkl")
    write_run(ck, "gpt2", epochs=(40,), data_file=other / "hopper-medium-v2.pkl")
    common = ["--checkpoint_dir", ck, "--env_name_list", "hopper", *argv, "--K", "3", "--batch_size", "4",
              "--device", "cpu"]
    main = load_script(script).main
    monkeypatch.chdir(tmp_path)   # (figures go to the working directory's analysis/ folder)
    main([str(a) for a in [*common, "--results_dir", tmp_path / "a"]])
    err = capsys.readouterr().out
    assert f"records the data file {(other / 'hopper-medium-v2.pkl').resolve()}; it is analysed on " \
           f"{(hopper_data / 'hopper-medium-v2.pkl').resolve()}" in err
    main([str(a) for a in [*common, "--results_dir", tmp_path / "b", "--data_path", hopper_data]])
    assert "records the data file" not in capsys.readouterr().out
    for m in ("dt", "gpt2"):
        a, b = (np.load(tmp_path / d / out.format(m=m)) for d in ("a", "b"))
        for k in (a.files if hasattr(a, "files") else [None]):
            assert np.array_equal(a[k] if k else a, b[k] if k else b)
