"""Presentation of the analysis figures and tables: Figure 2's rows pair blocks of the same depth, multi-panel figures
do not draw labels over their neighbours, envs / models with nothing to show get no panel, bar or legend entry, a
model has one colour in every figure, iGPT's blocks are paired in the attention figure and table as in CKA's, score
cells have one format, notes are not repeated, and the block-replacement curves stay visible on white."""
import itertools
import json

import matplotlib
import matplotlib.colors as mcolors
import numpy as np
import pytest
from matplotlib.container import ErrorbarContainer
from test_analysis_support import load_script, tiny_runs  # noqa: F401

from decision_transformer.analysis import attention, common, curves, mi, report, scores
from decision_transformer.checkpoint import run_dir_name
from decision_transformer.envs import get_env_spec

PLOT_MI = "analysis/section-52-mutual-information/plot_mutual_information.py"
NO_CONTEXT = "analysis/section-55-fine-tuning-no-context/plot_learning_curve_no_context.py"


@pytest.fixture
def figures(monkeypatch):
    """The figures the analyses save, as (stem, figure), kept open for inspection."""
    got = []
    real = common.save_figure

    def spy(fig, figs_dir, stem, dpi=120):
        path = real(fig, figs_dir, stem, dpi)      # draws (and lays out) the figure, then closes it
        got.append((stem, fig))
        return path

    monkeypatch.setattr(common, "save_figure", spy)
    return got


def overlapping(fig) -> list:
    """Pairs of panels whose extents (ticks, tick labels, axis labels, titles, legends) overlap."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)                 # a closed figure may have lost its Agg canvas
    canvas.draw()
    r = canvas.get_renderer()
    boxes = [(ax, ax.get_tightbbox(r)) for ax in fig.axes if ax.get_visible()]
    return [(a.get_title(), b.get_title()) for (a, ba), (b, bb) in itertools.combinations(boxes, 2) if ba.overlaps(bb)]


def rgba(c):
    return mcolors.to_rgba(c)


def metrics_run(root, model, env="hopper", seed=666, K=20, returns=None, block=None, no_grad_clip=False):
    """A run folder with only ``metrics.jsonl`` (what the score tables and learning curves read)."""
    d = root / run_dir_name(model, "medium", env, seed, K, no_grad_clip, block)
    d.mkdir(parents=True)
    targets = [int(t) for t in get_env_spec(env).targets]
    target = {"hopper": 3600, "halfcheetah": 6000, "walker2d": 5000}[env]
    returns = returns if returns is not None else [1000.0 * i + 37 * len(model) for i in range(1, 11)]
    rows = [{"iteration": i, "training/action_error": 1.0 / i,
             **{f"evaluation/target_{t}_return_mean": r for t in targets + [target]}}
            for i, r in enumerate(returns, 1)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _no_context_args(ck, tmp_path, *extra):
    return curves.build_no_context_parser().parse_args(
        [str(a) for a in ["--checkpoint_dir", ck, "--results_dir", tmp_path / "res", "--figs_dir", tmp_path / "figs",
                          *extra]])


# ---- 1. Figure 2: rows by depth ----------------------------------------------------------------------------------

MODELS = ("gpt2", "igpt", "dt")


def _write_mi_xy(res, model, blocks, depth=None):
    pos = np.arange(6)
    for b in blocks:
        code = np.full(6, 1 + MODELS.index(model) + b / 100)        # which model and block a point comes from
        extra = {} if depth is None else {"depth": np.array(depth)}
        np.savez(res / f"mi_xy_{b}_40_{model}_hopper_medium_666.npz", x=code, y=code, position=pos, token=pos % 3,
                 **extra)


def _points(ax) -> set:
    """(model, block) of the points drawn in a Figure 2 panel."""
    vals = np.concatenate([c.get_offsets()[:, 1] for c in ax.collections if len(c.get_offsets())])
    return {(MODELS[int(v) - 1], round((v - int(v)) * 100)) for v in np.unique(np.round(vals, 4))}


@pytest.mark.parametrize("with_depth", [True, False])
def test_mi_rows_hold_blocks_of_the_same_depth(tmp_path, figures, with_depth):
    """GPT2 (12 blocks) and iGPT (24) files of blocks 0/6/11 and 0/12/23, and a 2-block model with blocks 0 and 1:
    each row holds one depth of every model and its title names every model's block (not the last model's), the
    2-block model's block 1 sits in the deep row. Files without the depth (older results) give the same rows."""
    res = tmp_path / "res"
    res.mkdir()
    for m, blocks, depth in (("gpt2", (0, 6, 11), 12), ("igpt", (0, 12, 23), 24), ("dt", (0, 1), 2)):
        _write_mi_xy(res, m, blocks, depth if with_depth else None)
    load_script(PLOT_MI).main(["--results_dir", res, "--figs_dir", tmp_path / "figs"])
    (_, fig), = figures
    axes = np.array(fig.axes).reshape(-1, 2)
    assert [ax.get_title() for ax in axes[:, 0]] == [
        "Î(X;T), shallow: GPT2/iGPT/Random Init block 0",
        "Î(X;T), middle: GPT2 block 6, iGPT block 12",
        "Î(X;T), deep: GPT2 block 11, iGPT block 23, Random Init block 1"]
    assert axes[2, 1].get_title() == "Î(Y;T), deep: GPT2 block 11, iGPT block 23, Random Init block 1"
    assert [_points(ax) for ax in axes[:, 0]] == [{("gpt2", 0), ("igpt", 0), ("dt", 0)},
                                                  {("gpt2", 6), ("igpt", 12)},
                                                  {("gpt2", 11), ("igpt", 23), ("dt", 1)}]
    assert _points(axes[2, 1]) == _points(axes[2, 0])
    colours = {tuple(c.get_facecolor()[0]) for c in axes[2, 0].collections if len(c.get_offsets())}
    assert colours == {rgba("C0"), rgba("C1"), rgba("C2")}
    legend = [t.get_text() for t in axes[0, 1].get_legend().get_texts()]
    assert legend[:3] == ["GPT2 R̂", "GPT2 s", "GPT2 a"] and "Random Init a" in legend
    assert not overlapping(fig)


def test_mi_rows_without_a_common_depth_name_list_the_blocks(tmp_path, figures):
    """Blocks chosen by hand (--layers 0 1 2 of a 12-block model) are named by their own depth, not by the row's
    (not "middle: block 1", "deep: block 2")."""
    res = tmp_path / "res"
    res.mkdir()
    _write_mi_xy(res, "gpt2", (0, 1, 2), 12)
    load_script(PLOT_MI).main(["--results_dir", res, "--figs_dir", tmp_path / "figs", "--model_name_list", "gpt2"])
    (_, fig), = figures
    assert [ax.get_title() for ax in fig.axes[::2]] == ["Î(X;T), shallow: GPT2 block 0", "Î(X;T), shallow: GPT2 block 1",
                                                        "Î(X;T), shallow: GPT2 block 2"]


def test_run_mi_records_the_depth(tmp_path):
    """run_mi_exp.py stores the model's depth next to each block's MI (what Figure 2's rows are placed by)."""
    res = tmp_path / "res"
    res.mkdir()
    B, K, D = 6, 2, 4
    rng = np.random.default_rng(0)
    np.savez(res / "data_hopper_medium_666.npz", states=rng.normal(size=(B, K, 11)), actions=rng.normal(size=(B, K, 3)),
             rtg=rng.normal(size=(B, K + 1, 1)), timesteps=np.zeros((B, K)), attention_mask=np.ones((B, K)))
    np.savez(res / "activation_40_dt_hopper_medium_666.npz",
             **{f"{b}.mlp.dropout": rng.normal(size=(B, 3 * K, D)) for b in range(5)})
    args = mi.build_mi_parser().parse_args([str(a) for a in ["-psm", res, "-pd", res, "-pa", res, "--model_name", "dt",
                                                             "--iters", "1", "--batch_size", "3", "--device", "cpu",
                                                             "--layers", "4"]])
    mi.run_mi(args)
    assert int(np.load(res / "mi_xy_4_40_dt_hopper_medium_666_it1_mb3.npz")["depth"]) == 5    # (tagged settings)


# ---- 2. labels over neighbouring panels, empty panels --------------------------------------------------------------

@pytest.fixture
def curve_runs(tmp_path):
    """K=1 and K=20 runs of gpt2 and dt on hopper and halfcheetah (metrics only, returns in the thousands), nothing for
    walker2d; no-grad-clip runs."""
    ck = tmp_path / "checkpoints"
    for env in ("hopper", "halfcheetah"):
        for m in ("gpt2", "dt"):
            for K in (1, 20):
                metrics_run(ck, m, env, K=K)
    metrics_run(ck, "gpt2", no_grad_clip=True)
    return ck


def test_no_context_figure_has_a_panel_per_env_with_runs_only(tmp_path, curve_runs, figures):
    """Figure 8 for hopper, walker2d (no runs: a note) and halfcheetah: two panels, labels clear of each other."""
    outs = curves.run_no_context(_no_context_args(curve_runs, tmp_path, "--env_name_list", "hopper", "walker2d",
                                                  "halfcheetah"))
    fig = dict(figures)["learning_curve_no_context_gpt2_dt_medium_666"]
    assert [ax.get_title() for ax in fig.axes] == ["hopper", "halfcheetah"]
    assert any("walker2d" in n for n in outs.notes)
    assert not overlapping(fig)


def test_multi_panel_figures_do_not_overlap(tmp_path, curve_runs, tiny_runs, figures):  # noqa: F811
    """Figure 22 and Figure 8 (three envs), Figure 16, Figure 9 and the gradient-clip curves: no panel's labels over
    another's."""
    res = tmp_path / "res"
    res.mkdir()
    for env in ("hopper", "halfcheetah", "walker2d"):
        for w in ("state", "rtg"):
            np.save(res / f"mi_data_{w}_action_{env}_medium_666.npy", np.linspace(0.5, 3000.0, 20))
    load_script("analysis/section-52-mutual-information/plot_mutual_information_data.py").main(
        ["--results_dir", res, "--figs_dir", tmp_path / "figs"])
    for m, n in (("gpt2", 12), ("igpt", 24)):
        np.savez(res / f"mi_40_{m}_hopper_medium_666.npz",
                 **{f"{b}.mlp.dropout": np.full((2, 20), 1000.0 + b) for b in range(n)})
    load_script(PLOT_MI).main(["--results_dir", res, "--figs_dir", tmp_path / "figs", "--exp_type", "no_context",
                               "--model_name_list", "igpt", "gpt2"])
    curves.run_no_context(_no_context_args(tiny_runs, tmp_path, "--env_name_list", "hopper", "-block"))
    curves.run_grad_clip(curves.build_grad_clip_parser().parse_args(
        [str(a) for a in ["--checkpoint_dir", curve_runs, "--results_dir", res, "--figs_dir", tmp_path / "figs"]]))
    metrics_run(curve_runs, "gpt2", "walker2d", K=1)
    curves.run_no_context(_no_context_args(curve_runs, tmp_path, "--model_name_list", "gpt2"))
    stems = [s for s, _ in figures]
    assert stems == ["mi_data_hopper_halfcheetah_walker2d_medium_666", "mi_no_context_40_igpt_gpt2_hopper_medium_666",
                     "learning_curve_block_hopper_medium_666", "learning_curve_grad_clip_gpt2_hopper_medium_666",
                     "learning_curve_no_context_gpt2_medium_666"]
    assert {s: overlapping(f) for s, f in figures} == {s: [] for s in stems}
    # Figure 16: iGPT's blocks are paired whichever model comes last
    fig16 = dict(figures)["mi_no_context_40_igpt_gpt2_hopper_medium_666"]
    assert [ax.get_xlabel() for ax in fig16.axes] == ["normalized block (iGPT: blocks 2b and 2b+1 averaged)"] * 2
    assert [(c.get_label(), len(c.lines[0].get_xdata())) for c in fig16.axes[0].containers] == [("iGPT", 12),
                                                                                                  ("GPT2", 12)]
    # the originals' 0-4.5 nats axis is raised to show every estimate (iGPT's last pair: (1022 + 1023) / 2), not cut
    assert [ax.get_ylim() for ax in fig16.axes] == [pytest.approx((-0.5, 1022.7))] * 2


# ---- 3. attention distance: iGPT's blocks paired ---------------------------------------------------------------------

def test_attention_figure_and_table_pair_the_deeper_models_blocks(tmp_path, tiny_runs, figures):  # noqa: F811
    """gpt2 (2 blocks) and igpt (4 blocks): one column / box position per normalized block, iGPT's = the mean of its
    blocks 2b and 2b+1 per sample (as CKA's normalised layers), every table row the same number of cells."""
    args = attention.build_parser().parse_args([str(a) for a in [
        "--checkpoint_dir", tiny_runs, "--env_name_list", "hopper", "--model_name_list", "gpt2", "igpt", "--K", "3",
        "--batch_size", "6", "--results_dir", tmp_path / "res", "--figs_dir", tmp_path / "figs"]])
    outs = attention.run(args)
    (title, table), = outs.tables
    lines = table.splitlines()
    assert lines[0] == "| model | 0 | 1 |"
    assert {line.count("|") for line in lines} == {4}
    gap = np.load(tmp_path / "res" / "att_dist_diff_0_4_igpt_hopper_medium_666_K1_bs6_ctx3.npy").mean(2)  # [B, 4]
    paired = gap.reshape(len(gap), 2, 2).mean(2)
    assert lines[3] == "| iGPT | " + " | ".join(f"{v:.3f}" for v in np.median(paired, 0)) + " |"
    assert "iGPT: blocks 2b and 2b+1 averaged" in title
    (_, fig), = figures
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1"]
    assert ax.get_xlabel() == "normalized block (iGPT: blocks 2b and 2b+1 averaged)"
    boxes = [p for p in ax.patches]
    assert [b.get_facecolor() for b in boxes] == [rgba("C0")] * 2 + [rgba("C1")] * 2
    medians = [ln.get_ydata()[0] for ln in ax.lines if len(ln.get_xdata()) == 2 and ln.get_ydata()[0] ==
               ln.get_ydata()[1]]
    for v in np.median(paired, 0):
        assert any(np.isclose(v, m) for m in medians)
    drawn = [mcolors.to_hex(ln.get_color()) for ln in ax.lines if len(ln.get_xdata())]      # medians, whiskers, caps
    assert drawn and set(drawn) == {"#000000"}                                              # (not orange on iGPT's)


# ---- 4. one colour per model ---------------------------------------------------------------------------------------

def test_model_colours_do_not_depend_on_the_list():
    assert common.model_colors(["dt", "gpt2"]) == {"dt": "C2", "gpt2": "C0"}
    assert common.model_colors(["igpt"]) == {"igpt": "C1"}
    others = common.model_colors(["chibiT", "dt", "bert", "gpt2", "t5", "llama"])
    assert others == common.model_colors(["llama", "t5", "gpt2", "bert", "dt", "chibiT"])
    assert {others[m] for m in ("chibiT", "bert", "t5", "llama")} <= {f"C{i}" for i in range(3, 10)}
    assert len(set(others.values())) == 6
    assert common.model_color("chibiT") == common.model_colors(["chibiT"])["chibiT"]


def test_random_init_alone_keeps_its_colour(tmp_path, curve_runs, figures):
    """Figure 8, the score bars and Figure 16 with Random Init alone: green (C2), as next to GPT2."""
    curves.run_no_context(_no_context_args(curve_runs, tmp_path, "--env_name_list", "hopper", "--model_name_list",
                                           "dt"))
    scores.run(scores.build_parser().parse_args([str(a) for a in [
        "--checkpoint_dir", curve_runs, "--env_name_list", "hopper", "--model_name_list", "dt", "--seed_list", "666",
        "--K", "1", "--results_dir", tmp_path / "res", "--figs_dir", tmp_path / "figs"]]))
    res = tmp_path / "res"
    np.savez(res / "mi_40_dt_hopper_medium_666.npz", **{f"{b}.mlp.dropout": np.ones((2, 5)) for b in range(3)})
    load_script(PLOT_MI).main(["--results_dir", res, "--figs_dir", tmp_path / "figs", "--exp_type", "no_context",
                               "--model_name_list", "dt"])
    figs = dict(figures)
    green = {mcolors.to_hex("C2")}
    assert {mcolors.to_hex(ln.get_color()) for ln in figs["learning_curve_no_context_dt_medium_666"].axes[0].lines} \
        == green
    assert {mcolors.to_hex(p.get_facecolor()) for p in figs["normalized_scores_medium_K1_d4rl_best"].axes[0].patches} \
        == green
    assert {mcolors.to_hex(ln.get_color()) for ln in figs["mi_no_context_40_dt_hopper_medium_666"].axes[0].lines} \
        == green


def test_random_init_alone_keeps_its_colour_in_the_checkpoint_figures(tmp_path, tiny_runs, figures):  # noqa: F811
    """Figure 1 (CKA), Figure 10 (attention), Figure 3 (parameters) and Figure 5 (gradient confusion)."""
    from decision_transformer.analysis import cka, grads, params

    io = ["--results_dir", tmp_path / "res", "--figs_dir", tmp_path / "figs"]
    ck = ["--checkpoint_dir", tiny_runs, "--env_name_list", "hopper", "--K", "3", "--batch_size", "4"]
    parse = lambda build, argv: build().parse_args([str(a) for a in argv])  # noqa: E731
    cka.run(parse(cka.build_parser, ck + ["--model_name1", "dt", "--model_name2", "dt", "--no_heatmap"] + io))
    cka.plot(parse(cka.build_plot_parser, ["--env_name_list", "hopper", "--model_name_list", "dt", "--token_list",
                                           "state", "--K", "3", "--batch_size", "4"] + io))
    attention.run(parse(attention.build_parser, ck + ["--model_name_list", "dt"] + io))
    params.run(parse(params.build_parser, ["-plm", tiny_runs, "--model_name_list", "dt"] + io))
    grads.run_confusion(parse(grads.build_confusion_parser, ck + ["--model_name_list", "dt", "--epoch", "1"] + io))
    green = mcolors.to_hex("C2")
    figs = dict(figures)
    cka_fig = figs["cka_plot_0_40_dt_hopper_medium_666_bs4_ctx3_state"]
    assert [mcolors.to_hex(ln.get_color()) for ln in cka_fig.axes[0].lines
            if ln.get_label() == "Random Init"] == [green]
    for stem in ("att_dist_diff_0_4_dt_hopper_medium_666_K1_bs4_ctx3", "paramdist_0_40_dt_hopper_medium_666",
                 "grad_confusion_1_dt_hopper_medium_666_bs4_ctx3"):           # (--batch_size 4, --K 3: tagged)
        assert {mcolors.to_hex(p.get_facecolor()) for p in figs[stem].axes[0].patches} == {green}, stem


# ---- 5. / 6. score bars and cells ---------------------------------------------------------------------------------

def test_score_bars_leave_out_what_has_no_score(tmp_path, figures):
    """gpt2: one seed, dt: two, igpt and walker2d: none -> one group, two legend entries, one error bar (dt's)."""
    ck = tmp_path / "checkpoints"
    metrics_run(ck, "gpt2", returns=[1000.0, 2000.0])
    metrics_run(ck, "dt", returns=[1000.0, 1500.0])
    metrics_run(ck, "dt", seed=42, returns=[1000.0, 1800.0])
    args = scores.build_parser().parse_args([str(a) for a in [
        "--checkpoint_dir", ck, "--env_name_list", "hopper", "walker2d", "--results_dir", tmp_path / "res",
        "--figs_dir", tmp_path / "figs"]])
    outs = scores.run(args)
    (_, fig), = figures
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["hopper"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["GPT2", "Random Init"]
    assert [p.get_facecolor() for p in ax.patches] == [rgba("C0"), rgba("C2")]
    segments = [s for c in ax.containers if isinstance(c, ErrorbarContainer) for lc in c.lines[2]
                for s in lc.get_segments()]
    assert len(segments) == 1 and abs(segments[0][1][1] - segments[0][0][1]) > 1      # dt's spread, not a 0 cap
    assert abs(segments[0][0][0] - ax.patches[1].get_x() - ax.patches[1].get_width() / 2) < 1e-9
    table = outs.tables[0][1]
    assert "(1 of 2 seeds)" in table and "n/a" in table          # gpt2: one of the title's two seeds


def test_score_cells_use_one_decimal():
    assert scores.mean_std([1.24]) == "1.2 (1 seed)"
    assert scores.mean_std([1.0, 2.0]) == "1.5 ± 0.5"
    assert scores.mean_std([float("nan")]) == "n/a"


# ---- 7. notes once -------------------------------------------------------------------------------------------------

def test_fig8_script_prints_each_note_once(tmp_path, curve_runs, capsys):
    """A missing K=1 run is skipped by the curves and by Table 2: one note."""
    metrics_run(curve_runs, "igpt", K=20)
    load_script(NO_CONTEXT).main(["--checkpoint_dir", curve_runs, "--env_name_list", "hopper", "--model_name_list",
                                  "gpt2", "igpt", "--results_dir", tmp_path / "res", "--figs_dir", tmp_path / "figs"])
    notes = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("note:")]
    assert notes and len(notes) == len(set(notes))
    assert sum("igpt_medium_hopper_666_K1" in n for n in notes) == 1


def test_report_lists_each_note_once(tmp_path):
    """A run folder without metrics is one line of report.md (not one per score table, best and last); a
    combination of the runs' models, seeds and envs that was never trained (no folder) is no line at all: the
    tables and the no-context figure cover the runs found, not every combination of their lists."""
    ck = tmp_path / "checkpoints"
    metrics_run(ck, "dt")
    metrics_run(ck, "dt", seed=42)
    metrics_run(ck, "gpt2")
    metrics_run(ck, "dt", env="walker2d")
    for m, env in (("dt", "hopper"), ("gpt2", "hopper"), ("dt", "walker2d")):
        metrics_run(ck, m, env=env, K=1)
    no_metrics = ck / run_dir_name("gpt2", "medium", "hopper", 42, 20, False, None)
    no_metrics.mkdir()
    (no_metrics / "model_40.pt").write_bytes(b"")
    args = report.build_parser().parse_args([str(a) for a in ["--checkpoint_dir", ck, "--out_dir", tmp_path / "rep",
                                                              "--only", "scores", "curves"]])
    text = report.run(args).read_text()
    notes = [ln for ln in text.splitlines() if ln.startswith("- ")]
    assert sum(f"metrics not found: {no_metrics / 'metrics.jsonl'}" in n for n in notes) == 1
    assert not [n for n in notes if "gpt2_medium_walker2d" in n or "dt_medium_walker2d_42" in n], notes
    assert text.count("| walker2d | n/a | 219.4 (1 seed) |") == 2   # Table 2 best and last: the run found
    assert len(notes) == len(set(notes))
    o = common.Outputs(notes=["a", "b"])
    o.extend(common.Outputs(notes=["b", "c", "a"]))
    assert o.notes == ["a", "b", "c"]


# ---- 8. block-replacement colours ------------------------------------------------------------------------------------

def _contrast_with_white(c) -> float:
    """WCAG contrast ratio of a colour against white."""
    lin = [x / 12.92 if x <= 0.03928 else ((x + 0.055) / 1.055) ** 2.4 for x in mcolors.to_rgb(c)]
    lum = 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]
    return 1.05 / (lum + 0.05)


def test_block_curves_stay_visible_on_white(tmp_path, tiny_runs, figures):  # noqa: F811
    curves.run_no_context(_no_context_args(tiny_runs, tmp_path, "--env_name_list", "hopper", "-block"))
    (_, fig), = figures
    colours = {ln.get_label(): ln.get_color() for ln in fig.axes[0].lines}
    assert mcolors.to_hex(colours["block 0"]) == mcolors.to_hex(matplotlib.colormaps["plasma"](0.1))   # violet
    # the references in their models' colours, as in every other figure (they were black and red)
    assert mcolors.to_hex(colours["GPT2 K=1"]) == mcolors.to_hex("C0")
    assert mcolors.to_hex(colours["Random Init K=1"]) == mcolors.to_hex("C2")
    assert all(mcolors.to_hex(curves.block_color(b, 12)) not in (mcolors.to_hex("C0"), mcolors.to_hex("C2"))
               for b in range(12))
    assert all(_contrast_with_white(colours[f"block {b}"]) > 1.8 for b in range(2))
    assert all(_contrast_with_white(curves.block_color(b, 12)) > 1.8 for b in range(12))
    assert len({mcolors.to_hex(curves.block_color(b, 12)) for b in range(12)}) == 12


def test_parameter_distances_can_be_scaled_to_the_data(tmp_path, tiny_runs, figures):  # noqa: F811
    """Figure 3 keeps the originals' 0-80 axis by default; ``--distance_ylim auto`` fits small models' distances."""
    from decision_transformer.analysis import params

    io = ["--results_dir", tmp_path / "res", "--figs_dir", tmp_path / "figs"]
    for mode in ("paper", "auto"):
        params.run(params.build_parser().parse_args([str(a) for a in ["-plm", tiny_runs, "--model_name_list", "dt",
                                                                      "--distance_ylim", mode] + io]))
    (paper_stem, paper), (auto_stem, auto) = [(s, f) for s, f in figures if s.startswith("paramdist_")]
    assert auto_stem == paper_stem + "_auto"  # both kept
    report.run(report.build_parser().parse_args([str(a) for a in [
        "--checkpoint_dir", tiny_runs, "--out_dir", tmp_path / "rep", "--only", "params", "--distance_ylim", "auto",
        "--model_name_list", "dt"]]))
    assert figures[-2][0].startswith("paramdist_") and figures[-2][0].endswith("_auto")  # passed on by run_all
    top = max(p.get_height() for p in auto.axes[0].patches)
    assert top < 76 and paper.axes[0].get_ylim() == (0.0, 80.0)
    assert auto.axes[0].get_ylim() == pytest.approx((0.0, 1.05 * top))


def test_cka_plot_pairs_igpt_blocks_or_legacy_consecutive_entries(tmp_path, figures):
    """plot_cka.py draws iGPT's 24 blocks on GPT2's 12: entry e of blocks 2b and 2b+1 averaged; --legacy_pairing
    averages consecutive entries of the flattened diagonal as the original, into a figure of its own name."""
    import csv

    from decision_transformer.analysis import cka
    from decision_transformer.analysis.activations import BLOCK_ENTRIES

    res = tmp_path / "res"
    res.mkdir()
    diags = {}
    for m, nb in (("gpt2", 12), ("igpt", 24)):
        names = [f"{b}.{e}" for b in range(nb) for e in BLOCK_ENTRIES]
        diags[m] = np.random.default_rng(nb).random(len(names))
        stem = cka.result_stem(0, 40, m, m, "hopper", "medium", 666)
        np.save(res / f"{stem}_state.npy", np.diag(diags[m]))
        with open(res / f"{stem}_layers.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["axis", "index", "layer"])
            w.writerows([[axis, i, n] for axis in ("rows", "cols") for i, n in enumerate(names)])
    per = len(BLOCK_ENTRIES)
    for legacy, expect in ((False, diags["igpt"].reshape(12, 2, per).mean(axis=1).ravel()),
                           (True, diags["igpt"].reshape(-1, 2).mean(axis=1))):
        argv = ["--env_name_list", "hopper", "--model_name_list", "gpt2", "igpt", "--token_list", "state",
                "--results_dir", str(res), "--figs_dir", str(tmp_path / "figs")] + (["--legacy_pairing"] * legacy)
        cka.plot(cka.build_plot_parser().parse_args(argv))
        stem = "cka_plot_0_40_gpt2_igpt_hopper_medium_666_state" + ("_legacy_pairing" if legacy else "")
        lines = {ln.get_label(): ln.get_ydata() for ln in dict(figures)[stem].axes[0].lines if ln.get_label()[0] != "_"}
        np.testing.assert_allclose(lines["iGPT"], expect)
        np.testing.assert_allclose(lines["GPT2"], diags["gpt2"])


@pytest.mark.parametrize("depths, block, label", [
    ((5, 3, 2), False, "layer (ticks: first entry of each block, 9 entries per block)"),
    ((5, 3, 2), True, "block"),
    ((5, 4, 2), False, "normalized layer (ticks: first entry of each block, 9 entries per block; iGPT: blocks 2b and "
                       "2b+1 averaged)"),
])
def test_cka_plot_says_normalized_only_of_paired_models(tmp_path, figures, depths, block, label):
    """Depths of which none is a multiple of the shallowest (5, 3, 2 blocks) are drawn block by block: the axis is not
    "normalized layer", and its block ticks run over the deepest model (not the last model's 2 blocks); a 4-block
    model next to a 2-block one is paired, and the label says which."""
    import csv

    from decision_transformer.analysis import cka
    from decision_transformer.analysis.activations import BLOCK_ENTRIES, BLOCK_OUTPUT

    res = tmp_path / "res"
    res.mkdir()
    entries = (BLOCK_OUTPUT,) if block else BLOCK_ENTRIES
    for m, nb in zip(MODELS, depths):
        names = [f"{b}.{e}" for b in range(nb) for e in entries]
        stem = cka.result_stem(0, 40, m, m, "hopper", "medium", 666, block=block)
        np.save(res / f"{stem}_state.npy", np.diag(np.linspace(0, 1, len(names))))
        with open(res / f"{stem}_layers.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["axis", "index", "layer"])
            w.writerows([[axis, i, n] for axis in ("rows", "cols") for i, n in enumerate(names)])
    argv = ["--env_name_list", "hopper", "--token_list", "state", "--results_dir", str(res), "--figs_dir",
            str(tmp_path / "figs")] + ["--block"] * block
    cka.plot(cka.build_plot_parser().parse_args(argv))
    (_, fig), = figures
    ax = fig.axes[0]
    assert ax.get_xlabel() == label
    # GPT2's 5 blocks (no multiple of 2, so never paired): the longest curve, drawn first
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(b) for b in range(5)]
    assert list(ax.get_xticks()) == [b * len(entries) for b in range(5)]


# ---- presentation: legends clear of the data, one colour per model, whole-number ticks, labelled lines --------------

def test_figures_keep_model_colours_ticks_and_labels(tmp_path, curve_runs, tiny_runs, figures):  # noqa: F811
    """The attention legend sits outside the axes (inside, it hid whiskers); the grad-clip curves and Fig. 7's bars
    are drawn in the model's colour (they were C0/C1 whatever the model); epoch axes have whole-number ticks; the
    gradient-confusion axis says what its bars are; the unclipped norms say so."""
    from decision_transformer.analysis import grads

    attention.run(attention.build_parser().parse_args([str(a) for a in [
        "--checkpoint_dir", tiny_runs, "--env_name_list", "hopper", "--model_name_list", "gpt2", "dt", "--K", "3",
        "--batch_size", "4", "--results_dir", tmp_path / "res", "--figs_dir", tmp_path / "figs"]]))
    curves.run_grad_clip(curves.build_grad_clip_parser().parse_args(
        [str(a) for a in ["--checkpoint_dir", curve_runs, "--results_dir", tmp_path / "res", "--figs_dir",
                          tmp_path / "figs"]]))
    small = ["--checkpoint_dir", tiny_runs, "--env_name_list", "hopper", "--model_name_list", "igpt", "--K", "3",
             "--batch_size", "4", "--results_dir", tmp_path / "res", "--figs_dir", tmp_path / "figs"]
    grads.run_confusion(grads.build_confusion_parser().parse_args([str(a) for a in small]))
    grads.run_norms(grads.build_norm_parser().parse_args([str(a) for a in small + ["--unclipped"]]))
    got = dict(figures)
    legend = got["att_dist_diff_0_4_gpt2_dt_hopper_medium_666_K1_bs4_ctx3"].axes[0].get_legend()
    assert legend.get_bbox_to_anchor().x0 > \
        got["att_dist_diff_0_4_gpt2_dt_hopper_medium_666_K1_bs4_ctx3"].axes[0].bbox.x1
    clip = got["learning_curve_grad_clip_gpt2_hopper_medium_666"].axes[0]
    assert {mcolors.to_hex(line.get_color()) for line in clip.lines} == {mcolors.to_hex("C0")}        # GPT2's blue
    assert [line.get_linestyle() for line in clip.lines] == ["-", "--"]
    ticks = clip.get_xticks()
    assert len(ticks) and all(float(t).is_integer() for t in ticks)
    per = got["gradnorm_perparam_1_igpt_hopper_medium_666_unclipped_bs4_ctx3"]     # (--batch_size 4, --K 3: tagged)
    assert {mcolors.to_hex(p.get_facecolor()) for p in per.axes[0].patches} == {mcolors.to_hex("C1")}  # iGPT's
    assert not {mcolors.to_hex(p.get_facecolor()) for p in per.axes[1].patches} & \
        {mcolors.to_hex(f"C{i}") for i in range(10)}                                        # greys, no model's colour
    assert got["gradnorms_1_igpt_hopper_medium_666_unclipped_bs4_ctx3"].axes[0].get_ylabel() == \
        "per-sample gradient norm (unclipped)"
    confusion = got["grad_confusion_1_igpt_hopper_medium_666_bs4_ctx3"]
    assert confusion.axes[0].get_ylabel() == "min pairwise cosine (i ≠ j)"


def test_parameter_figures_show_negative_cosines_and_share_the_concat_scale(tmp_path, tiny_runs, figures,  # noqa: F811
                                                                            hopper_data):
    """A negative cosine gets room below 0 (it was clipped at 0, as if unchanged); --concat rows share one scale;
    distances flat on the 0-80 axis get a note pointing to --distance_ylim auto."""
    import torch
    from test_analysis_support import write_run

    from decision_transformer.analysis import params

    ck = tmp_path / "ck"
    d = write_run(ck, "dt", data_file=hopper_data / "hopper-medium-v2.pkl", step=1e-4)
    obj = torch.load(d / "model_40.pt", weights_only=True)
    first = next(k for k in obj["state_dict"] if k.startswith("transformer.h.0.attn.c_attn.weight"))
    obj["state_dict"][first] = -obj["state_dict"][first]                        # cosine -1 with its start
    torch.save(obj, d / "model_40.pt")
    io = ["--results_dir", tmp_path / "res", "--figs_dir", tmp_path / "figs"]
    outs = params.run(params.build_parser().parse_args([str(a) for a in ["-plm", ck, "--model_name_list", "dt"] + io]))
    cos = dict(figures)["paramcos_0_40_dt_hopper_medium_666"]
    assert cos.axes[0].get_ylim()[0] == pytest.approx(-1.05, abs=1e-3)
    assert not any("--distance_ylim auto" in n for n in outs.notes)      # the flipped tensor moved far
    write_run(ck, "gpt2", data_file=hopper_data / "hopper-medium-v2.pkl", step=1e-4)
    outs = params.run(params.build_parser().parse_args([str(a) for a in ["-plm", ck, "--model_name_list", "gpt2"]
                                                        + io]))
    assert any("is under 1% of the 0-80 axis" in n and "--distance_ylim auto" in n for n in outs.notes)
    params.run(params.build_parser().parse_args([str(a) for a in ["-plm", tiny_runs, "--model_name_list", "gpt2",
                                                                  "dt", "--concat"] + io]))
    concat = dict(figures)["paramdist_0_40_gpt2_dt_hopper_medium_666_concat"]
    assert concat.axes[0].get_ylim() == concat.axes[1].get_ylim()        # one scale: bars comparable across rows
