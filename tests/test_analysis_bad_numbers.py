"""Numeric flags of the MINE and activation scripts that would otherwise fail deep inside torch: one-line errors."""
import pytest
from test_analysis_support import expect_exit, load_script, write_run


@pytest.mark.parametrize("flags, msg", [
    (["--lr", "nan"], "invalid --lr nan"), (["--lr", "0"], "invalid --lr 0.0"), (["--lr", "-1"], "invalid --lr -1.0"),
    (["--lr", "inf"], "invalid --lr inf"), (["--seed", "-1"], "invalid --seed -1"),
    (["--iters", "0"], "invalid --iters 0"),
])
def test_mine_flags(tmp_path, capsys, flags, msg):
    run_mi = load_script("mine/run_mi_exp.py").main
    err = expect_exit(capsys, run_mi, ["-pd", tmp_path, "-psm", tmp_path / "out", "--exp_type", "data",
                                       "--device", "cpu", *flags])
    assert msg in err
    assert not (tmp_path / "out").exists()


def test_context_longer_than_an_episode(tmp_path, hopper_data, capsys):
    write_run(tmp_path / "ck", "dt", epochs=(1,), data_file=hopper_data / "hopper-medium-v2.pkl")
    save = load_script("mine/save_activation.py").main
    err = expect_exit(capsys, save, ["--checkpoint_dir", tmp_path / "ck", "--env_name_list", "hopper", "--model_name",
                                     "dt", "--epoch", "1", "--results_dir", tmp_path / "res", "--device", "cpu",
                                     "--K", "100000"])
    assert "invalid context K 100000: longer than hopper's 1000-step episodes" in err


@pytest.mark.parametrize("flag", ["--epoch2", "--attention_epoch2"])
def test_run_all_refuses_to_compare_epoch_0_with_itself(tmp_path, capsys, flag):
    """run_all's CKA, MI, parameter and attention steps compare epoch 0 with --epoch2 / --attention_epoch2: 0 is
    refused (it used to run at another epoch with a note saying epoch 0 was missing)."""
    write_run(tmp_path / "ck", "dt", epochs=(0, 1))
    run_all = load_script("analysis/run_all.py").main
    err = expect_exit(capsys, run_all, ["--checkpoint_dir", tmp_path / "ck", "--out_dir", tmp_path / "out", flag, "0"])
    assert f"invalid {flag} 0: the analyses compare epoch 0 with it; use an integer >= 1" in err
    assert not (tmp_path / "out").exists()
