"""The disk a run will write, estimated from its flags (decision_transformer/disk_estimate.py), against what real runs
write, and the sweep launcher's plan lines."""
from pathlib import Path

import pytest
import yaml

import experiment
import experiment_multi
from decision_transformer import disk_estimate, sweep
from decision_transformer.cli import experiment_parser

TINY = ["--K", "5", "--batch_size", "4", "--warmup_steps", "2", "--num_eval_episodes", "1", "--device", "cpu",
        "--num_steps_per_iter", "2"]


def _written(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*.pt"))


@pytest.mark.parametrize("model_flags", [["--embed_dim", "64", "--n_layer", "2"],
                                         ["--model_type", "bc", "--embed_dim", "512", "--n_layer", "3"]])
def test_the_estimate_matches_what_a_run_writes(tmp_path, monkeypatch, hopper_data, model_flags):
    """A run with a run folder and --save_model --save_mode both: its model files, training state and saved models
    are within 2% of the estimate made from its flags before it started (the config and pickle framing)."""
    monkeypatch.chdir(tmp_path)
    argv = ["--data_path", str(hopper_data), "--outdir", str(tmp_path / "ck"), "--max_iters", "2", "--save_model",
            "--save_mode", "both", *TINY, *model_flags]
    args = experiment_parser().parse_args(argv)
    size = disk_estimate.model_size(args)
    estimate = disk_estimate.run_bytes(args, None, size)
    experiment.main(argv)
    written = _written(tmp_path / "ck") + _written(tmp_path / "models")
    assert len(list((tmp_path / "ck").rglob("model_*.pt"))) == 3 and len(list((tmp_path / "models").rglob("*.pt"))) == 2
    assert written == pytest.approx(estimate, rel=0.02)
    if "bc" not in model_flags:   # the token embeddings, most of this model, have no AdamW moments
        assert size.trained < 0.2 * size.file


def test_a_multi_task_run_is_estimated_as_it_writes(tmp_path, monkeypatch, multi_medium_data):
    """experiment_multi.py with a run folder and --save_model --save_mode both: model_0.pt, the training state and the
    best and last models, within 2% of the estimate; the plan of a grid of it says the same figure."""
    from decision_transformer.multi_run import multi_parser

    monkeypatch.chdir(tmp_path)
    argv = ["--data_path", str(multi_medium_data), "--outdir", str(tmp_path / "ck"), "--max_iters", "2", "--seed", "1",
            "--embed_dim", "32", "--n_layer", "1", "--save_model", "--save_mode", "both", "--num_steps_per_iter", "2",
            "--num_eval_episodes", "1", "--K", "5", "--batch_size", "4", "--warmup_steps", "2", "--device", "cpu"]
    args = multi_parser().parse_args(argv)
    size = disk_estimate.multi_model_size(args)
    estimate = disk_estimate.multi_run_bytes(args, None, size)
    runs = [sweep.Run({}, argv, ["python", str(sweep.ROOT / "experiment_multi.py"), *argv], sweep.Found("new"))]
    assert sweep.disk_lines(runs)[0].startswith(f"disk: about {disk_estimate.human(estimate)} to write for 1 runs")
    experiment_multi.main(argv)
    written = _written(tmp_path / "ck") + _written(tmp_path / "models")
    assert len(list((tmp_path / "ck").rglob("*.pt"))) == 2 and len(list((tmp_path / "models").rglob("*.pt"))) == 2
    assert written == pytest.approx(estimate, rel=0.02)
    assert disk_estimate.multi_run_bytes(args, tmp_path / "ck", size) == estimate - size.file   # model_0.pt is there


def test_the_arithmetic_of_run_bytes(tmp_path):
    """max_iters + 1 model files and a training state in the run folder; --save_model adds one file (two with
    --save_mode both); no run folder, none of those; a run to resume does not count what its folder holds."""
    size = disk_estimate.ModelSize(file=100, trained=10)

    def est(*flags, folder=None):
        return disk_estimate.run_bytes(experiment_parser().parse_args(list(flags)), folder, size)

    assert est("--outdir", "ck", "--max_iters", "3") == 4 * 100 + (100 + 2 * 10)
    assert est("--outdir", "ck", "--max_iters", "3", "--save_model") == 5 * 100 + 120
    assert est("--outdir", "ck", "--max_iters", "3", "--save_model", "--save_mode", "both") == 6 * 100 + 120
    assert est("--outdir", "", "--max_iters", "3") == 0
    assert est("--outdir", "", "--max_iters", "3", "--save_model") == 100
    done = tmp_path / "run"
    done.mkdir()
    for i in range(2):
        (done / f"model_{i}.pt").write_bytes(b"x" * 100)
    assert est("--outdir", "ck", "--max_iters", "3", folder=done) == 2 * 100 + 120
    assert disk_estimate.human(512) == "512 B" and disk_estimate.human(3.45e6) == "3.5 MB"
    assert disk_estimate.human(281e9) == "281 GB" and disk_estimate.human(2.5e13) == "25.0 TB"


def test_the_plan_shows_the_disk_and_warns_when_the_file_system_is_too_small(tmp_path, monkeypatch, capsys,
                                                                             hopper_data):
    spec = {"program": "experiment.py",
            "fixed": {"data_path": str(hopper_data), "outdir": str(tmp_path / "ck"), "embed_dim": 32, "n_layer": 1,
                      "max_iters": 4},
            "grid": {"seed": [1, 2]}}
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump(spec))
    size = disk_estimate.model_size(experiment_parser().parse_args(sweep.to_argv(spec["fixed"])))
    per_run = 5 * size.file + size.file + 2 * size.trained
    assert sweep.main(["run", str(grid), "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert f"disk: about {disk_estimate.human(2 * per_run)} to write for 2 runs (model files of up to " \
           f"{disk_estimate.human(size.file)})\n" in out
    assert "free where" in out and "warning" not in out
    monkeypatch.setattr(disk_estimate, "free_bytes", lambda folder: per_run)
    sweep.main(["run", str(grid), "--dry_run"])
    out = capsys.readouterr().out
    assert f"warning: the file system of {tmp_path / 'ck'} has {disk_estimate.human(per_run)} free, less than the " \
           f"{disk_estimate.human(2 * per_run)} these runs write there" in out
    assert not (tmp_path / "ck").exists()      # a dry run writes nothing


def test_runs_that_cannot_be_sized_are_named(tmp_path, monkeypatch):
    """A run whose LM is not here, or of a program not sized (a data script), is listed as not estimated."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    runs = [sweep.Run({}, argv, ["python", str(sweep.ROOT / program), *argv], sweep.Found("new"))
            for program, argv in (("experiment.py", ["--pretrained_lm", str(tmp_path / "no_lm"), "--outdir", "ck"]),
                                  ("data/generate_datasets.py", ["--envs", "hopper"]))]
    lines = sweep.disk_lines(runs)
    assert len(lines) == 1 and lines[0].startswith("disk: not estimated for 2 runs (")
    assert "generate_datasets.py runs are not sized" in lines[0] and "no_lm" in lines[0]


def test_what_a_run_leaves_unwritten_is_not_counted(tmp_path):
    """--max_iters 0 writes model_0.pt and no training state (and no best model: nothing is evaluated); a run to
    resume whose folder holds its training state replaces it (no new bytes); the best model needs an evaluation."""
    from decision_transformer.multi_run import multi_parser

    size = disk_estimate.ModelSize(file=100, trained=10)

    def est(*flags, folder=None, parser=experiment_parser):
        bytes_of = disk_estimate.multi_run_bytes if parser is multi_parser else disk_estimate.run_bytes
        return bytes_of(parser().parse_args(list(flags)), folder, size)

    assert est("--outdir", "ck", "--max_iters", "0") == 100
    assert est("--outdir", "ck", "--max_iters", "0", "--save_model", "--save_mode", "both") == 200
    assert est("--outdir", "ck", "--max_iters", "2", "--save_model", "--save_mode", "best",
               "--num_eval_episodes", "0") == 300 + 120
    done = tmp_path / "run"
    done.mkdir()
    (done / "model_0.pt").write_bytes(b"x" * 100)
    assert est("--outdir", "ck", "--max_iters", "3", folder=done) == 3 * 100 + 120
    (done / "train_state.pt").write_bytes(b"x" * 120)
    assert est("--outdir", "ck", "--max_iters", "3", folder=done) == 3 * 100
    assert est("--outdir", "ck", "--max_iters", "3", parser=multi_parser) == 100 + 120
    assert est("--outdir", "ck", "--max_iters", "0", parser=multi_parser) == 100
    assert est("--outdir", "ck", "--max_iters", "3", folder=done, parser=multi_parser) == 0


def test_a_table_under_two_names_is_counted_once(tmp_path, monkeypatch, hopper_data):
    """--extend_positions: the timestep table is transformer.wpe (one tensor, two state-dict keys, stored once in a
    file): the estimate of the model file is within 1% of the file the run writes."""
    monkeypatch.chdir(tmp_path)
    argv = ["--data_path", str(hopper_data), "--outdir", str(tmp_path / "ck"), "--max_iters", "0", "--extend_positions",
            "--embed_dim", "32", "--n_layer", "1", *TINY]
    size = disk_estimate.model_size(experiment_parser().parse_args(argv))
    experiment.main(argv)
    (written,) = (tmp_path / "ck").rglob("model_0.pt")
    assert size.file == pytest.approx(written.stat().st_size, rel=0.01)


def test_the_plan_downloads_no_lm_and_looks_each_up_once(tmp_path, monkeypatch, capsys):
    """An LM that is neither here nor in the Hugging Face cache, with the Hub reachable: the runs are listed as not
    estimated (the run downloads it), nothing is downloaded; a local LM is looked up once for all the runs using it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from decision_transformer.models import pretrained

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(pretrained, "_hub_closed", lambda *a, **k: "")

    def no_download(*a, **k):
        raise AssertionError("the plan downloaded an LM")

    monkeypatch.setattr(pretrained, "_hub_download", no_download)
    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=40, vocab_size=50)).save_pretrained(
        tmp_path / "checkpoints" / "tiny")
    calls = []
    real = pretrained.locate_lm
    monkeypatch.setattr(pretrained, "locate_lm", lambda name, download=True: calls.append(name) or real(name, download))

    def run(lm, seed):
        argv = ["--pretrained_lm", lm, "--outdir", "ck", "--seed", str(seed), "--max_iters", "1"]
        return sweep.Run({}, argv, ["python", str(sweep.ROOT / "experiment.py"), *argv], sweep.Found("new"))

    lines = sweep.disk_lines([run("org/absent-lm", s) for s in (1, 2)] + [run("tiny", s) for s in (1, 2, 3)])
    assert lines[0].startswith("disk: about ") and "for 3 runs" in lines[0]
    assert lines[-1].startswith("disk: not estimated for 2 runs (--pretrained_lm org/absent-lm: not downloaded yet")
    assert sorted(calls) == ["org/absent-lm", "tiny"]
    assert capsys.readouterr().err.count("using ") <= 1


def test_a_resumed_run_does_not_count_the_saved_models_it_replaces(tmp_path, monkeypatch, hopper_data):
    """A finished --save_model --save_mode both run whose last model was moved away is to resume: it writes that one
    model again; its best model, written already and only replaced, is not counted."""
    monkeypatch.chdir(tmp_path)
    argv = ["--data_path", str(hopper_data), "--outdir", str(tmp_path / "ck"), "--max_iters", "1", "--save_model",
            "--save_mode", "both", "--embed_dim", "32", "--n_layer", "1", *TINY]
    experiment.main(argv)
    (last,) = (p for p in (tmp_path / "models" / "hopper").glob("*.pt") if not p.name.endswith("_best.pt"))
    size = last.stat().st_size
    last.rename(tmp_path / "moved.pt")
    found = sweep.inspect_run(str(sweep.ROOT / "experiment.py"), argv)
    assert found.state == "partial"
    run = sweep.Run({}, argv, ["python", str(sweep.ROOT / "experiment.py"), *argv, "--resume"], found)
    model = disk_estimate.model_size(experiment_parser().parse_args(argv))
    assert model.file == pytest.approx(size, rel=0.02)
    assert sweep.disk_lines([run])[0].startswith(f"disk: about {disk_estimate.human(model.file)} to write for 1 runs")
