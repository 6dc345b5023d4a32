"""Language alignment (REID): pull the DT's input embeddings towards k-means centres of the LM's token embeddings.

Centres: cosine k-means over the LM's ``wte`` ([V, H] -> [N, H]), computed once and cached (model.md §11).

Loss forms, with e = ``all_embs`` [B, 3K, H] (every token, padding included) and c the centres [N, H]:

* ``dim`` (default, what the originals' code computes): L = -mean_{i,a,j} max_b e[i,a,j] * c[b,j], a per-dimension
  max over centres. The originals materialise the [B, 3K, N, H] product; since max_b e_j c_bj is e_j * max_b c_bj when
  e_j >= 0 and e_j * min_b c_bj otherwise, we keep only the per-dimension max/min centres: O(B*3K*H), same value and
  same gradient. ``--kmeans_mean``: -mean_{i,a,b,j} e c = -mean_{i,a,j} e[i,a,j] * mean_b c[b,j].
  ``experiment.py``'s trainer L2-normalises e and c along H first; the ``lm_cotraining`` trainer does not.
* ``cosine`` (the paper's description): L = -mean_{i,a} max_b cos(e[i,a], c[b]) (mean over b with ``--kmeans_mean``).

Weight: ``--gpt_kmeans_const`` * anneal(s), anneal(s) = sigmoid(5 - 10 s / S), s the global step from 1, S = 5000
(``experiment.py``) or 15000 (``lm_cotraining``); ``--disable_k_annealing`` sets anneal to 1.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from decision_transformer.errors import UserError
from decision_transformer.files import check_zip_checksums, exclusive

KMEANS_FORMS = ("dim", "cosine")
#: annealing horizon S of each trainer
ANNEAL_STEPS = {"experiment": 5000, "lm_cotraining": 15000}


# ---- centres ----------------------------------------------------------------------------------------------------

def cosine_kmeans(x: torch.Tensor, n_clusters: int, *, seed: int, tol: float = 1e-4, max_iter: int = 300,
                  chunk: int = 8192) -> torch.Tensor:
    """k-means with cosine distance (as ``kmeans_pytorch``'s ``distance='cosine'``): points go to the centre of
    highest cosine similarity, centres are the plain mean of their points; stop when (sum of centre shifts)^2 <
    ``tol``. Seeded initial centres (distinct random points); an empty cluster is re-seeded with a random point.
    x: [V, H] -> centres [N, H] float32 on x's device."""
    x = x.detach().float()
    V = x.shape[0]
    check_clusters(n_clusters, V)
    g = torch.Generator().manual_seed(int(seed))
    xn = F.normalize(x, dim=1)
    centres = x[torch.randperm(V, generator=g)[:n_clusters].to(x.device)].clone()
    for _ in range(max_iter):
        cn = F.normalize(centres, dim=1)
        assign = torch.cat([(xn[i:i + chunk] @ cn.t()).argmax(dim=1) for i in range(0, V, chunk)])   # [V]
        counts = torch.bincount(assign, minlength=n_clusters)
        new = torch.zeros_like(centres).index_add_(0, assign, x) / counts.clamp(min=1).unsqueeze(1).to(x.dtype)
        empty = counts == 0
        if bool(empty.any()):
            n_empty = int(empty.sum())
            new[empty] = x[torch.randint(0, V, (n_empty,), generator=g).to(x.device)]
        shift = (new - centres).norm(dim=1).sum()
        centres = new
        if float(shift) ** 2 < tol:
            break
    return centres


def check_clusters(n_clusters: int, V: int):
    """``--gpt_kmeans`` centres within 1 and the vocabulary size ``V`` (one line otherwise)."""
    if not 1 <= n_clusters <= V:
        raise UserError(f"--gpt_kmeans {n_clusters} must be between 1 and the LM's vocabulary size {V}")


def load_or_compute_centres(wte: torch.Tensor, n_clusters: int, cache: str | None, *, seed: int) -> torch.Tensor:
    """Centres [N, H] of the token embeddings ``wte`` [V, H]: read from ``cache`` when it exists (checked against
    N and H, and against ``wte`` where the file records the token table it was made from), else computed and (if
    ``cache`` is given) saved there with that record, parent folders created, loadable with
    ``torch.load(..., weights_only=True)``. Runs making one cache at once compute it once: the others wait and read
    it (the centres depend on ``seed``, so runs sharing a cache all take the first run's)."""
    if not cache:
        print("warning: no --kmeans_cache given; k-means centres are computed in memory and not saved",
              file=sys.stderr)
        return _cluster(wte, n_clusters, seed)
    check_clusters(n_clusters, wte.shape[0])   # before the cache's folder is made
    path = Path(cache)
    with exclusive(path, "k-means centres"):
        if path.is_file():
            c = read_centres(path, n_clusters, wte.shape[1], wte)
            print(f"k-means: {n_clusters} centres read from {path}", file=sys.stderr)
            return c
        c = _cluster(wte, n_clusters, seed)
        from decision_transformer.checkpoint import atomic_save

        saved = atomic_save({"centres": c, TABLE_KEY: table_fingerprint(wte)}, path)
        print(f"k-means: centres saved to {saved}", file=sys.stderr)
        return c


#: the key of a centre file's record of the token table its centres were made from (``table_fingerprint``)
TABLE_KEY = "token_table"


def table_fingerprint(wte: torch.Tensor) -> str:
    """A digest of a token table's shape and float32 values: the LM a centre file was made from."""
    import hashlib

    t = wte.detach().float().cpu().contiguous()
    return hashlib.sha1(repr(tuple(t.shape)).encode() + t.numpy().tobytes()).hexdigest()[:16]


def _cluster(wte: torch.Tensor, n_clusters: int, seed: int) -> torch.Tensor:
    print(f"k-means: clustering {wte.shape[0]} token embeddings into {n_clusters} centres (cosine) ...",
          file=sys.stderr)
    return cosine_kmeans(wte, n_clusters, seed=seed).cpu().contiguous()


def read_centres(path: Path, n_clusters: int, H: int, wte: torch.Tensor | None = None) -> torch.Tensor:
    """A centre file, checked: a finite [n_clusters, H] float tensor; with ``wte``, made from that token table where
    the file records which (files of this toolkit: ``{"centres", TABLE_KEY}``; a bare tensor, as the originals' caches
    are, records none)."""
    from decision_transformer.checkpoint import torch_load_problem

    check_zip_checksums(path)
    try:
        c = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: not a k-means centre file ({torch_load_problem(e) or type(e).__name__})") from None
    made_from = None
    if isinstance(c, dict) and "centres" in c:
        made_from, c = c.get(TABLE_KEY), c["centres"]
    if not isinstance(c, torch.Tensor) or c.dim() != 2 or not c.is_floating_point():
        raise UserError(f"{path}: expected a [N, H] float tensor of k-means centres")
    if c.shape[1] != H:
        raise UserError(f"{path}: centres have hidden size {c.shape[1]} but the LM's is {H}; "
                        f"delete the file or point --kmeans_cache elsewhere")
    if c.shape[0] != n_clusters:
        raise UserError(f"{path}: holds {c.shape[0]} centres but --gpt_kmeans is {n_clusters}")
    if not torch.isfinite(c).all():
        raise UserError(f"{path}: centres contain NaN or inf")
    if wte is not None and isinstance(made_from, str) and made_from != table_fingerprint(wte):
        raise UserError(f"{path}: centres of another language model (its token table's digest {made_from}, this "
                        f"LM's {table_fingerprint(wte)}); delete the file or point --kmeans_cache elsewhere")
    return c.float()


def centres_fingerprint(centres: torch.Tensor) -> str:
    """A short digest of the centres' float32 values (what ``--resume`` compares)."""
    import hashlib

    return hashlib.sha1(centres.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


# ---- loss -------------------------------------------------------------------------------------------------------

def anneal(step: int, horizon: int) -> float:
    """sigmoid(5 - 10 step / horizon): 0.993 at step 1, 0.5 at horizon / 2, 0.0067 at horizon."""
    return 1.0 / (1.0 + math.exp(-((horizon - step) / (horizon / 10) - 5)))


class KMeansAlignment:
    """The alignment loss for one run; ``loss(all_embs)`` is unweighted, ``weight(step)`` = const * anneal."""

    def __init__(self, centres: torch.Tensor, *, const: float, form: str = "dim", mean: bool = False,
                 normalize: bool = True, anneal_steps: int | None = 5000):
        if form not in KMEANS_FORMS:
            raise UserError(f"unknown --kmeans_form {form!r}; choose one of {', '.join(KMEANS_FORMS)}")
        self.form, self.mean, self.normalize = form, mean, normalize
        self.const, self.anneal_steps = float(const), anneal_steps
        self.fingerprint = centres_fingerprint(centres)   # the centres this run trains with (checked on --resume)
        c = centres.float()
        if form == "cosine":
            self.c = F.normalize(c, dim=1)                              # [N, H]
        else:
            if normalize:
                c = F.normalize(c, dim=1)
            self.c_hi, self.c_lo = c.max(dim=0).values, c.min(dim=0).values   # [H] each
            self.c_mean = c.mean(dim=0)                                        # [H]

    def to(self, device):
        """Move the centre tensors to ``device``; returns self."""
        for name in ("c", "c_hi", "c_lo", "c_mean"):
            if hasattr(self, name):
                setattr(self, name, getattr(self, name).to(device))
        return self

    def weight(self, step: int) -> float:
        """const * anneal(step) (step counted from 1); const alone with annealing disabled."""
        return self.const * (1.0 if self.anneal_steps is None else anneal(step, self.anneal_steps))

    def loss(self, all_embs: torch.Tensor) -> torch.Tensor:
        """all_embs [B, 3K, H] -> scalar (to be minimised), computed in fp32 also inside a bf16 autocast."""
        with torch.autocast(all_embs.device.type, enabled=False):
            return self._loss(all_embs.float())

    def _loss(self, e: torch.Tensor) -> torch.Tensor:
        if self.form == "cosine":
            sim = F.normalize(e, dim=-1) @ self.c.t()                        # [B, 3K, N]
            best = sim.mean(dim=-1) if self.mean else sim.max(dim=-1).values
            return -best.mean()
        if self.normalize:
            e = F.normalize(e, dim=-1)
        if self.mean:
            return -(e * self.c_mean).mean()
        # max_b e_j c_bj without the [B, 3K, N, H] product: the max is at the largest or smallest c_bj
        return -torch.maximum(e * self.c_hi, e * self.c_lo).mean()
