"""Corpus reading in bounded memory (decision_transformer/training/corpus.py): batches of lines, overlong lines cut
between words so their tokens do not change, ids gathered as one int64 array."""
import numpy as np
import torch
from test_tools_pretrain import corpus

from decision_transformer.training.corpus import _pieces, encode_batches, text_batches


def _bpe(tmp_path):
    from decision_transformer.training.lm_pretrain import train_bpe_tokenizer

    return train_bpe_tokenizer([corpus(tmp_path / "lex.txt", n_lines=200)], 300)


def test_an_overlong_line_is_cut_between_words_and_keeps_its_tokens(tmp_path):
    tok = _bpe(tmp_path)
    line = (tmp_path / "lex.txt").read_text().replace("\n", " ")        # the whole corpus as one line
    pieces = list(_pieces(line, 200))
    assert "".join(pieces) == line and len(pieces) > 10
    assert all(len(p) <= 200 for p in pieces)
    assert all(p.startswith(" ") and not p[1].isspace() for p in pieces[1:])   # each cut just before " word"
    whole = tok([line])["input_ids"][0]
    one_line = tmp_path / "one_line.txt"
    one_line.write_text(line)
    ids = encode_batches(text_batches([one_line], max_chars=200), tok)
    assert ids.dtype == np.int64
    assert ids.tolist() == whole


def test_a_line_without_spaces_is_cut_where_it_must():
    assert list(_pieces("x" * 25, 10)) == ["x" * 10, "x" * 10, "x" * 5]
    assert list(_pieces("ab  cd", 4)) == ["ab  ", "cd"]          # no gap between two words in the window: a hard cut
    assert list(_pieces("short", 10)) == ["short"]


def test_batches_hold_bounded_lines_and_characters_and_never_span_files(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("".join(f"line {i}\n" for i in range(7)))
    b.write_text("tail\fpage\n")
    assert list(text_batches([a, b], batch_lines=3)) == [
        ["line 0\n", "line 1\n", "line 2\n"], ["line 3\n", "line 4\n", "line 5\n"], ["line 6\n"], ["tail\fpage\n"]]
    assert list(text_batches([b], split_all=True)) == [["tail\f", "page\n"]]   # as str.splitlines of the whole text
    assert [len(x) for x in text_batches([a], max_chars=14)] == [2, 2, 2, 1]


def test_the_joint_corpus_of_one_long_line_gives_the_blocks_of_the_whole_line(tmp_path):
    from decision_transformer.training.lm_cotrain import tokenize_corpus

    tok = _bpe(tmp_path)
    line = (tmp_path / "lex.txt").read_text().replace("\n", " ")
    one_line = tmp_path / "one_line.txt"
    one_line.write_text(line)
    whole = torch.tensor(tok([line])["input_ids"][0])
    blocks = tokenize_corpus([one_line], tok, 16, 300, max_chars=300)
    n = len(whole) // 16
    assert blocks.dtype == torch.long and torch.equal(blocks, whole[:n * 16].view(n, 16))


def test_blank_lines_of_a_joint_corpus_give_no_tokens(tmp_path):
    """wikitext's raw files hold " \n" between paragraphs, which the datasets loader makes into rows "" (no tokens);
    read line by line they were " \n" tokens in the --joint stream (a third of wiki.train.raw's lines)."""
    from decision_transformer.training import lm_cotrain

    tok = _bpe(tmp_path)
    rows = [" = Title = \n", "the cat sat on the mat \n", "a dog ran \n"] * 40
    raw = tmp_path / "wiki.train.raw"
    raw.write_text("".join(f" \n{r}" for r in rows) + "\n\t\n")
    expected = torch.tensor([i for r in rows for i in tok([r])["input_ids"][0]])
    blocks = lm_cotrain.tokenize_corpus([raw], tok, 16, 300, chunk_lines=7)
    n = len(expected) // 16
    assert torch.equal(blocks, expected[:n * 16].view(n, 16))
    # a cache written before blank lines gave no tokens (its key without the rule's tag) is not taken
    import hashlib

    old = hashlib.sha256(f"16|{lm_cotrain._tokenizer_fingerprint(tok)}".encode())
    st = raw.stat()
    old.update(f"|{raw.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    (tmp_path / "cache").mkdir()
    stale = tmp_path / "cache" / f"joint_{old.hexdigest()[:20]}.pt"
    torch.save({"blocks": torch.zeros(3, 16, dtype=torch.long)}, stale)
    cached = lm_cotrain.cached_tokenize_corpus([raw], tok, 16, 300, tmp_path / "cache")
    assert torch.equal(cached, blocks)
