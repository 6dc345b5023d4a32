"""The ChibiT maker (lm_cotraining/pretrain_chibit.py, decision_transformer/training/lm_pretrain.py): its flags are
checked before any work, any corpus bytes train, the output folder is written safely and loads with transformers."""
import json
import os
import random
import stat
from pathlib import Path

import pytest
import torch
from conftest import fails

from lm_cotraining import pretrain_chibit

TINY = ["--vocab_size", "300", "--n_layer", "1", "--n_embd", "16", "--n_head", "2", "--n_positions", "64",
        "--block_size", "16", "--batch_size", "2", "--steps", "2", "--warmup_steps", "1", "--device", "cpu"]


def corpus(path: Path, n_lines=300, seed=0) -> Path:
    """Pseudo-text over a random lexicon (enough pairs for a few hundred BPE merges)."""
    rng = random.Random(seed)
    lex = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8))) for _ in range(400)]
    path.write_text("".join(" ".join(rng.choice(lex) for _ in range(rng.randint(5, 12))) + ".\n"
                            for _ in range(n_lines)))
    return path


def make(text, out, *extra):
    return pretrain_chibit.main(["--text", str(text), "--out", str(out), *TINY, *extra])


def leftovers(folder: Path, *expected: str) -> list[str]:
    """What ``folder`` holds besides ``expected`` (a temporary folder left behind)."""
    return sorted(p.name for p in folder.iterdir() if p.name not in expected)


# ---- flags -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value, expect", [
    ("--n_head", "0", "--n_head must be >= 1 (got 0)"),
    ("--block_size", "0", "--block_size must be >= 1 (got 0)"),
    ("--block_size", "-5", "--block_size must be >= 1 (got -5)"),
    ("--batch_size", "0", "--batch_size must be >= 1 (got 0)"),
    ("--n_embd", "0", "--n_embd must be >= 1 (got 0)"),
    ("--n_layer", "0", "--n_layer must be >= 1 (got 0)"),
    ("--n_positions", "0", "--n_positions must be >= 1 (got 0)"),
    ("--vocab_size", "0", "--vocab_size must be >= 1 (got 0)"),
    ("--steps", "0", "--steps must be >= 1 (got 0)"),
    ("--warmup_steps", "-1", "--warmup_steps must be >= 0 (got -1)"),
    ("--lr", "-1", "--lr must be a finite number > 0 (got -1.0)"),
    ("--lr", "0", "--lr must be a finite number > 0 (got 0.0)"),
    ("--lr", "nan", "--lr must be a finite number > 0 (got nan)"),
    ("--lr", "inf", "--lr must be a finite number > 0 (got inf)"),
    ("--lr", "2", "--lr must be at most 1 (got 2.0)"),
    ("--n_head", "3", "--n_embd 16 is not divisible by --n_head 3"),
])
def test_bad_numbers_are_refused_before_the_corpus_is_read(tmp_path, capsys, monkeypatch, flag, value, expect):
    from decision_transformer.training import lm_pretrain

    text = corpus(tmp_path / "c.txt")
    read = []
    monkeypatch.setattr(lm_pretrain, "text_files", lambda p: read.append(p) or [Path(p)])
    out = tmp_path / "out"
    assert fails(pretrain_chibit.main, ["--text", text, "--out", out, *TINY, flag, value], capsys) == \
        f"error: {expect}"
    assert not read and not out.exists()


def test_an_lr_of_1_passes_the_checks(tmp_path, monkeypatch):
    """--lr 1 is the largest learning rate allowed: the run goes on to read the corpus."""
    from decision_transformer.training import lm_pretrain

    class Reached(Exception):
        pass

    def reached(path):
        raise Reached

    monkeypatch.setattr(lm_pretrain, "text_files", reached)
    with pytest.raises(Reached):
        make(corpus(tmp_path / "c.txt"), tmp_path / "out", "--lr", "1")
    assert not (tmp_path / "out").exists()

# ---- the corpus is read one way --------------------------------------------------------------------------------------

def test_a_corpus_that_is_not_utf8_trains_a_tokenizer(tmp_path, capsys):
    """Bytes that are not UTF-8 become U+FFFD for tokenizer training as for encoding (with or without --tokenizer
    the corpus is read the same way)."""
    from decision_transformer.training.lm_pretrain import encode_files, train_bpe_tokenizer

    text = corpus(tmp_path / "c.txt").read_bytes()
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(text + "caf\u00e9 na\u00efve r\u00e9sum\u00e9.\n".encode("latin-1") * 20)
    res = make(latin1, tmp_path / "m")
    assert res["tokens"] > 0 and (tmp_path / "m" / "tokenizer.json").is_file()
    tok = train_bpe_tokenizer([latin1], 300)
    ids = encode_files([latin1], tok)
    assert "\ufffd" in tok.decode(ids[-6:].tolist())


# ---- the saved tokenizer loads with transformers 4.x and 5.x ---------------------------------------------------------

def test_the_saved_tokenizer_is_a_gpt2_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    make(corpus(tmp_path / "c.txt"), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] in ("GPT2Tokenizer", "GPT2TokenizerFast")   # not 5.x's TokenizersBackend
    from decision_transformer.training.lm_pretrain import train_bpe_tokenizer

    trained = train_bpe_tokenizer([tmp_path / "c.txt"], 300)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "m"), local_files_only=True)
    sample = ["the quick brown fox.\n", "h\u00e9llo \u2603 <|endoftext|> x", (tmp_path / "c.txt").read_text()[:400]]
    assert loaded(sample)["input_ids"] == trained(sample)["input_ids"]
    assert len(loaded) == len(trained) and loaded.eos_token == "<|endoftext|>"
    assert loaded.decode(loaded(sample[1])["input_ids"]) == sample[1]


# ---- the output folder -----------------------------------------------------------------------------------------------

def test_out_that_is_or_holds_the_working_folder_or_the_corpus_is_refused(tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    text = corpus(work / "sub" / "c.txt")
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    assert "is or contains the working folder" in fails(pretrain_chibit.main, ["--text", text, "--out", ".", *TINY],
                                                        capsys)
    assert "is or contains the working folder" in fails(
        pretrain_chibit.main, ["--text", text, "--out", "..", "--overwrite", *TINY], capsys)
    assert "is or contains the corpus" in fails(
        pretrain_chibit.main, ["--text", text, "--out", "sub", "--overwrite", *TINY], capsys)
    assert "is or contains the corpus" in fails(
        pretrain_chibit.main, ["--text", "sub", "--out", "sub", "--overwrite", *TINY], capsys)
    assert (work / "keep.txt").read_text() == "mine" and text.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    assert sorted(p.name for p in work.iterdir()) == ["keep.txt", "sub"]


def test_an_unrelated_tmp_folder_beside_out_stays(tmp_path, monkeypatch):
    text = corpus(tmp_path / "c.txt")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keepme.tmp").mkdir()
    (tmp_path / "keepme.tmp" / "notes.txt").write_text("mine")
    make(text, "keepme")
    assert (tmp_path / "keepme.tmp" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "keepme" / "config.json").is_file()
    assert not leftovers(tmp_path, "c.txt", "keepme", "keepme.tmp")
    mode = stat.S_IMODE((tmp_path / "keepme").stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask                                    # an ordinary folder, not mkdtemp's 0700


def test_out_that_is_a_file_or_below_a_file_is_refused(tmp_path, capsys):
    text = corpus(tmp_path / "c.txt")
    (tmp_path / "afile").write_text("x")
    assert fails(pretrain_chibit.main, ["--text", text, "--out", tmp_path / "afile", *TINY], capsys) == \
        f"error: --out {tmp_path / 'afile'} is a file, not a folder; choose another --out"
    assert "is a file, not a folder" in fails(pretrain_chibit.main,
                                              ["--text", text, "--out", tmp_path / "afile" / "m", *TINY], capsys)
    assert (tmp_path / "afile").read_text() == "x"


def test_overwrite_replaces_out_only_once_the_new_one_is_complete(tmp_path, capsys, monkeypatch):
    text = corpus(tmp_path / "c.txt")
    out = tmp_path / "m"
    make(text, out, "--seed", "1")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "already exists and is not empty" in fails(pretrain_chibit.main, ["--text", text, "--out", out, *TINY],
                                                      capsys)
    # the disk fills while the new tokenizer is written: the old folder is kept whole, no temporary folder is left
    from transformers import PreTrainedTokenizerBase

    def full(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", full)
    fails(pretrain_chibit.main, ["--text", text, "--out", out, "--overwrite", "--seed", "2", *TINY], capsys)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and not leftovers(tmp_path, "c.txt", "m")
    monkeypatch.undo()
    make(text, out, "--overwrite", "--seed", "2")
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after.keys() == before.keys() and after != before and not leftovers(tmp_path, "c.txt", "m")
    from transformers import GPT2LMHeadModel

    assert GPT2LMHeadModel.from_pretrained(str(out)).config.n_embd == 16
    assert torch.is_tensor(GPT2LMHeadModel.from_pretrained(str(out)).transformer.wte.weight)


def test_training_prints_no_library_warning_and_its_loss_is_the_causal_lm_loss(tmp_path, capfd):
    """The next-token loss is computed here (transformers' labels path warns about GPT-2's loss type on every call):
    it equals GPT2LMHeadModel(labels=ids).loss, and a run prints no such warning."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from decision_transformer.training.lm_pretrain import next_token_loss

    make(corpus(tmp_path / "c.txt"), tmp_path / "m")
    assert "loss_type" not in capfd.readouterr().err
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0,
                                       eos_token_id=0)).eval()
    x = torch.randint(0, 50, (3, 9))
    assert torch.allclose(next_token_loss(model(input_ids=x).logits, x), model(input_ids=x, labels=x).loss)


def test_a_diverged_run_saves_nothing_and_keeps_the_earlier_model(tmp_path, capsys, monkeypatch):
    """A NaN loss stops the run with exit 3 before anything is written: --overwrite keeps the earlier model."""
    from decision_transformer.training import lm_pretrain

    text, out = corpus(tmp_path / "c.txt"), tmp_path / "m"
    make(text, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(lm_pretrain, "next_token_loss", lambda logits, x: logits.float().mean() * float("nan"))
    with pytest.raises(SystemExit) as e:
        make(text, out, "--overwrite")
    assert e.value.code == 3
    assert "error: the loss became NaN or inf by step 2; nothing was saved" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert fails(pretrain_chibit.main, ["--text", text, "--out", tmp_path / "m2", *TINY, "--lr", "1e38"], capsys) == \
        "error: --lr must be at most 1 (got 1e+38)"


def test_weights_made_nan_by_the_last_step_save_nothing(tmp_path, capsys, monkeypatch):
    """Every loss is computed before its step's update: weights that the last update makes NaN leave every loss
    finite, and are refused before anything is saved (exit 3)."""
    class NaNAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        p.fill_(float("nan"))

    monkeypatch.setattr(torch.optim, "AdamW", NaNAdamW)
    out = tmp_path / "m"
    with pytest.raises(SystemExit) as e:
        make(corpus(tmp_path / "c.txt"), out, "--steps", "1")
    assert e.value.code == 3
    err = capsys.readouterr().err
    assert "step 1/1 loss nan" not in err and \
        "error: the weights became NaN or inf; nothing was saved (a smaller --lr?)" in err
    assert not out.exists() and leftovers(tmp_path, "c.txt") == []

def test_a_tokenizer_whose_ids_pass_its_length_sizes_the_vocabulary(tmp_path, monkeypatch):
    """Token ids beyond len(tokenizer) (a tokenizer with gaps) fit the embedding instead of crashing it."""
    from decision_transformer.training import lm_pretrain

    ids = torch.arange(200) % 7
    ids[5] = 350                                                   # beyond the trained tokenizer's 300 entries
    monkeypatch.setattr(lm_pretrain, "encode_files", lambda files, tok: ids)
    res = make(corpus(tmp_path / "c.txt"), tmp_path / "m")
    assert res["vocab_size"] == 351
