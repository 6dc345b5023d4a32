"""A GPT-2 backbone for Decision Transformers, with transformers-compatible parameter names and layout.

Differences from ``transformers.GPT2Model`` that the Decision Transformer needs (as in the originals'
``trajectory_gpt2.py``): the learned position table ``wpe`` is **not** added to ``inputs_embeds``; blocks can skip
their attention branch (``disable_attention``); the MLP can be a gated GEGLU; every block owns its activation
module (so per-block hooks see per-block activations); attention probabilities can be returned. Two additions
for LM-initialised models: ImageGPT's RMS-style norm (``norm_type="imagegpt"``) and per-block architecture
overrides (``block_overrides``, a pretrained block transplanted into a random-init host).

Weights use GPT-2's ``Conv1D`` layout ([in, out]) and names (``h.{i}.attn.c_attn.weight`` ...), so GPT-2
checkpoints, the originals' state dicts and merge code line up.
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

#: Added to attention logits of masked (future or padding) keys; the originals' value.
MASK_VALUE = -1e4


@dataclass
class BackboneConfig:
    """Hyper-parameters of the GPT-2 backbone (GPT-2's field names), checked on construction, per-block
    ``block_overrides`` included."""

    n_embd: int = 128
    n_layer: int = 3
    n_head: int = 1
    n_inner: int | None = None          # None -> 4 * n_embd
    activation_function: str = "relu"
    resid_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    vocab_size: int = 50257             # the unused ``wte`` of the originals, kept for state-dict compatibility
    n_positions: int = 1024             # rows of ``wpe`` (with --extend_positions: at least max_ep_len)
    disable_attention: bool = False
    # ``layernorm``: GPT-2's mean-centring LayerNorm (weight and bias). ``imagegpt``: ImageGPT's RMS-style norm,
    # y = w * x / sqrt(mean(x^2) + eps), weight only (so ImageGPT blocks have no ``ln_*.bias`` tensors).
    norm_type: str = "layernorm"
    # Per-block architecture that differs from the rest: {"<block index>": {field: value}}. Used by
    # --pretrained_block (e.g. GPT-2's 12-head gelu_new block inside a 1-head ReLU host). String keys keep the
    # config JSON- and ``weights_only``-safe.
    block_overrides: dict = field(default_factory=dict)

    #: fields a block override may change (everything that shapes one block and nothing global)
    BLOCK_FIELDS = ("n_head", "n_inner", "activation_function", "resid_pdrop", "attn_pdrop", "layer_norm_epsilon",
                    "norm_type", "disable_attention")

    def __post_init__(self):
        """Sizes positive integers, dropouts in [0, 1), epsilon and init scale finite and positive: a model built
        otherwise fails deep inside torch (n_head 0: a division by zero) or computes NaN (eps NaN)."""
        def whole(v):
            """True for an int that is not a bool."""
            return isinstance(v, int) and not isinstance(v, bool)

        def real(v):
            """True for a finite int or float that is not a bool."""
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("n_embd", "n_layer", "n_head", "vocab_size", "n_positions"):
            v = getattr(self, name)
            if not whole(v) or v < (0 if name == "n_layer" else 1):
                raise ValueError(f"{name} must be a {'non-negative' if name == 'n_layer' else 'positive'} integer, "
                                 f"got {v!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"hidden size {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.n_inner is not None and (not whole(self.n_inner) or self.n_inner < 1):
            raise ValueError(f"n_inner must be a positive integer or None, got {self.n_inner!r}")
        for name in ("resid_pdrop", "attn_pdrop", "embd_pdrop"):
            v = getattr(self, name)
            if not real(v) or not 0 <= v < 1:
                raise ValueError(f"{name} must be a probability in [0, 1), got {v!r}")
        for name in ("layer_norm_epsilon", "initializer_range"):
            v = getattr(self, name)
            if not real(v) or v <= 0:
                raise ValueError(f"{name} must be a finite positive number, got {v!r}")
        if not isinstance(self.activation_function, str):
            raise ValueError(f"activation_function must be a name, got {self.activation_function!r}")
        self.block_overrides = self._checked_overrides()

    def _checked_overrides(self) -> dict:
        """``block_overrides`` keyed by the block's index as a string (an int key becomes one: ``for_block`` looks up
        str(i), so an int key would be ignored, and a saved config reloads with string keys); a key that is no block
        index in 0..n_layer-1, or an override that is no dict of ``BLOCK_FIELDS``, is refused."""
        if not isinstance(self.block_overrides, dict):
            raise ValueError(f"block_overrides must be a dict {{block index: {{field: value}}}}, "
                             f"got {self.block_overrides!r}")
        out = {}
        for k, over in self.block_overrides.items():
            if isinstance(k, bool) or not (isinstance(k, int) or (isinstance(k, str) and k.isascii() and k.isdigit())):
                raise ValueError(f"block_overrides key {k!r} is not a block index (0..{self.n_layer - 1})")
            i = int(k)
            if not 0 <= i < self.n_layer:
                raise ValueError(f"block_overrides key {k!r} is out of range: the backbone has {self.n_layer} blocks "
                                 f"(0..{self.n_layer - 1})")
            if str(i) in out:
                raise ValueError(f"block_overrides names block {i} twice")
            if not isinstance(over, dict):
                raise ValueError(f"block_overrides[{k!r}] must be a dict {{field: value}}, got {over!r}")
            bad = set(over) - set(self.BLOCK_FIELDS)
            if bad:
                raise ValueError(f"block_overrides[{i}] sets {sorted(bad)}; only {self.BLOCK_FIELDS} may differ per "
                                 f"block")
            out[str(i)] = over
        return out

    @property
    def inner_dim(self) -> int:
        """Width of the MLP's hidden layer: ``n_inner``, or 4 * ``n_embd`` when it is None."""
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    def for_block(self, i: int) -> "BackboneConfig":
        """The configuration block ``i`` is built from (this one, with its override applied)."""
        over = self.block_overrides.get(str(i))
        if not over:
            return self
        bad = set(over) - set(self.BLOCK_FIELDS)
        if bad:
            raise ValueError(f"block_overrides[{i}] sets {sorted(bad)}; only {self.BLOCK_FIELDS} may differ per block")
        return replace(self, block_overrides={}, **over)

    def to_dict(self) -> dict:
        """The configuration as a plain dict (``dataclasses.asdict``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BackboneConfig":
        """A configuration from ``to_dict``'s form: unknown keys are dropped, values deep-copied and ``block_overrides``
        keyed by strings."""
        names = {f.name for f in fields(cls)}
        d = {k: copy.deepcopy(v) for k, v in d.items() if k in names}
        if d.get("block_overrides"):
            d["block_overrides"] = {str(k): dict(v) for k, v in d["block_overrides"].items()}
        return cls(**d)


NORM_TYPES = ("layernorm", "imagegpt")


class ImageGPTNorm(nn.Module):
    """ImageGPT's norm: no mean-centring, no bias. y = weight * x / sqrt(mean(x^2) + eps) over the last dim."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x):
        """``x`` [..., H] -> normalised and scaled, same shape."""
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def make_norm(cfg: BackboneConfig) -> nn.Module:
    """The norm ``cfg.norm_type`` names over ``n_embd`` features (``nn.LayerNorm`` or ``ImageGPTNorm``); ValueError for
    another type."""
    if cfg.norm_type == "layernorm":
        return nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
    if cfg.norm_type == "imagegpt":
        return ImageGPTNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
    raise ValueError(f"unknown norm_type {cfg.norm_type!r}; choose one of {NORM_TYPES}")


class Conv1D(nn.Module):
    """GPT-2's linear layer with the weight stored as [in, out]: y = x @ W + b."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x):
        """``x`` [..., nx] -> ``x @ weight + bias`` [..., nf]."""
        size_out = x.shape[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(size_out)


class GEGLU(nn.Module):
    """Gated GELU: the input's two halves (value u, gate g) -> u * GELU(g) (exact erf GELU)."""

    def forward(self, x):
        """``x`` [..., 2D] -> [..., D]."""
        u, g = x.chunk(2, dim=-1)
        return u * F.gelu(g)


class TanhGELU(nn.Module):
    """GPT-2's ``gelu_new``: 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))). Outside autocast it runs transformers'
    sequence of elementwise ops (the originals' numbers bit for bit). Under autocast (the bf16 fast path) it runs
    torch's fused kernel of the same function, equal up to rounding: one kernel forward and one backward, each reading
    and writing the [B, 3K, 4H] activations once, instead of about eight and fifteen kernels whose intermediates CUDA
    autocast keeps in fp32 (``pow`` is on its fp32 list)."""

    def forward(self, x):
        """``x`` [...] -> GELU(x) (tanh approximation), same shape."""
        if torch.is_autocast_enabled(x.device.type):
            return F.gelu(x, approximate="tanh")
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def check_activation(name: str):
    """ValueError unless ``name`` is ``geglu`` or a key of transformers' ``ACT2CLS`` (``relu``, ``gelu_new`` ...)."""
    from transformers.activations import ACT2CLS

    if name != "geglu" and name not in ACT2CLS:
        raise ValueError(f"unknown activation function {name!r}; choose geglu or one of {', '.join(sorted(ACT2CLS))}")


def make_activation(name: str) -> nn.Module:
    """A new activation module by name: ``geglu`` or a key of transformers' ``ACT2CLS`` (``relu``, ``gelu_new`` ...;
    ``gelu_new`` is ``TanhGELU``); ValueError for another name."""
    check_activation(name)
    if name == "geglu":
        return GEGLU()
    if name == "gelu_new":
        return TanhGELU()
    from transformers.activations import ACT2CLS

    cls = ACT2CLS[name]
    return cls[0](**cls[1]) if isinstance(cls, tuple) else cls()


class Attention(nn.Module):
    """Causal multi-head self-attention in GPT-2's layout (fused q/k/v projection ``c_attn``, output ``c_proj``): SDPA,
    or an eager path with the originals' masking when probabilities are asked for or ``eager`` is set."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"hidden size {cfg.n_embd} is not divisible by n_head {cfg.n_head}")
        self.n_head = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.c_attn = Conv1D(3 * cfg.n_embd, cfg.n_embd)
        self.c_proj = Conv1D(cfg.n_embd, cfg.n_embd)
        self.attn_pdrop = cfg.attn_pdrop
        self.attn_dropout = nn.Dropout(cfg.attn_pdrop)
        self.resid_dropout = nn.Dropout(cfg.resid_pdrop)
        self.eager = False  # set by ``eager_attention``

    def forward(self, x, bias, output_attentions: bool = False, tail: int | None = None):
        """``tail``: compute the outputs of the last ``tail`` query positions only ([B, tail, H]; keys and values
        from all positions)."""
        B, T, H = x.shape
        q, k, v = self.c_attn(x).split(H, dim=2)
        if tail is not None:
            q, bias = q[:, -tail:], bias[..., -tail:, :]
        Tq = q.shape[1]
        q = q.view(B, Tq, self.n_head, self.head_dim).transpose(1, 2)                           # [B, nh, Tq, hd]
        k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (k, v))        # [B, nh, T, hd]
        if output_attentions or self.eager:
            # the originals' masking: a future key's logit is replaced by MASK_VALUE (bias there = MASK_VALUE + the
            # padding term), an allowed key's gets the padding term added. Real query rows come out as in the SDPA
            # path below (w + bias everywhere); left-padded query rows, whose allowed keys are all padding, differ
            w = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            causal = torch.ones(Tq, T, dtype=torch.bool, device=w.device).tril(T - Tq)
            w = torch.where(causal, w + bias, bias)
            probs = torch.softmax(w, dim=-1)
            y = self.attn_dropout(probs) @ v
        else:
            probs = None
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                               dropout_p=self.attn_pdrop if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, Tq, H)
        return self.resid_dropout(self.c_proj(y)), probs


class MLP(nn.Module):
    """The block's feed-forward: ``c_fc`` -> activation -> ``c_proj`` -> dropout (``c_fc`` twice as wide for GEGLU)."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        inner = cfg.inner_dim
        gated = cfg.activation_function == "geglu"
        self.c_fc = Conv1D(2 * inner if gated else inner, cfg.n_embd)
        self.act = make_activation(cfg.activation_function)
        self.c_proj = Conv1D(cfg.n_embd, inner)
        self.dropout = nn.Dropout(cfg.resid_pdrop)

    def forward(self, x):
        """``x`` [B, T, H] -> [B, T, H]."""
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN GPT-2 block: h += Attn(LN1(h)); h += MLP(LN2(h))."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.disable_attention = cfg.disable_attention

    def forward(self, h, bias, output_attentions: bool = False, tail: int | None = None):
        """``tail``: the block's outputs at the last ``tail`` positions only, [B, tail, H]."""
        probs = None
        h_in = h
        if tail is not None:
            h = h[:, -tail:]
        if not self.disable_attention:  # the original computed and discarded the branch; skipping it is equivalent
            a, probs = self.attn(self.ln_1(h_in), bias, output_attentions, tail)
            h = h + a
        return h + self.mlp(self.ln_2(h)), probs


@dataclass
class BackboneOutput:
    """What ``GPT2Backbone.forward`` returns: the final hidden state and, when asked for, every block's input (then the
    final state) and attention probabilities."""

    last_hidden_state: torch.Tensor                       # [B, T, H], after ln_f
    hidden_states: tuple[torch.Tensor, ...] | None = None  # input of each block, then ln_f(output)
    attentions: tuple[torch.Tensor, ...] | None = None     # per block [B, n_head, T, T]


@contextmanager
def eager_attention(model: nn.Module):
    """Within the block, every attention layer of ``model`` takes the eager path with the originals' masking, so
    activations at left-padded positions are the originals' too (the analyses read them); outputs at real
    positions are unchanged."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    before = [m.eager for m in layers]
    for m in layers:
        m.eager = True
    try:
        yield model
    finally:
        for m, b in zip(layers, before):
            m.eager = b


def attention_bias(attention_mask: torch.Tensor | None, T: int, device, dtype) -> torch.Tensor:
    """Additive attention bias [B or 1, 1, T, T]: 0 where allowed, MASK_VALUE for future keys and padding keys."""
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    bias = torch.zeros(T, T, device=device, dtype=dtype).masked_fill(~causal, MASK_VALUE)[None, None]
    if attention_mask is not None:
        bias = bias + ((1.0 - attention_mask.to(dtype)) * MASK_VALUE)[:, None, None, :]
    return bias


class GPT2Backbone(nn.Module):
    """``inputs_embeds`` -> dropout -> blocks -> ln_f. ``wte``/``wpe`` exist for compatibility but are not added."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.drop = nn.Dropout(cfg.embd_pdrop)
        self.h = nn.ModuleList([Block(cfg.for_block(i)) for i in range(cfg.n_layer)])
        self.ln_f = make_norm(cfg)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        """GPT-2 initialisation, including the scaled residual projections."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, Conv1D)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, ImageGPTNorm):
            nn.init.ones_(module.weight)
        if isinstance(module, (Attention, MLP)):
            nn.init.normal_(module.c_proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))

    def forward(self, inputs_embeds, attention_mask=None, output_attentions=False, output_hidden_states=False,
                tail: int | None = None):
        """``tail``: only the outputs of the last ``tail`` positions are wanted (``last_hidden_state`` [B, tail, H]);
        the last block then computes those queries, their MLP and ``ln_f`` alone."""
        B, T, _ = inputs_embeds.shape
        bias = attention_bias(attention_mask, T, inputs_embeds.device, inputs_embeds.dtype)
        h = self.drop(inputs_embeds)
        hidden, attns = [], []
        last = len(self.h) - 1
        for i, block in enumerate(self.h):
            if output_hidden_states:
                hidden.append(h)
            h, probs = block(h, bias, output_attentions, tail if i == last else None)
            if output_attentions:
                attns.append(probs)
        if tail is not None and not len(self.h):
            h = h[:, -tail:]
        h = self.ln_f(h)
        if output_hidden_states:
            hidden.append(h)
        return BackboneOutput(h, tuple(hidden) if output_hidden_states else None,
                              tuple(attns) if output_attentions else None)

    def lm_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The language-model path of the LM-initialised DT (the originals' ``use_positional=True``): token ids
        [B, L] -> wte(ids) + wpe(0..L-1) -> blocks -> ln_f -> logits [B, L, V] through the tied head ``wte``."""
        L = input_ids.shape[1]
        if L > self.wpe.num_embeddings:
            raise ValueError(f"sequence of {L} tokens exceeds the {self.wpe.num_embeddings} position embeddings")
        pos = torch.arange(L, device=input_ids.device)
        h = self(self.wte(input_ids) + self.wpe(pos)[None]).last_hidden_state
        return h @ self.wte.weight.t()
