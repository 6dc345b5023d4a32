"""The analysis parsers accept the flag spellings of the original analysis scripts (TAKAGI's
can-wikipedia-help-offline-rl/analysis/...): each original spelling parses to the same arguments as ours."""
from pathlib import Path

import pytest

from decision_transformer.analysis import attention, cka, curves, grads, mi, params, scores

# (parser builder, original spelling, our spelling); every value differs from the flag's default
CASES = [
    # compute_cka.py
    (cka.build_parser, ["--path_to_load_model", "ck"], ["--checkpoint_dir", "ck"]),
    (cka.build_parser, ["-plm", "ck"], ["--checkpoint_dir", "ck"]),
    (cka.build_parser, ["--path_to_load_data", "d"], ["--data_path", "d"]),
    (cka.build_parser, ["-pld", "d"], ["--data_path", "d"]),
    (cka.build_parser, ["--path_to_save_cka", "r"], ["--results_dir", "r"]),
    (cka.build_parser, ["-psc", "r"], ["--results_dir", "r"]),
    (cka.build_parser, ["--path_to_save_figure", "f"], ["--figs_dir", "f"]),
    (cka.build_parser, ["-psf", "f"], ["--figs_dir", "f"]),
    (cka.build_parser, ["--model1", "igpt"], ["--model_name1", "igpt"]),
    (cka.build_parser, ["--model2", "dt"], ["--model_name2", "dt"]),
    # plot_cka.py
    (cka.build_plot_parser, ["--cka_threshold_rand_init", "0.38"], ["--threshold", "0.38"]),
    (cka.build_plot_parser, ["--epoch", "4"], ["--epoch2", "4"]),
    (cka.build_plot_parser, ["--env_name", "walker2d"], ["--env_name_list", "walker2d"]),
    (cka.build_plot_parser, ["--rtg_state_action", "state"], ["--token_list", "state"]),
    (cka.build_plot_parser, ["-rsa", "action"], ["--token_list", "action"]),
    (cka.build_plot_parser, ["--path_to_load_cka", "r"], ["--results_dir", "r"]),
    (cka.build_plot_parser, ["-plc", "r"], ["--results_dir", "r"]),
    (cka.build_plot_parser, ["--path_to_save_figure", "f"], ["--figs_dir", "f"]),
    (cka.build_plot_parser, ["-psf", "f"], ["--figs_dir", "f"]),
    # save_activation.py
    (mi.build_save_parser, ["--path_to_load_model", "ck"], ["--checkpoint_dir", "ck"]),
    (mi.build_save_parser, ["--path_to_load_data", "d"], ["--data_path", "d"]),
    # plot_mutual_information.py
    (mi.build_plot_parser, ["--no_context"], ["--exp_type", "no_context"]),
    (mi.build_plot_parser, ["--path_to_load_mi", "r"], ["--results_dir", "r"]),
    (mi.build_plot_parser, ["-plm", "r"], ["--results_dir", "r"]),
    (mi.build_plot_parser, ["--path_to_save_figure", "f"], ["--figs_dir", "f"]),
    (mi.build_plot_parser, ["-psf", "f"], ["--figs_dir", "f"]),
    # plot_mutual_information_data.py
    (mi.build_plot_data_parser, ["--path_to_load_mi", "r"], ["--results_dir", "r"]),
    (mi.build_plot_data_parser, ["-plm", "r"], ["--results_dir", "r"]),
    (mi.build_plot_data_parser, ["--path_to_save_figure", "f"], ["--figs_dir", "f"]),
    (mi.build_plot_data_parser, ["-psf", "f"], ["--figs_dir", "f"]),
    # parameter_similarity_analysis.py (-plm was accepted before)
    (params.build_parser, ["--path_to_load_model", "ck"], ["--checkpoint_dir", "ck"]),
    (params.build_parser, ["--path_to_save_result", "r"], ["--results_dir", "r"]),
    (params.build_parser, ["-psr", "r"], ["--results_dir", "r"]),
    (params.build_parser, ["--path_to_save_figure", "f"], ["--figs_dir", "f"]),
    (params.build_parser, ["-psf", "f"], ["--figs_dir", "f"]),
    # compute_grad_confusion.py
    (grads.build_confusion_parser, ["--path_to_load_model", "ck"], ["--checkpoint_dir", "ck"]),
    (grads.build_confusion_parser, ["--path_to_load_data", "d"], ["--data_path", "d"]),
    (grads.build_confusion_parser, ["--path_to_save_gradcossim", "r"], ["--results_dir", "r"]),
    (grads.build_confusion_parser, ["--path_to_save_figure", "f"], ["--figs_dir", "f"]),
    (grads.build_confusion_parser, ["--env_name", "walker2d"], ["--env_name_list", "walker2d"]),
    # compute_grad_norm.py
    (grads.build_norm_parser, ["--path_to_load_model", "ck"], ["--checkpoint_dir", "ck"]),
    (grads.build_norm_parser, ["--path_to_load_data", "d"], ["--data_path", "d"]),
    (grads.build_norm_parser, ["--path_to_save_gradnorm", "r"], ["--results_dir", "r"]),
    (grads.build_norm_parser, ["--path_to_save_figure", "f"], ["--figs_dir", "f"]),
    (grads.build_norm_parser, ["--env_name", "walker2d"], ["--env_name_list", "walker2d"]),
    # plot_learning_curve_grad_clip.py
    (curves.build_grad_clip_parser, ["--env_name", "walker2d"], ["--env_name_list", "walker2d"]),
    (curves.build_grad_clip_parser, ["--path_to_save_return", "r"], ["--results_dir", "r"]),
    (curves.build_grad_clip_parser, ["-psr", "r"], ["--results_dir", "r"]),
    (curves.build_grad_clip_parser, ["--path_to_save_figure", "f"], ["--figs_dir", "f"]),
    (curves.build_grad_clip_parser, ["-psf", "f"], ["--figs_dir", "f"]),
    (curves.build_grad_clip_parser, ["--wandb_project_name", "u/p"], ["--wandb_project", "u/p"]),
    (curves.build_grad_clip_parser, ["-wpn", "u/p"], ["--wandb_project", "u/p"]),
    # plot_learning_curve_no_context.py (-block was accepted before)
    (curves.build_no_context_parser, ["--env_name", "walker2d"], ["--env_name_list", "walker2d"]),
    (curves.build_no_context_parser, ["--path_to_save_return", "r"], ["--results_dir", "r"]),
    (curves.build_no_context_parser, ["-psr", "r"], ["--results_dir", "r"]),
    (curves.build_no_context_parser, ["--block_replacement_exp"], ["--block"]),
    (curves.build_no_context_parser, ["--path_to_load_data", "d"], ["--data_path", "d"]),
    (curves.build_no_context_parser, ["-pld", "d"], ["--data_path", "d"]),
    (curves.build_no_context_parser, ["--path_to_save_figure", "f"], ["--figs_dir", "f"]),
    (curves.build_no_context_parser, ["-psf", "f"], ["--figs_dir", "f"]),
    (curves.build_no_context_parser, ["--wandb_project_name", "u/p"], ["--wandb_project", "u/p"]),
    (curves.build_no_context_parser, ["-wpn", "u/p"], ["--wandb_project", "u/p"]),
    # compute_attention_distance.py
    (attention.build_parser, ["--path_to_load_model", "ck"], ["--checkpoint_dir", "ck"]),
    (attention.build_parser, ["--path_to_load_data", "d"], ["--data_path", "d"]),
    (attention.build_parser, ["--path_to_save_att_dist_diff", "r"], ["--results_dir", "r"]),
    (attention.build_parser, ["--path_to_save_figure", "f"], ["--figs_dir", "f"]),
    (attention.build_parser, ["--env_name", "walker2d"], ["--env_name_list", "walker2d"]),
    # compute_normalized_score.py
    (scores.build_parser, ["--env_name", "walker2d"], ["--env_name_list", "walker2d"]),
    (scores.build_parser, ["--model_name", "igpt"], ["--model_name_list", "igpt"]),
    (scores.build_parser, ["--seed", "7"], ["--seed_list", "7"]),
    (scores.build_parser, ["--path_to_load_data", "d"], ["--data_path", "d"]),
    (scores.build_parser, ["-pld", "d"], ["--data_path", "d"]),
    (scores.build_parser, ["--wandb_project_name", "u/p"], ["--wandb_project", "u/p"]),
    (scores.build_parser, ["-wpn", "u/p"], ["--wandb_project", "u/p"]),
]


def _id(case):
    build, orig, _ = case
    return f"{build.__module__.rsplit('.', 1)[-1]}.{build.__name__}:{orig[0]}"


@pytest.mark.parametrize("build, orig, ours", CASES, ids=[_id(c) for c in CASES])
def test_original_spelling_parses_as_ours(build, orig, ours):
    p = build()
    got, want, default = vars(p.parse_args(orig)), vars(p.parse_args(ours)), vars(p.parse_args([]))
    assert got == want
    assert got != default  # the alias set the same argument as our spelling, not nothing


# whole command lines in the originals' spellings (values other than the defaults)
COMMAND_LINES = [
    (cka.build_parser,
     "-pld d -plm ck -psc r -psf f --seed 1 --model1 dt --model2 igpt --epoch1 0 --epoch2 40 --device cpu",
     "--data_path d --checkpoint_dir ck --results_dir r --figs_dir f --seed 1 --model_name1 dt --model_name2 igpt "
     "--epoch1 0 --epoch2 40 --device cpu"),
    (cka.build_plot_parser,
     "-plc r -psf f --seed 1 --epoch 4 --env_name walker2d -rsa reward -thr 0.38",
     "--results_dir r --figs_dir f --seed 1 --epoch2 4 --env_name_list walker2d --token_list reward --threshold 0.38"),
    (mi.build_plot_parser,
     "-plm r -psf f --seed 1 --epoch 4 --env_name walker2d --dataset_name medium --no_context",
     "--results_dir r --figs_dir f --seed 1 --epoch 4 --env_name walker2d --dataset_name medium "
     "--exp_type no_context"),
    (params.build_parser,
     "-plm ck -psr r -psf f --seed 1 --epoch1 1 --epoch2 4 --env_name walker2d --dataset_name medium",
     "--checkpoint_dir ck --results_dir r --figs_dir f --seed 1 --epoch1 1 --epoch2 4 --env_name walker2d "
     "--dataset_name medium"),
    (curves.build_no_context_parser,
     "-pld d -psf f --seed 1 --env_name walker2d --from_wandb -block -wpn u/p",
     "--data_path d --figs_dir f --seed 1 --env_name_list walker2d --from_wandb --block --wandb_project u/p"),
]


@pytest.mark.parametrize("build, orig, ours", COMMAND_LINES, ids=[c[0].__name__ for c in COMMAND_LINES])
def test_original_command_line(build, orig, ours):
    p = build()
    assert vars(p.parse_args(orig.split())) == vars(p.parse_args(ours.split()))


@pytest.mark.parametrize("build, argv", [
    (curves.build_grad_clip_parser, "-psr r -psa r -psf f --seed 1 --env_name walker2d --model_name igpt "
                                    "--dataset_name medium --from_wandb -wpn u/p --device cpu"),
    (curves.build_no_context_parser, "-pld d -psr r -psa r -psf f --seed 1 --env_name walker2d --model_name gpt2 "
                                     "--dataset_name medium --from_wandb -block -wpn u/p --device cuda"),
    (cka.build_plot_parser, "-plc r -psf f --env_name hopper -rsa state -thr 0.23 --device cpu"),
    # the data plot took the MI plots' --exp_type (default normal) and plots the data experiment whatever it says
    (mi.build_plot_data_parser, "-plm r -psf f --exp_type normal --env_name hopper --seed 1 --epoch 40"),
])
def test_the_original_scripts_full_flag_sets_parse(build, argv):
    """Every flag of the original plotting scripts parses, also their --device (never read: nothing runs a model)
    and the learning-curve scripts' -psa (the action errors share the returns' CSV)."""
    args = build().parse_args(argv.split())
    assert args.results_dir == "r" and args.figs_dir == "f"


def test_a_separate_action_error_folder_is_noted(tmp_path, capsys):
    from decision_transformer.analysis import common

    args = curves.build_grad_clip_parser().parse_args(["-psr", str(tmp_path / "r"), "-psa", str(tmp_path / "a")])
    common.check_curve_output_flags(args)
    assert "the action errors are written with the returns to one CSV in --results_dir" in capsys.readouterr().err
    common.check_curve_output_flags(curves.build_grad_clip_parser().parse_args(["-psr", "r", "-psa", "r/"]))
    common.check_curve_output_flags(curves.build_grad_clip_parser().parse_args(["-psr", "r", "-psa",
                                                                              str(Path.cwd() / "r")]))
    assert capsys.readouterr().err == ""


def test_no_context_switch_keeps_exp_type_default():
    p = mi.build_plot_parser()
    assert p.parse_args([]).exp_type == "normal"
    assert p.parse_args(["--no_context", "--exp_type", "normal"]).exp_type == "normal"  # the last one given wins


@pytest.mark.parametrize("build, short, full", [
    (scores.build_parser, ["--env", "walker2d"], ["--env_name_list", "walker2d"]),
    (attention.build_parser, ["--env", "walker2d"], ["--env_name_list", "walker2d"]),
    (grads.build_norm_parser, ["--env_n", "walker2d"], ["--env_name_list", "walker2d"]),
    (curves.build_no_context_parser, ["--bloc"], ["--block"]),
    (curves.build_no_context_parser, ["--wandb_proj", "p"], ["--wandb_project", "p"]),
])
def test_an_abbreviation_of_one_flags_spellings_is_that_flag(build, short, full):
    """A prefix shared only by the spellings of one flag (--env: --env_name_list and its alias --env_name) selects
    that flag; a prefix of two different flags is still refused as ambiguous."""
    assert vars(build().parse_args(short)) == vars(build().parse_args(full))


def test_a_prefix_of_two_flags_is_ambiguous(capsys):
    with pytest.raises(SystemExit):
        cka.build_plot_parser().parse_args(["--legacy"])       # --legacy_feature_index or --legacy_pairing
    assert "ambiguous option: --legacy" in capsys.readouterr().err
