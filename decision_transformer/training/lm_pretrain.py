"""Pretrain a ChibiT-style small GPT-2 on a local text file, so LM-initialised runs need no download.

REID's ChibiT is a small GPT-2 (hidden 128) pretrained on Wikipedia and distributed on Google Drive, which cannot be
reached here. This trains the same kind of model (default 3 layers, 128 hidden, 1 head, GPT-2 architecture) with
the causal-LM objective and writes it, with its tokenizer, via ``save_pretrained`` — a directory that
``--pretrained_lm`` accepts like any GPT-2 directory. Without a tokenizer a byte-level BPE tokenizer (GPT-2's scheme)
is trained on the same text first.
"""
from __future__ import annotations

import errno
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from decision_transformer.errors import TrainingDiverged, UserError, first_line, write_problem
from decision_transformer.files import short_name
from decision_transformer.training.corpus import encode_batches, text_batches
from decision_transformer.training.lm_cotrain import next_token_loss
from decision_transformer.training.trainer import to_device_async

EOS = "<|endoftext|>"


def text_files(path: str | Path) -> list[Path]:
    """The corpus files of ``path``: the file itself, or the folder's .txt/.raw/.tokens/.text files in sorted order; a
    ``UserError`` when there are none."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (".txt", ".raw", ".tokens", ".text"))
        if files:
            return files
    raise UserError(f"{path}: no text file (or folder of .txt/.raw/.tokens/.text files) to pretrain on")


def _line_batches(files: list[Path]):
    """The corpus's lines in batches (bad UTF-8 bytes as U+FFFD, so tokenizer training and encoding agree)."""
    return text_batches(files, split_all=True)


def train_bpe_tokenizer(files: list[Path], vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2's scheme) trained on ``files``, as a transformers GPT-2 fast tokenizer (its
    saved ``tokenizer_class`` is a GPT-2 tokenizer, which transformers 4.x and 5.x both load)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_line_batches(files), trainer)
    return GPT2TokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                             model_max_length=1024)


def load_tokenizer_dir(path: str | Path):
    """The tokenizer saved in ``path`` (no download); a ``UserError`` when it cannot be loaded or has no vocabulary."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise UserError(f"{path}: cannot load a tokenizer ({first_line(e)})") from None
    if len(tok) <= 1:   # (a folder with only tokenizer_config.json loads as an empty tokenizer)
        raise UserError(f"{path}: the tokenizer there has no vocabulary (no tokenizer.json or vocab.json + "
                        f"merges.txt)")
    return tok


def encode_files(files: list[Path], tokenizer) -> torch.Tensor:
    """The token ids of ``files``, in order, as one 1-D int64 tensor."""
    return torch.from_numpy(encode_batches(_line_batches(files), tokenizer))


def check_settings(**flags):
    """One line for the first setting (a ``pretrain_chibit.py`` flag) that cannot train a model."""
    for name in ("vocab_size", "n_layer", "n_embd", "n_head", "n_positions", "block_size", "batch_size", "steps",
                 "log_every"):
        if flags[name] < 1:
            raise UserError(f"--{name} must be >= 1 (got {flags[name]})")
    if flags["vocab_size"] > 1_000_000:  # the tokenizer library aborts the process on huge vocabularies
        raise UserError(f"--vocab_size {flags['vocab_size']} is too large (at most 1,000,000)")
    if flags["warmup_steps"] < 0:
        raise UserError(f"--warmup_steps must be >= 0 (got {flags['warmup_steps']})")
    if not (math.isfinite(flags["lr"]) and flags["lr"] > 0):
        raise UserError(f"--lr must be a finite number > 0 (got {flags['lr']})")
    if flags["lr"] > 1:   # AdamW steps each weight by about lr: beyond 1 training diverges (or overflows) at once
        raise UserError(f"--lr must be at most 1 (got {flags['lr']})")
    if flags["block_size"] > flags["n_positions"]:
        raise UserError(f"--block_size {flags['block_size']} exceeds --n_positions {flags['n_positions']}")
    if flags["n_embd"] % flags["n_head"]:
        raise UserError(f"--n_embd {flags['n_embd']} is not divisible by --n_head {flags['n_head']}")


def check_out_dir(out_dir: str | Path, text: str | Path, overwrite: bool) -> Path:
    """``out_dir`` made absolute, checked before training: a folder (new, empty, or replaced with ``overwrite``) that
    neither is nor holds the working folder or the corpus, below a folder that can be written."""
    out = Path(out_dir).expanduser().resolve()
    for what, inside in (("the working folder", Path.cwd().resolve()), ("the corpus", Path(text).resolve())):
        if out == inside or out in inside.parents:
            raise UserError(f"--out {out_dir} is or contains {what} ({inside}); choose a folder of its own")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out_dir} already exists and is not empty; pass --overwrite or choose another --out")
    base = next(p for p in out.parents if p.exists())
    if not base.is_dir():
        raise UserError(f"--out {out_dir}: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UserError(f"--out {out_dir}: cannot write in {base} (permission denied)")
    return out


def save_model_dir(out: Path, model, tokenizer, replace: bool = True):
    """Write model and tokenizer to a new temporary folder beside ``out``, then move it into place; an existing
    ``out`` is replaced only once the new folder is complete. Nothing but ``out`` and the tool's own temporary
    folders is removed. ``replace`` False: an ``out`` that is no empty folder (another process saved there since the
    caller's check) is kept, and the new folder goes to ``{out}.new-{pid}`` beside it (a ``UserError`` says so)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{short_name(out.name)}.tmp-"))
    except OSError as e:
        raise UserError(f"cannot write {out}: {write_problem(out, e)}") from None
    old = None
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # the permissions of a folder made the ordinary way (mkdtemp makes it 0700)
        from transformers.utils import logging as hf_logging

        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()   # (transformers' shard bar; the caller says what was saved, in one line)
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        except Exception as e:  # noqa: BLE001 - safetensors' and tokenizers' own errors too (a full disk): one line
            raise UserError(f"cannot write {out}: {write_problem(tmp / 'model.safetensors', e)}") from None
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        if not replace:
            try:
                tmp.rename(out)   # (replaces an empty folder only: atomic, also against another process)
                return
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                    raise
            aside = out.with_name(f"{short_name(out.name)}.new-{os.getpid()}")
            tmp.rename(aside)
            raise UserError(f"{out} was written by another process meanwhile; it is kept, and this model is saved to "
                            f"{aside} instead (--overwrite replaces it)")
        if out.exists():  # --overwrite: set the old folder aside until the new one is in place
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{short_name(out.name)}.old-"))
            out.rename(old / out.name)
        try:
            tmp.rename(out)
        except BaseException:
            if old is not None:
                (old / out.name).rename(out)
                shutil.rmtree(old, ignore_errors=True)
                old = None
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def pretrain_chibit(text: str | Path, out_dir: str | Path, *, tokenizer_dir: str | Path | None = None,
                    vocab_size: int = 8192, n_layer: int = 3, n_embd: int = 128, n_head: int = 1,
                    n_positions: int = 1024, block_size: int = 256, batch_size: int = 16, steps: int = 2000,
                    lr: float = 5e-4, warmup_steps: int = 100, seed: int = 0, device: str = "cpu",
                    overwrite: bool = False, log_every: int = 100) -> dict:
    """Train and save; returns {"first_loss", "last_loss", "vocab_size", "tokens", "out_dir"}."""
    from transformers import GPT2Config, GPT2LMHeadModel

    check_settings(vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
                   block_size=block_size, batch_size=batch_size, steps=steps, lr=lr, warmup_steps=warmup_steps,
                   log_every=log_every)
    files = text_files(text)
    out = check_out_dir(out_dir, text, overwrite)
    torch.manual_seed(seed)
    tokenizer = load_tokenizer_dir(tokenizer_dir) if tokenizer_dir else train_bpe_tokenizer(files, vocab_size)
    ids = encode_files(files, tokenizer)
    if len(ids) < block_size:
        raise UserError(f"{text}: {len(ids)} tokens, fewer than one block of {block_size}")
    vocab = max(len(tokenizer), int(ids.max()) + 1)  # (a tokenizer whose ids leave gaps can exceed its length)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    cfg = GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     bos_token_id=eos, eos_token_id=eos)
    dev = torch.device(device)
    model = GPT2LMHeadModel(cfg).to(dev)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda n: min((n + 1) / max(warmup_steps, 1), 1.0) *
        (0.5 * (1 + math.cos(math.pi * min(n / max(steps, 1), 1.0))) * 0.9 + 0.1))
    g = torch.Generator().manual_seed(seed)
    data = ids.to(dev)
    first = last = float("nan")
    t0 = time.time()
    finite = torch.ones((), dtype=torch.bool, device=dev)   # every step's loss finite (read at the log steps)
    for step in range(1, steps + 1):
        # random windows of block_size tokens, the last one included; labels are the inputs (the loss shifts them)
        starts = to_device_async(torch.randint(0, len(ids) - block_size + 1, (batch_size,), generator=g), dev)
        x = data[starts.unsqueeze(1) + torch.arange(block_size, device=dev)]
        # as GPT2LMHeadModel(labels=x), computed here: that path warns on every call in recent transformers,
        # whose loss lookup does not know GPT-2's class name
        loss = next_token_loss(model(input_ids=x).logits, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        finite &= torch.isfinite(loss.detach())
        if step == 1:
            first = float(loss.detach())
        if step % log_every == 0 or step == steps:
            last = float(loss.detach())
            print(f"step {step}/{steps} loss {last:.4f} ({time.time() - t0:.0f}s)", file=sys.stderr)
            if not bool(finite):
                raise TrainingDiverged(f"the loss became NaN or inf by step {step}; nothing was saved (a smaller "
                                       f"--lr?)")
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise TrainingDiverged("the weights became NaN or inf; nothing was saved (a smaller --lr?)")
    save_model_dir(out, model.cpu(), tokenizer, replace=overwrite)
    print(f"saved ChibiT-style GPT-2 ({n_layer} layers, hidden {n_embd}, {n_head} heads, vocab {vocab}) to {out_dir}",
          file=sys.stderr)
    return {"first_loss": first, "last_loss": last, "vocab_size": vocab, "tokens": len(ids),
            "out_dir": str(Path(out_dir))}
