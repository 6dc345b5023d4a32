"""Audit fixes of the learning curves and the MI plot: Figure 9 (-block) skips an env whose only runs are the dashed
K=1 references, the gradient-clip figure skips a run without metrics with a note (as the other curves do), and
Figure 2 warns of a model missing one of its per-block MI files (a killed run_mi_exp.py)."""
import csv
import json

import numpy as np
from conftest import fails, load_script

from decision_transformer.checkpoint import run_dir_name
from decision_transformer.envs import get_env_spec

NO_CONTEXT = "analysis/section-55-fine-tuning-no-context/plot_learning_curve_no_context.py"
GRAD_CLIP = "analysis/section-54-gradient-analysis/plot_learning_curve_grad_clip.py"
PLOT_MI = "analysis/section-52-mutual-information/plot_mutual_information.py"
TARGETS = {"hopper": 3600, "halfcheetah": 6000, "walker2d": 5000}        # the curves' default evaluation targets


def _run(root, model, env="hopper", K=20, block=None, no_grad_clip=False, n_layer=2):
    """A run folder with ``metrics.jsonl`` (3 epochs) and a ``config.json`` recording the model's depth (what the
    block figure reads its number of blocks from), no checkpoints."""
    d = root / run_dir_name(model, "medium", env, 666, K, no_grad_clip, block)
    d.mkdir(parents=True)
    keys = [f"evaluation/target_{int(t)}_return_mean" for t in get_env_spec(env).targets]
    keys.append(f"evaluation/target_{TARGETS[env]}_return_mean")
    rows = [{"iteration": i, "training/action_error": 1.0 / i, **{k: 100.0 * i for k in keys}} for i in (1, 2, 3)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "config.json").write_text(json.dumps({"env": env, "dataset": "medium", "seed": 666, "K": K,
                                               "model_name": model, "pretrained_block": block,
                                               "model_config": {"backbone": {"n_layer": n_layer}}}))
    return d


def _out(tmp_path):
    return ["--results_dir", tmp_path / "res", "--figs_dir", tmp_path / "figs"]


def _written(tmp_path) -> set:
    return {p.name for d in ("res", "figs") if (tmp_path / d).is_dir() for p in (tmp_path / d).iterdir()}


def _main(script):
    main = load_script(script).main
    return lambda argv: main([str(a) for a in argv])


# ---- 1. Figure 9 without block runs ------------------------------------------------------------------------------

def test_block_figure_of_an_env_with_only_k1_runs_is_skipped(tmp_path, capsys):
    """GPT2 and Random Init K=1 runs of hopper and walker2d, block runs for hopper only: walker2d's figure (only the
    dashed reference curves) is skipped with a note, hopper's is written; with no block run at all, one error and
    no files (both used to write figures of the reference curves alone)."""
    ck = tmp_path / "ck"
    for env in ("hopper", "walker2d"):
        for m in ("gpt2", "dt"):
            _run(ck, m, env, K=1)
    for b in (0, 1):
        _run(ck, "dt", "hopper", K=1, block=b)
    run = _main(NO_CONTEXT)
    run(["--checkpoint_dir", ck, "-block", "--env_name_list", "hopper", "walker2d", *_out(tmp_path)])
    out = capsys.readouterr().out
    assert any(ln.startswith("note: skipped: no block-replacement runs for walker2d") for ln in out.splitlines())
    assert not any("walker2d" in n for n in _written(tmp_path))
    with open(tmp_path / "res" / "learning_curve_block_hopper_medium_666.csv") as f:
        assert {r["curve"] for r in csv.DictReader(f)} == {"block 0", "block 1", "GPT2 K=1", "Random Init K=1"}
    assert "wrote " in out

    only_k1 = tmp_path / "only_k1"
    for m in ("gpt2", "dt"):
        _run(only_k1, m, "hopper", K=1)
    empty = tmp_path / "empty"
    msg = fails(load_script(NO_CONTEXT).main, ["--checkpoint_dir", only_k1, "-block", "--env_name_list", "hopper",
                                               *_out(empty)], capsys)
    assert "no block-replacement runs for hopper" in msg
    assert not _written(empty)


# ---- 2. gradient-clip figure with a run missing ---------------------------------------------------------------------

def test_grad_clip_figure_skips_a_run_without_metrics(tmp_path, capsys):
    """igpt with and without the clip on hopper, only with it on walker2d: a note names walker2d's missing
    _no_grad_clip run, both envs' files are written and reported (walker2d's with its one curve); it used to stop
    with an error after writing hopper's files unreported."""
    ck = tmp_path / "ck"
    for env, ngcs in (("hopper", (False, True)), ("walker2d", (False,))):
        for ngc in ngcs:
            _run(ck, "igpt", env, no_grad_clip=ngc)
    run = _main(GRAD_CLIP)
    run(["--checkpoint_dir", ck, "--model_name", "igpt", "--env_name_list", "hopper", "walker2d", *_out(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    # (a run never trained: "no run", where it said "metrics not found: .../metrics.jsonl" of a folder never made)
    assert [ln for ln in lines if ln.startswith("note:")] == [f"note: skipped: no run igpt_medium_walker2d_666_no_grad_"
                                                              f"clip in {ck} (train it, or use --from_wandb to read "
                                                              f"WandB instead)"]
    wrote = {ln.rsplit("/", 1)[-1] for ln in lines if ln.startswith("wrote ")}
    for env in ("hopper", "walker2d"):
        stem = f"learning_curve_grad_clip_igpt_{env}_medium_666"
        assert {f"{stem}.csv", f"{stem}.png"} <= wrote and (tmp_path / "figs" / f"{stem}.pdf").is_file()
    with open(tmp_path / "res" / "learning_curve_grad_clip_igpt_walker2d_medium_666.csv") as f:
        assert {r["curve"] for r in csv.DictReader(f)} == {"with grad clip"}

    empty = tmp_path / "empty"
    msg = fails(load_script(GRAD_CLIP).main, ["--checkpoint_dir", ck, "--model_name", "gpt2", "--env_name_list",
                                              "hopper", *_out(empty)], capsys)
    assert "no runs found for the gradient-clip figure: no run gpt2_medium_hopper_666 in" in msg
    assert not _written(empty)


# ---- 3. Figure 2 with a block file missing ---------------------------------------------------------------------------

def _mi_xy(res, model, blocks, depth=None, asked=None):
    pos = np.arange(6)
    for b in blocks:
        extra = {} if depth is None else {"depth": np.array(depth)}
        extra.update({} if asked is None else {"blocks": np.array(asked)})
        np.savez(res / f"mi_xy_{b}_40_{model}_hopper_medium_666.npz", x=np.full(6, 1.0), y=np.full(6, 2.0),
                 position=pos, token=pos % 3, **extra)


def _plot_mi_warnings(tmp_path, capsys, files) -> list:
    res = tmp_path / "res"
    res.mkdir(exist_ok=True)
    for f in res.iterdir():
        f.unlink()
    for args in files:
        _mi_xy(res, *args)
    capsys.readouterr()
    _main(PLOT_MI)(["--results_dir", res, "--figs_dir", tmp_path / "figs", "--model_name_list", "gpt2", "igpt"])
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]


def test_mi_plot_warns_of_a_missing_block_file(tmp_path, capsys):
    """GPT2's block 11 file missing (run_mi_exp.py killed after blocks 0 and 6): a warning names GPT2 and the
    missing file (the deep row used to lose GPT2 without a word). Complete files, blocks chosen by --layers and
    older files without a recorded depth give no such warning."""
    res = tmp_path / "res"
    warnings = _plot_mi_warnings(tmp_path, capsys, [("gpt2", (0, 6), 12), ("igpt", (0, 12, 23), 24)])
    assert len(warnings) == 1
    assert warnings[0].startswith(f"warning: {res / 'mi_xy_11_40_gpt2_hopper_medium_666.npz'} not found: gpt2 "
                                  f"(depth 12) lacks block 11")
    assert "rerun run_mi_exp.py --model_name gpt2" in warnings[0]
    # killed after the first block: both later files named
    warnings = _plot_mi_warnings(tmp_path, capsys, [("gpt2", (0, 6, 11), 12), ("igpt", (0,), 24)])
    assert len(warnings) == 1 and "igpt (depth 24) lacks blocks 12, 23" in warnings[0]
    assert "mi_xy_12_40_igpt" in warnings[0] and "mi_xy_23_40_igpt" in warnings[0]
    for files in ([("gpt2", (0, 6, 11), 12), ("igpt", (0, 12, 23), 24)],      # complete
                  [("gpt2", (0, 1, 2), 12), ("igpt", (0, 12, 23), 24)],       # --layers 0 1 2
                  [("gpt2", (0, 6), None), ("igpt", (0, 12, 23), None)]):     # no depth recorded
        assert _plot_mi_warnings(tmp_path, capsys, files) == []


def test_mi_plot_measures_gaps_against_the_blocks_recorded_in_the_files(tmp_path, capsys):
    """run_mi_exp.py records the blocks it was asked for (--layers) in each file: a --layers 0 11 run of a 12-block
    model is complete (no warning about block 6, the default middle one), and a --layers 0 5 11 run killed after
    block 5 is warned about block 11, naming the blocks asked for."""
    assert _plot_mi_warnings(tmp_path, capsys, [("gpt2", (0, 11), 12, (0, 11)), ("igpt", (0, 12, 23), 24)]) == []
    warnings = _plot_mi_warnings(tmp_path, capsys, [("gpt2", (0, 5), 12, (0, 5, 11)), ("igpt", (0, 12, 23), 24)])
    assert len(warnings) == 1 and "gpt2 (depth 12) lacks block 11 of the blocks run_mi_exp.py computes (0, 5, 11;" \
        in warnings[0], warnings


def test_run_mi_exp_records_the_blocks_it_computes(tmp_path):
    """Each mi_xy file of one run_mi_exp.py --layers 0 2 call of a 3-block model holds blocks [0, 2]; without
    --layers, the default blocks [0, 1, 2]."""
    from test_analysis_support import load_script

    from decision_transformer.analysis import common, mi

    B, K, D = 6, 2, 4
    rng = np.random.default_rng(0)
    common.save_npz(mi.data_file(tmp_path, "hopper", "medium", 666), states=rng.normal(size=(B, K, 11)),
                    actions=rng.normal(size=(B, K, 3)), rtg=rng.normal(size=(B, K + 1, 1)),
                    timesteps=np.zeros((B, K)), attention_mask=np.ones((B, K)))
    common.save_npz(mi.activation_file(tmp_path, 40, "gpt2", "hopper", "medium", 666),
                    **{f"{b}.mlp.dropout": rng.normal(size=(B, 3 * K, D)) for b in range(3)})
    for out, layers, want in (("a", ["--layers", 0, 2], [0, 2]), ("b", [], [0, 1, 2])):
        argv = ["-psm", tmp_path / out, "-pd", tmp_path, "-pa", tmp_path, "--iters", 1, "--mine_hidden", 4,
                "--batch_size", 2, "--device", "cpu", "--exp_type", "normal", *layers]
        load_script("mine/run_mi_exp.py").main([str(a) for a in argv])
        files = sorted((tmp_path / out).glob("mi_xy_*.npz"))
        assert len(files) == len(want)
        for f in files:
            assert np.load(f)["blocks"].tolist() == want, f
