"""LM co-training (``--joint``, REID/LAWSON ``lm_cotraining``) and the mixed-precision trainer of that script.

Each training step also draws one batch of text (2 blocks of up to 1024 tokens), runs it through the DT's own
transformer as a causal LM **with** position embeddings and the head tied to ``wte`` and adds w * cross-entropy to
the loss; w = ``--gpt_lm_const``, decayed linearly over the run with ``--lm_const_linear_decay`` (to const / S on
the last of S steps, see ``LMCotraining.weight``; model.md §13). The text is a local corpus tokenised with the LM's tokenizer; nothing is downloaded.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from decision_transformer.errors import UserError
from decision_transformer.files import check_zip_checksums
from decision_transformer.training.corpus import BATCH_LINES, MAX_PIECE_CHARS, encode_batches, text_batches
from decision_transformer.training.trainer import Trainer, mark_step, to_device_async

LM_BATCH_SIZE = 2          # the originals' per-device batch
MAX_BLOCK_SIZE = 1024      # the originals' group_texts block size
TEXT_SUFFIXES = (".txt", ".raw", ".tokens", ".text")


# ---- corpus and tokenizer ---------------------------------------------------------------------------------------

def _text_files(d: Path) -> list[Path]:
    files = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    train = [p for p in files if "train" in p.name]
    return train or files


def find_text_corpus(name: str, config_name: str | None, data_path: str = "data") -> list[Path]:
    """The training text files of ``--nlp_dataset_name`` (+ ``--nlp_dataset_config_name``): a text file, a folder
    of text files (``*train*`` files preferred, e.g. ``wiki.train.raw`` of the extracted WikiText zip), or such a
    folder at ``{data_path}/{name}/{config}``, ``{data_path}/{config}``, ``{data_path}/{name}``."""
    candidates = [Path(name)]
    if config_name:
        candidates += [Path(name) / config_name, Path(data_path) / name / config_name, Path(data_path) / config_name]
    candidates.append(Path(data_path) / name)
    for c in candidates:
        if c.is_file():
            return [c]
        if c.is_dir():
            files = _text_files(c)
            if files:
                return files
    looked = ", ".join(str(c) for c in dict.fromkeys(candidates))
    empty = [str(c) for c in dict.fromkeys(candidates) if c.is_dir()]   # there, but without a text file
    found = (f"the folder {empty[0]} holds no {'/'.join(TEXT_SUFFIXES)} file" if empty
             else f"not found locally (looked at {looked})")
    raise UserError(f"--joint: LM corpus {name!r} ({config_name}): {found}; corpora are read from disk, never "
                    f"downloaded: pass --nlp_dataset_name PATH to a text file or a folder of .txt/.raw files, e.g. the "
                    f"extracted wikitext-103-raw-v1 folder holding wiki.train.raw")


def load_tokenizer(lm_path: Path, tokenizer_name: str | None):
    """The LM's own tokenizer when its directory has one and ``--tokenizer_name`` is the default; otherwise
    ``--tokenizer_name`` resolved like an LM (local folder, ``checkpoints/NAME``, Hugging Face cache)."""
    from decision_transformer.models.pretrained import find_model_dir

    has_own = _has_tokenizer(lm_path)
    if has_own and tokenizer_name in (None, "gpt2"):
        path = lm_path
    else:
        path, _ = _find_tokenizer_dir(tokenizer_name or "gpt2", find_model_dir)
    if not _has_tokenizer(path):  # a model folder without tokenizer files would load as an empty tokenizer
        raise UserError(f"--joint: {path} (from --tokenizer_name {tokenizer_name or 'gpt2'}) holds no tokenizer files "
                        f"({', '.join(TOKENIZER_FILES)}); pass --tokenizer_name with a folder that has them, or save "
                        f"the tokenizer into the LM's folder")
    from decision_transformer.training.lm_pretrain import load_tokenizer_dir

    return load_tokenizer_dir(path)


#: the files that hold a tokenizer's vocabulary (tokenizer_config.json alone loads as an empty tokenizer)
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def _has_tokenizer(folder) -> bool:
    return any((Path(folder) / f).is_file() for f in TOKENIZER_FILES)


def _find_tokenizer_dir(name, find_model_dir):
    """Where the tokenizer ``name`` is, looked up like an LM; a local model folder without tokenizer files (a model
    saved alone, as in checkpoints/gpt2) gives way to the Hugging Face cache's snapshot of ``name`` that has them."""
    p = Path(name)
    if p.is_dir() and _has_tokenizer(p):
        return p, "local"
    path, where = find_model_dir(name, what="tokenizer", flag="--tokenizer_name")
    if where == "local" and not _has_tokenizer(path):
        from decision_transformer.models.pretrained import _hf_cached_snapshot

        snap = _hf_cached_snapshot(name, weights=False)
        if snap is not None and _has_tokenizer(snap):
            print(f"--tokenizer_name {name}: {path} holds no tokenizer files; using {snap}", file=sys.stderr)
            return snap, "hf-cache"
    return path, where


def tokenize_corpus(files: list[Path], tokenizer, block_size: int, vocab_size: int,
                    chunk_lines: int = BATCH_LINES, max_chars: int = MAX_PIECE_CHARS) -> torch.Tensor:
    """Concatenate the tokens of every file (lines tokenised in batches, as ``datasets.map`` + ``group_texts``) and
    cut them into [n_blocks, block_size] (the remainder is dropped). A blank line (whitespace only, as wikitext's
    `` \n`` between paragraphs) gives no tokens, as the rows ``""`` the ``datasets`` wikitext loader makes of them."""
    batches = ([line if line.strip() else "" for line in batch] for batch in text_batches(files, chunk_lines, max_chars))
    ids = torch.from_numpy(encode_batches(batches, tokenizer))
    n = len(ids) // block_size
    if n == 0:
        raise UserError(f"--joint: the corpus ({', '.join(map(str, files))}) has {len(ids)} tokens, fewer than one "
                        f"block of {block_size}")
    blocks = ids[:n * block_size].view(n, block_size)
    check_vocabulary(blocks, vocab_size)
    return blocks


def check_vocabulary(blocks: torch.Tensor, vocab_size: int, where: str = ""):
    """Refuse token ids the LM has no embedding for (a tokenizer that is not the LM's)."""
    top = int(blocks.max())
    if top >= vocab_size:
        raise UserError(f"--joint: the tokenizer produces id {top}{where} but the LM has only {vocab_size} embeddings; "
                        f"use the LM's own tokenizer (--tokenizer_name)")


def _tokenizer_fingerprint(tokenizer) -> str:
    """What decides the token ids: the tokenizer's class, vocabulary size and (for a local folder) its files."""
    import hashlib

    h = hashlib.sha256(f"{type(tokenizer).__name__}|{len(tokenizer)}".encode())
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    if folder.is_dir():
        for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
            if (folder / name).is_file():
                h.update(name.encode() + (folder / name).read_bytes())
    else:
        h.update(str(folder).encode())
    return h.hexdigest()


def cached_tokenize_corpus(files: list[Path], tokenizer, block_size: int, vocab_size: int,
                           cache_dir: Path | None) -> torch.Tensor:
    """``tokenize_corpus`` through a cache: ``cache_dir/joint_{key}.pt`` with the key made of the corpus files (path,
    size, modification time), the tokenizer's fingerprint and the block size. A damaged cache file is recomputed."""
    import hashlib

    if cache_dir is None:
        return tokenize_corpus(files, tokenizer, block_size, vocab_size)
    # ("blank-lines-empty": caches made while blank lines still gave tokens are not taken)
    h = hashlib.sha256(f"blank-lines-empty|{block_size}|{_tokenizer_fingerprint(tokenizer)}".encode())
    for f in files:
        st = Path(f).stat()
        h.update(f"|{Path(f).resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    path = Path(cache_dir) / f"joint_{h.hexdigest()[:20]}.pt"
    if path.is_file():
        try:
            check_zip_checksums(path)
            blocks = torch.load(path, weights_only=True)["blocks"]
            ok = (isinstance(blocks, torch.Tensor) and blocks.dtype == torch.long and blocks.dim() == 2
                  and blocks.shape == (blocks.shape[0], block_size) and blocks.numel() and int(blocks.min()) >= 0)
        except Exception:  # noqa: BLE001 - any damage means: tokenise again
            ok = False
        if ok:
            # the key holds the tokenizer, so tokenising again would give these ids again: an LM without embeddings
            # for them is refused here
            check_vocabulary(blocks, vocab_size, f" (tokens from the cache {path})")
            print(f"joint LM training: tokens from the cache {path}", file=sys.stderr)
            return blocks
        print(f"warning: {path}: unreadable token cache, tokenising again", file=sys.stderr)
    blocks = tokenize_corpus(files, tokenizer, block_size, vocab_size)
    from decision_transformer.checkpoint import atomic_save

    try:
        atomic_save({"blocks": blocks, "files": [str(f) for f in files]}, path)
    except UserError as e:   # a cache only saves time: a read-only --data_path (a shared mount) does not stop the run
        print(f"warning: {e}; the tokens are used without a cache (--no_token_cache: none, and no warning)",
              file=sys.stderr)
    return blocks


class TextBatches:
    """Endless shuffled passes over the token blocks (re-shuffled each pass, seeded; no cached pass)."""

    def __init__(self, blocks: torch.Tensor, batch_size: int = LM_BATCH_SIZE, *, seed: int, device="cpu"):
        self.blocks = blocks.to(device)
        self.batch_size = min(batch_size, len(blocks))
        self.generator = torch.Generator().manual_seed(int(seed))
        self._order = torch.empty(0, dtype=torch.long)
        self._order_on_device = self._order.to(self.blocks.device)   # the order where the blocks are: no copy a step
        self._pos = 0
        self._fingerprint: str | None = None

    def next(self) -> torch.Tensor:
        """The next batch of token blocks [batch_size, block_size] (long), in this pass's shuffled order; a new pass
        begins when fewer than ``batch_size`` blocks are left."""
        if self._pos + self.batch_size > len(self._order):
            self._order = torch.randperm(len(self.blocks), generator=self.generator)
            self._order_on_device = to_device_async(self._order, self.blocks.device)
            self._pos = 0
        idx = self._order_on_device[self._pos:self._pos + self.batch_size]
        self._pos += self.batch_size
        return self.blocks[idx]

    def fingerprint(self) -> str:
        """SHA-256 of the token blocks (computed once): a resumed run checks that it reads the same tokens."""
        if self._fingerprint is None:
            import hashlib

            h = hashlib.sha256(f"{tuple(self.blocks.shape)}".encode())
            for chunk in self.blocks.split(4096):
                h.update(chunk.to("cpu", torch.int64).contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def state_dict(self) -> dict:
        """Where the stream stands (shuffle generator, this pass's order and position), for ``--resume``, and the
        fingerprint of the tokens it reads."""
        return {"generator": self.generator.get_state(), "order": self._order.clone(), "pos": self._pos,
                "n_blocks": len(self.blocks), "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict):
        """Continue the stream where ``state_dict`` left it; ValueError for a corpus with another block count or other
        tokens."""
        if int(state["n_blocks"]) != len(self.blocks):
            raise ValueError(f"the run's LM corpus had {state['n_blocks']} blocks, this one has {len(self.blocks)} (the "
                             f"corpus text or the tokenizer changed since the run started, or the run predates blank "
                             f"lines giving no tokens)")
        if state.get("fingerprint") not in (None, self.fingerprint()):  # states written before it was recorded: None
            raise ValueError("the run's LM corpus had other tokens than this one (the corpus text or the tokenizer "
                             "changed since the run started)")
        self.generator.set_state(state["generator"])
        self._order, self._pos = state["order"].clone(), int(state["pos"])
        self._order_on_device = self._order.to(self.blocks.device)


# ---- the loss term ----------------------------------------------------------------------------------------------

def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Causal-LM cross-entropy of ``logits`` [B, L, V] for ``input_ids`` [B, L] (next-token, mean over the B*(L-1)
    predictions, in fp32), as ``GPT2LMHeadModel(labels=ids)``."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))


def lm_loss(backbone, input_ids: torch.Tensor) -> torch.Tensor:
    """``next_token_loss`` of the backbone's LM head."""
    return next_token_loss(backbone.lm_logits(input_ids), input_ids)


class LMCotraining:
    """The ``--joint`` term: the DT backbone's next-token loss on the next text batch, weighted by ``weight(step)``."""

    def __init__(self, batches: TextBatches, const: float = 1.0, linear_decay: bool = False,
                 total_steps: int | None = None):
        self.batches, self.const, self.linear_decay = batches, float(const), linear_decay
        self.total_steps = max(int(total_steps or 1), 1)

    def weight(self, step: int) -> float:
        """w_s = const, or const * (1 - (s - 1) / S_total) with linear decay: s counts from 1 and the decay from 0, so
        the first step has the full weight and the last const / S_total (as the original LM script's trainer)."""
        if not self.linear_decay:
            return self.const
        return self.const * max(0.0, 1.0 - (step - 1) / self.total_steps)

    def loss(self, model) -> torch.Tensor:
        """Unweighted next-token loss of ``model.transformer`` on the next text batch (a scalar tensor)."""
        return lm_loss(model.transformer, self.batches.next())


def joint_sources(args, lm):
    """(corpus files, tokenizer) of ``--joint``: a GPT-2-family text LM given as a whole, its corpus found under
    ``--data_path`` and its tokenizer loaded; checked before the RL data is loaded, and again when the term is built."""
    if lm is None or args.pretrained_block is not None:
        raise UserError("--joint needs --pretrained_lm (the LM is co-trained on text)")
    if lm.model_type != "gpt2":
        raise UserError(f"--joint needs a GPT-2-family text LM; {args.pretrained_lm} is {lm.model_type}")
    files = find_text_corpus(args.nlp_dataset_name, args.nlp_dataset_config_name, args.data_path)
    if not getattr(args, "no_token_cache", False):   # (written once the corpus is tokenised)
        from decision_transformer.files import refuse_files_above

        # a file in its place is a mistake to say at once; a folder that cannot be written only goes without the
        # cache (cached_tokenize_corpus warns)
        refuse_files_above(Path(args.data_path) / "token_cache", "--joint's token cache (--no_token_cache: none)",
                           writable=False)
    return files, load_tokenizer(lm.path, args.tokenizer_name)


def build_lm_cotraining(args, model, lm, device) -> LMCotraining:
    """From the ``lm_cotraining`` flags: find the corpus and tokenizer, tokenise, batch."""
    files, tokenizer = joint_sources(args, lm)
    block = min(MAX_BLOCK_SIZE, lm.n_positions, getattr(tokenizer, "model_max_length", MAX_BLOCK_SIZE) or 10**9)
    cache = None if getattr(args, "no_token_cache", False) else Path(args.data_path) / "token_cache"
    blocks = cached_tokenize_corpus(files, tokenizer, block, model.transformer.wte.num_embeddings, cache)
    print(f"joint LM training: {len(blocks)} blocks of {block} tokens from {', '.join(map(str, files))}",
          file=sys.stderr)
    return LMCotraining(TextBatches(blocks, seed=args.seed, device=device), const=args.gpt_lm_const,
                        linear_decay=args.lm_const_linear_decay,
                        total_steps=args.max_iters * args.num_steps_per_iter)


# ---- mixed precision (--fp16 of the LM script) ------------------------------------------------------------------

class AmpTrainer(Trainer):
    """fp16 autocast + GradScaler (CUDA) around the Trainer's loss, auxiliary losses (LM co-training) included.
    Unlike the originals, gradients are unscaled and clipped, and ``init_reg`` is applied, as on the fp32 path."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # fp16 needs CUDA; elsewhere both are disabled and a step is exactly the fp32 step
        self.amp = self.device_type == "cuda"
        if self.amp:
            self.amp_dtype = torch.float16        # the model forward inside the Trainer's loss, too
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)

    def extra_state(self) -> dict:
        """``Trainer.extra_state`` plus the GradScaler's state."""
        return {**super().extra_state(), "grad_scaler": self.scaler.state_dict()}

    def load_extra_state(self, state: dict):
        """``Trainer.load_extra_state``, then the GradScaler's state where one was saved."""
        super().load_extra_state(state)
        if state.get("grad_scaler"):  # empty when the run trained without CUDA (scaler disabled)
            self.scaler.load_state_dict(state["grad_scaler"])

    def train_step(self) -> torch.Tensor:
        """``Trainer.train_step`` under fp16 autocast with a GradScaler (on CUDA; elsewhere the fp32 step): scaled
        backward, unscale, clip, step. Returns the total loss and keeps the action MSE in ``last_action_error``."""
        if not self.module.training:   # (as Trainer.train_step)
            self.model.train()
        mark_step(self.compile_mode)
        batch = self.dataset.sample_batch(self.batch_size, self.K, self.generator)
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
            loss, total = self._loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.unscale_(self.optimizer)
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        self.last_action_error = loss.detach()
        return total.detach()
