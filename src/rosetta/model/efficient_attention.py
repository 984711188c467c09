"""Self-attention for long inputs: local, linear, low-rank, sparse with global
positions and LSH (SPEC §3).

Full attention costs O(n²·d) in the length n. Each variant here is one
subclass of ``SelfAttention`` that overrides the attention product
(``attend``) and, for the decoder, the one-step form (``new_cache``,
``step``); the projections, heads and everything around them are the same
code as full attention, so a variant reaches training, cached decoding, beam
search and attention maps alike. ``self_attention`` picks one from the
configuration (``model.encoder_attention`` / ``model.decoder_attention``).

=============  ============  ===========================  ======================
variant        time          memory                       decoding step
=============  ============  ===========================  ======================
full           O(n²·d)       O(n²) scores (SDPA: blocks)  O(t·d), cache grows
local (r)      O(n·r·d)      O(n·r)                       O(r·d), ring of r + 1
linear         O(n·d²)       O(n·d + d²)                  O(d²), fixed d×d state
lowrank (k)    O(n·k·d)      O(n·k)                       (encoder only)
sparse (r, g)  O(n·(r+g)·d)  O(n·(r+g))                   O((r+g)·d), g + ring
lsh (c, h)     O(h·n·c·d)    O(h·n·c)                     (encoder only)
=============  ============  ===========================  ======================

Why written here rather than with ``torch.nn.attention.flex_attention``: in
the pinned PyTorch (2.13) flex attention has no backward pass on CPU, and its
eager forward materialises the n×n scores; compiled, its CPU forward is fast
but needs a C++ compiler and ~20 s of compilation per shape. The few lines
below run on any device, eager, forward and backward (figures:
``benchmarks/results/attention_cost.md``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rosetta.config import AttentionConfig, TransformerConfig
from rosetta.model.attention import SelfAttention, attention

MIN_BLOCK = 32  # local attention: query positions per block, at least
LINEAR_CHUNK = 64  # causal linear attention: positions per chunk of the training form
EPS = 1e-6  # linear attention: keeps the normaliser away from zero


def self_attention(cfg: TransformerConfig, variant: AttentionConfig, module: str) -> SelfAttention:
    """The self-attention module a stack's configuration asks for; ``module`` names it
    (its head count: ``TransformerConfig.heads_at``)."""
    args = (cfg.d_model, cfg.heads_at(module), cfg.attention_dropout, cfg.d_model // cfg.heads)
    if variant.variant == "local":
        return LocalSelfAttention(*args, radius=variant.radius)
    if variant.variant == "linear":
        return LinearSelfAttention(
            *args, feature_map=variant.feature_map, features=variant.features
        )
    if variant.variant == "lowrank":
        return LowRankSelfAttention(*args, rank=variant.rank, max_length=cfg.max_positions)
    if variant.variant == "sparse":
        return SparseSelfAttention(*args, radius=variant.radius, globals_=variant.global_tokens)
    if variant.variant == "lsh":
        return LSHSelfAttention(
            *args,
            bucket_size=variant.bucket_size,
            hashes=variant.hashes,
            max_length=cfg.max_positions,
        )
    return SelfAttention(*args)


def _step_qkv(module: SelfAttention, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One position's queries, keys and values, x (batch, d_model) -> 3 x (batch,
    heads, head_dim), from the fused projection."""
    return module.qkv_proj(x).view(x.size(0), 3, module.heads, module.head_dim).unbind(1)


def _keep(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The boolean key mask (batch, 1, 1, len) of the encoder as (batch, len)."""
    return None if mask is None else mask[:, 0, 0, :]


# ---- local (sliding-window) attention ----------------------------------------------------


def band(queries: torch.Tensor, keys: torch.Tensor, radius: int, causal: bool) -> torch.Tensor:
    """(len(queries), len(keys)) booleans: key position within ``radius`` of the query
    position (causal: at most ``radius`` before it, never after)."""
    offset = queries[:, None] - keys[None, :]
    if causal:
        return (offset >= 0) & (offset <= radius)
    return offset.abs() <= radius


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    radius: int,
    keep: torch.Tensor | None = None,
    causal: bool = False,
    dropout: float = 0.0,
    need_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each position attends to the positions within ``radius`` of it, in O(n·r).

    q, k, v: (batch, heads, n, head_dim); ``keep`` (batch, n) is True on real
    tokens. The sequence is cut into blocks of ``block`` queries; a block's keys
    are a window of ``block + 2r`` positions around it (``block + r`` before and
    up to it, causal), an overlapping view of k and v (``unfold``), and the band
    mask within the window is the same for every block. A padded query also
    sees itself, so that no row of the softmax is empty.

    With ``need_weights`` or a sequence that one window covers, a band mask over
    the n×n scores gives the same result at no greater cost.
    """
    batch, heads, n, head_dim = q.shape
    block = max(radius, MIN_BLOCK)
    before, after = radius, (0 if causal else radius)
    positions = torch.arange(n, device=q.device)
    if need_weights or n <= block + before + after:
        allowed = band(positions, positions, radius, causal)  # (n, n)
        if keep is not None:
            itself = torch.eye(n, dtype=torch.bool, device=q.device)
            allowed = allowed & (keep[:, None, None, :] | itself)  # (batch, 1, n, n)
        return attention(q, k, v, allowed, False, dropout, need_weights)

    blocks = -(-n // block)
    tail = blocks * block - n  # positions added to fill the last block
    window = block + before + after

    def windows(t: torch.Tensor) -> torch.Tensor:
        # (batch, heads, n, head_dim) -> (batch, heads, blocks, window, head_dim), a view
        padded = F.pad(t, (0, 0, before, tail + after))
        return padded.unfold(2, window, block).transpose(-1, -2)

    # (batch, heads, n, head_dim) -> (batch, heads, blocks, block, head_dim)
    q_blocks = F.pad(q, (0, 0, 0, tail)).view(batch, heads, blocks, block, head_dim)
    query_pos = torch.arange(block, device=q.device)
    key_pos = torch.arange(window, device=q.device) - before  # relative to the block start
    allowed = band(query_pos, key_pos, radius, causal)  # (block, window)
    real = torch.ones(batch, n, dtype=torch.bool, device=q.device) if keep is None else keep
    # (batch, blocks, window): the key is a real token (not padding, not outside)
    real = F.pad(real, (before, tail + after), value=False).unfold(1, window, block)
    itself = query_pos[:, None] == key_pos[None, :]
    allowed = allowed & (real[:, None, :, None, :] | itself)  # (batch, 1, blocks, block, window)
    context = F.scaled_dot_product_attention(q_blocks, windows(k), windows(v), allowed, dropout)
    # (batch, heads, blocks, block, head_dim) -> (batch, heads, n, head_dim)
    return context.reshape(batch, heads, blocks * block, head_dim)[:, :, :n], None


class WindowCache:
    """The keys and values of the last ``size`` positions, in a ring buffer
    (batch, heads, size, head_dim): a step overwrites the oldest position, so
    memory and time per step stay fixed however long the output grows. The
    order of keys does not matter to attention (positions are in the vectors)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.length = 0  # positions seen
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.starts: torch.Tensor | None = None  # (batch,) the position each row began at

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Adds one position, k and v (batch, heads, head_dim); returns the window's
        keys and values (batch, heads, min(length, size), head_dim)."""
        if self.keys is None:
            shape = (k.size(0), k.size(1), self.size, k.size(2))
            self.keys, self.values = k.new_zeros(shape), v.new_zeros(shape)
        elif torch.is_grad_enabled():  # writing in place would change what autograd saved
            self.keys, self.values = self.keys.clone(), self.values.clone()
        slot = self.length % self.size
        self.keys[:, :, slot] = k
        self.values[:, :, slot] = v
        self.length += 1
        used = min(self.length, self.size)
        return self.keys[:, :, :used], self.values[:, :, :used]

    def select_rows(self, index: torch.Tensor) -> WindowCache:
        """Keeps batch rows ``index`` (in that order, repeats allowed), in place."""
        if self.keys is not None:
            self.keys = self.keys.index_select(0, index)
            self.values = self.values.index_select(0, index)
        if self.starts is not None:
            self.starts = self.starts.index_select(0, index)
            if int(self.starts.max()) <= self.length - self.size:  # every window full
                self.starts = None
        return self

    def join(self, other: WindowCache, rows: int) -> WindowCache:
        """Adds ``rows`` rows with no positions yet (sentences joining the search):
        zeros, masked (``mask``) until the row has written them."""
        if other.length:
            raise ValueError("only rows with no positions yet can join a cache")
        if self.keys is None:
            return self
        starts = self.starts
        if starts is None:
            starts = torch.zeros(self.keys.size(0), dtype=torch.long, device=self.keys.device)
        self.starts = torch.cat([starts, starts.new_full((rows,), self.length)])
        shape = (rows, *self.keys.shape[1:])
        self.keys = torch.cat([self.keys, self.keys.new_zeros(shape)])
        self.values = torch.cat([self.values, self.values.new_zeros(shape)])
        return self

    def mask(self) -> torch.Tensor | None:
        """The additive mask (batch, 1, 1, slots in use) hiding the slots a row has not
        written itself (-inf), or None when every row began at the first position."""
        if self.starts is None:
            return None
        used = min(self.length, self.size)
        slot = torch.arange(used, device=self.starts.device)
        written = slot + (self.length - 1 - slot) // self.size * self.size  # last write
        mask = torch.zeros((len(self.starts), used), dtype=self.keys.dtype,
                           device=self.keys.device)  # fmt: skip
        mask.masked_fill_(written[None, :] < self.starts[:, None], float("-inf"))
        return mask[:, None, None, :]


class LocalSelfAttention(SelfAttention):
    """Sliding-window attention: a position sees ``radius`` positions on each side
    (bidirectional, the encoder) or the ``radius`` before it (causal, the decoder)."""

    def __init__(
        self,
        d_model: int,
        heads: int,
        dropout: float = 0.0,
        head_dim: int | None = None,
        radius: int = 16,
    ) -> None:
        super().__init__(d_model, heads, dropout, head_dim)
        self.radius = radius

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        dropout = self.dropout if self.training else 0.0
        return local_attention(q, k, v, self.radius, _keep(mask), causal, dropout, need_weights)

    def new_cache(self) -> WindowCache:
        return WindowCache(self.radius + 1)  # the radius before, and the position itself

    def step(self, x: torch.Tensor, cache: WindowCache) -> torch.Tensor:
        batch = x.size(0)
        q, k, v = _step_qkv(self, x)
        keys, values = cache.append(k, v)
        # (batch, heads, 1, head_dim); the mask: rows that began later
        context, _ = attention(q[:, :, None], keys, values, cache.mask())
        return self.out_proj(context.view(batch, self.inner))


# ---- linear (kernelised) attention -------------------------------------------------------


def orthogonal_features(count: int, dim: int, generator: torch.Generator | None = None):
    """Performer's random projection (count, dim): blocks of orthogonal rows, each
    row scaled to the norm of a Gaussian vector (Choromanski et al. 2021)."""
    rows = []
    for _ in range(-(-count // dim)):
        square = torch.randn(dim, dim, generator=generator)
        orthogonal, _ = torch.linalg.qr(square)
        rows.append(orthogonal.T)
    norms = torch.randn(count, dim, generator=generator).norm(dim=1, keepdim=True)
    return torch.cat(rows)[:count] * norms


class LinearSelfAttention(SelfAttention):
    """Kernelised attention (Katharopoulos et al. 2020): softmax(q·k) is replaced by
    φ(q)·φ(k), so that Σ_j φ(k_j) v_jᵀ is summed once and shared by every query.

    ``feature_map`` ``elu`` is φ(x) = elu(x) + 1; ``favor`` is Performer's positive
    random features, φ(x) = exp(w·x' - |x'|²/2) / sqrt(m) with x' = x / d^¼, whose
    products approximate exp(q·k / sqrt(d)) itself. Computed in float32 (the sums
    run over the whole sequence). Attention dropout does not apply: there is no
    weight matrix to drop from.
    """

    def __init__(
        self,
        d_model: int,
        heads: int,
        dropout: float = 0.0,
        head_dim: int | None = None,
        feature_map: str = "elu",
        features: int = 64,
    ) -> None:
        super().__init__(d_model, heads, dropout, head_dim)
        self.feature_map = feature_map
        if feature_map == "favor":
            self.register_buffer("projection", orthogonal_features(features, self.head_dim))

    def features(self, x: torch.Tensor, query: bool = False) -> torch.Tensor:
        """φ(x): (..., head_dim) -> (..., features), float32 and positive."""
        x = x.float()
        if self.feature_map == "elu":
            return F.elu(x) + 1.0
        x = x * self.head_dim**-0.25
        logits = x @ self.projection.T - x.pow(2).sum(-1, keepdim=True) / 2
        if query:  # a per-query constant cancels in the normalisation: keeps exp in range
            logits = logits - logits.amax(-1, keepdim=True).detach()
        return logits.exp() * self.projection.size(0) ** -0.5

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        fq, fk, values = self.features(q, query=True), self.features(k), v.float()
        keep = _keep(mask)
        if keep is not None:
            fk = fk * keep[:, None, :, None]  # padded keys add nothing to the sums
        weights = None
        if need_weights:  # the n×n weights the sums stand for, for attention maps only
            scores = fq @ fk.transpose(-1, -2)  # (batch, heads, n, n)
            if causal:
                scores = scores.tril()
            weights = scores / (scores.sum(-1, keepdim=True) + EPS)
        if causal:
            context = causal_linear_attention(fq, fk, values)
        else:
            summed = fk.transpose(-1, -2) @ values  # (batch, heads, features, head_dim)
            normaliser = fq @ fk.sum(2).unsqueeze(-1)  # (batch, heads, n, 1)
            context = (fq @ summed) / (normaliser + EPS)
        return context.to(q.dtype), weights

    def new_cache(self) -> LinearState:
        return LinearState()

    def step(self, x: torch.Tensor, cache: LinearState) -> torch.Tensor:
        batch = x.size(0)
        q, k, v = _step_qkv(self, x)
        summed, key_sum = cache.add(self.features(k), v.float())
        fq = self.features(q, query=True)  # (batch, heads, features)
        numerator = (fq.unsqueeze(2) @ summed).squeeze(2)  # (batch, heads, head_dim)
        normaliser = (fq * key_sum).sum(-1, keepdim=True)
        context = (numerator / (normaliser + EPS)).to(x.dtype)
        return self.out_proj(context.view(batch, self.inner))


def causal_linear_attention(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """out_i = Σ_{j<=i} (φq_i·φk_j) v_j / Σ_{j<=i} φq_i·φk_j, in O(n·(c + m)·d).

    fq, fk: (batch, heads, n, m); v: (batch, heads, n, d). Chunks of c positions:
    within a chunk, the c×c products under a causal mask; across chunks, the
    running sums Σ φk_j v_jᵀ (m×d) and Σ φk_j of the chunks before, by a cumulative
    sum over chunks. The memory is O(n·c + (n/c)·m·d), never n×m×d.
    """
    batch, heads, n, _ = fq.shape
    d = v.size(-1)
    chunk = min(LINEAR_CHUNK, n)
    chunks = -(-n // chunk)
    tail = chunks * chunk - n
    # (batch, heads, n, x) -> (batch, heads, chunks, chunk, x); added positions are zero
    fq, fk, v = (
        F.pad(t, (0, 0, 0, tail)).view(batch, heads, chunks, chunk, -1) for t in (fq, fk, v)
    )
    within = (fq @ fk.transpose(-1, -2)).tril()  # (batch, heads, chunks, chunk, chunk)
    numerator = within @ v
    normaliser = within.sum(-1, keepdim=True)
    # the sums of every chunk before: exclusive cumulative sums over the chunk axis
    summed = F.pad((fk.transpose(-1, -2) @ v).cumsum(2), (0, 0, 0, 0, 1, -1))  # (..., m, d)
    key_sum = F.pad(fk.sum(3).cumsum(2), (0, 0, 1, -1))  # (batch, heads, chunks, m)
    numerator = numerator + fq @ summed
    normaliser = normaliser + fq @ key_sum.unsqueeze(-1)
    out = numerator / (normaliser + EPS)
    return out.view(batch, heads, chunks * chunk, d)[:, :, :n]


class LinearState:
    """Causal linear attention's whole memory of the past: Σ φ(k_j) v_jᵀ (batch,
    heads, features, head_dim) and Σ φ(k_j) (batch, heads, features), fixed in size."""

    def __init__(self) -> None:
        self.summed: torch.Tensor | None = None
        self.key_sum: torch.Tensor | None = None

    def add(self, fk: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Adds one position, φ(k) (batch, heads, features) and v (batch, heads,
        head_dim); returns the sums including it."""
        outer = fk.unsqueeze(-1) * v.unsqueeze(-2)  # (batch, heads, features, head_dim)
        if self.summed is None:
            self.summed, self.key_sum = outer, fk
        else:
            self.summed, self.key_sum = self.summed + outer, self.key_sum + fk
        return self.summed, self.key_sum

    def select_rows(self, index: torch.Tensor) -> LinearState:
        """Keeps batch rows ``index`` (in that order, repeats allowed), in place."""
        if self.summed is not None:
            self.summed = self.summed.index_select(0, index)
            self.key_sum = self.key_sum.index_select(0, index)
        return self

    def join(self, other: LinearState, rows: int) -> LinearState:
        """Adds ``rows`` rows with no positions yet (sentences joining the search):
        zero sums, which is what no past is."""
        if other.summed is not None:
            raise ValueError("only rows with no positions yet can join a state")
        if self.summed is not None:
            self.summed, self.key_sum = (
                torch.cat([t, t.new_zeros(rows, *t.shape[1:])]) for t in (self.summed, self.key_sum)
            )
        return self


# ---- low-rank (Linformer) attention ------------------------------------------------------


class LowRankSelfAttention(SelfAttention):
    """Linformer (Wang et al. 2020): keys and values are projected along the length
    by learned E, F (rank, max_length) to ``rank`` rows, and every query attends
    to those: O(n·k·d). One E and one F per layer, shared by the heads (the
    paper's headwise sharing); a shorter input uses the first n columns.

    Non-causal (a projected row mixes every position), so for the encoder only;
    inputs longer than ``max_length`` (``model.max_positions``) are an error. The
    attention maps are the effective weights on the source positions, A·F, which
    need not be positive.
    """

    def __init__(
        self,
        d_model: int,
        heads: int,
        dropout: float = 0.0,
        head_dim: int | None = None,
        rank: int = 64,
        max_length: int = 1024,
    ) -> None:
        super().__init__(d_model, heads, dropout, head_dim)
        self.max_length = max_length
        bound = math.sqrt(6.0 / (rank + max_length))  # Xavier, as the other projections
        self.key_length_proj = nn.Parameter(torch.empty(rank, max_length).uniform_(-bound, bound))
        self.value_length_proj = nn.Parameter(torch.empty(rank, max_length).uniform_(-bound, bound))

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = k.size(2)
        if causal:
            raise ValueError("low-rank (Linformer) attention is not causal: encoder only")
        if n > self.max_length:
            raise ValueError(
                f"low-rank (Linformer) attention holds at most {self.max_length} positions "
                f"(model.max_positions); this input has {n}"
            )
        keep = _keep(mask)
        if keep is not None:  # padded positions add nothing to the projected rows
            k, v = (t.masked_fill(~keep[:, None, :, None], 0.0) for t in (k, v))
        key_proj, value_proj = self.key_length_proj[:, :n], self.value_length_proj[:, :n]
        # (rank, n) @ (batch, heads, n, head_dim) -> (batch, heads, rank, head_dim)
        k_low, v_low = key_proj.to(k.dtype) @ k, value_proj.to(v.dtype) @ v
        dropout = self.dropout if self.training else 0.0
        context, weights = attention(q, k_low, v_low, None, False, dropout, need_weights)
        if weights is not None:
            weights = weights @ value_proj  # (batch, heads, n, rank) -> (batch, heads, n, n)
        return context, weights

    def new_cache(self) -> None:
        raise ValueError("low-rank (Linformer) attention is not causal: encoder only")


# ---- sparse attention with global tokens (Longformer, BigBird) -----------------------------


def sparse_allowed(n: int, radius: int, globals_: int, causal: bool, device=None) -> torch.Tensor:
    """(n, n) booleans of sparse attention: the band of ``radius``, every position
    sees the first ``globals_`` positions and (not causal) is seen by them; causal:
    never a later position."""
    positions = torch.arange(n, device=device)
    allowed = band(positions, positions, radius, causal)
    allowed = allowed | (positions[None, :] < globals_)
    if causal:
        return allowed & (positions[None, :] <= positions[:, None])
    return allowed | (positions[:, None] < globals_)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    radius: int,
    globals_: int,
    keep: torch.Tensor | None = None,
    causal: bool = False,
    dropout: float = 0.0,
    need_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A window of ``radius`` plus ``globals_`` global positions (the first ones) in
    O(n·(r + g)): every position also sees the global ones, and (not causal) they
    see every position.

    Blocks of queries as ``local_attention``: a block's keys are its window (the
    global positions in it masked out there) and the global positions, so no key
    is counted twice; the global queries' rows are then attention over all n keys,
    O(g·n). Causal, a global position only sees those before it, which are global
    too: the blocks give every row. With ``need_weights`` or a sequence one
    window covers, a mask over the n×n scores gives the same result."""
    batch, heads, n, head_dim = q.shape
    globals_ = min(globals_, n)
    block = max(radius, MIN_BLOCK)
    before, after = radius, (0 if causal else radius)
    if need_weights or n <= block + before + after:
        allowed = sparse_allowed(n, radius, globals_, causal, q.device)
        if keep is not None:
            itself = torch.eye(n, dtype=torch.bool, device=q.device)
            allowed = allowed & (keep[:, None, None, :] | itself)
        return attention(q, k, v, allowed, False, dropout, need_weights)

    blocks = -(-n // block)
    tail = blocks * block - n
    window = block + before + after
    real = torch.ones(batch, n, dtype=torch.bool, device=q.device) if keep is None else keep

    def windows(t: torch.Tensor) -> torch.Tensor:
        padded = F.pad(t, (0, 0, before, tail + after))
        return padded.unfold(2, window, block).transpose(-1, -2)

    def with_globals(t: torch.Tensor) -> torch.Tensor:
        # (batch, heads, blocks, window + g, head_dim): each block's window, then the globals
        shared = t[:, :, None, :globals_].expand(-1, -1, blocks, -1, -1)
        return torch.cat([windows(t), shared], dim=3)

    q_blocks = F.pad(q, (0, 0, 0, tail)).view(batch, heads, blocks, block, head_dim)
    starts = torch.arange(blocks, device=q.device)[:, None] * block
    query_pos = (starts + torch.arange(block, device=q.device))[:, :, None]  # (blocks, block, 1)
    key_pos = starts + torch.arange(window, device=q.device) - before  # (blocks, window)
    in_band = band(torch.arange(block), torch.arange(window) - before, radius, causal)
    in_band = in_band.to(q.device) & (key_pos[:, None, :] >= globals_)  # globals come apart
    window_real = F.pad(real, (before, tail + after), value=False).unfold(1, window, block)
    itself = query_pos == key_pos[:, None, :]  # (blocks, block, window)
    allowed_window = in_band & (window_real[:, :, None, :] | itself)
    global_pos = torch.arange(globals_, device=q.device)
    allowed_global = real[:, None, None, :globals_] | (query_pos == global_pos)
    if causal:
        allowed_global = allowed_global & (global_pos <= query_pos)
    allowed_global = allowed_global.expand(batch, blocks, block, globals_)
    allowed = torch.cat([allowed_window.expand(batch, -1, -1, -1), allowed_global], dim=3)
    context = F.scaled_dot_product_attention(
        q_blocks, with_globals(k), with_globals(v), allowed[:, None], dropout
    )
    context = context.reshape(batch, heads, blocks * block, head_dim)[:, :, :n]
    if causal or not globals_:
        return context, None
    # the global positions see every (real) position
    itself = global_pos[:, None] == torch.arange(n, device=q.device)
    seen = (real[:, None, None, :] | itself).expand(batch, 1, globals_, n)
    rows, _ = attention(q[:, :, :globals_], k, v, seen, False, dropout)
    return torch.cat([rows, context[:, :, globals_:]], dim=2), None


class SparseCache:
    """Causal sparse attention's decoding state: the first ``globals_`` positions of
    each row (batch, heads, globals_, head_dim) and a ``WindowCache`` of the last
    ``radius + 1``. A row's positions count from the step it began at (rows can
    join a search), so its global positions are its own first ones."""

    def __init__(self, radius: int, globals_: int) -> None:
        self.window = WindowCache(radius + 1)
        self.globals_ = globals_
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.starts: torch.Tensor | None = None  # (batch,) the step each row began at

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Adds one position, k and v (batch, heads, head_dim); returns the keys and
        values it attends to: the global slots, then the window's."""
        batch = k.size(0)
        if self.starts is None:
            self.starts = torch.zeros(batch, dtype=torch.long, device=k.device)
        if self.keys is None:
            shape = (batch, k.size(1), self.globals_, k.size(2))
            self.keys, self.values = k.new_zeros(shape), v.new_zeros(shape)
        position = self.window.length - self.starts  # of this step, in each row
        rows = (position >= 0) & (position < self.globals_)
        if bool(rows.any()):
            slot = position.clamp(0, self.globals_ - 1)
            index = torch.arange(batch, device=k.device)
            written = rows[:, None, None]
            self.keys = self.keys.clone() if torch.is_grad_enabled() else self.keys
            self.values = self.values.clone() if torch.is_grad_enabled() else self.values
            self.keys[index, :, slot] = torch.where(written, k, self.keys[index, :, slot])
            self.values[index, :, slot] = torch.where(written, v, self.values[index, :, slot])
        keys, values = self.window.append(k, v)
        return torch.cat([self.keys, keys], dim=2), torch.cat([self.values, values], dim=2)

    def mask(self) -> torch.Tensor:
        """The additive mask (batch, 1, 1, globals_ + window slots): a global slot its
        row has not written yet, a window slot written before the row began, and a
        window slot holding one of the row's global positions (counted there) are
        hidden."""
        length, size = self.window.length, self.window.size
        used = min(length, size)
        slot = torch.arange(used, device=self.starts.device)
        written = slot + (length - 1 - slot) // size * size  # the step each slot holds
        own = written[None, :] - self.starts[:, None]  # its position in each row
        window_seen = own >= self.globals_
        global_seen = (
            torch.arange(self.globals_, device=own.device) < (length - self.starts)[:, None]
        )
        seen = torch.cat([global_seen, window_seen], dim=1)
        mask = torch.zeros(seen.shape, dtype=self.keys.dtype, device=seen.device)
        return mask.masked_fill_(~seen, float("-inf"))[:, None, None, :]

    def select_rows(self, index: torch.Tensor) -> SparseCache:
        """Keeps batch rows ``index`` (in that order, repeats allowed), in place."""
        self.window.select_rows(index)
        if self.keys is not None:
            self.keys, self.values = self.keys[index], self.values[index]
            self.starts = self.starts[index]
        return self

    def join(self, other: SparseCache, rows: int) -> SparseCache:
        """Adds ``rows`` rows with no positions yet (sentences joining the search)."""
        if other.window.length:
            raise ValueError("only rows with no positions yet can join a cache")
        if self.keys is None:
            return self
        self.window.join(other.window, rows)
        self.starts = torch.cat([self.starts, self.starts.new_full((rows,), self.window.length)])
        shape = (rows, *self.keys.shape[1:])
        self.keys = torch.cat([self.keys, self.keys.new_zeros(shape)])
        self.values = torch.cat([self.values, self.values.new_zeros(shape)])
        return self


class SparseSelfAttention(LocalSelfAttention):
    """Sliding-window attention plus global positions (Longformer, Beltagy et al.
    2020; BigBird's window and global parts, Zaheer et al. 2020): a position sees
    ``radius`` positions on each side (causal: the ``radius`` before it) and the
    first ``globals_`` positions, which (not causal) see every position, so
    information travels between any two positions in two layers. Its decoding
    step is local attention's, over a ``SparseCache`` (the globals, then the ring)."""

    def __init__(
        self,
        d_model: int,
        heads: int,
        dropout: float = 0.0,
        head_dim: int | None = None,
        radius: int = 16,
        globals_: int = 1,
    ) -> None:
        super().__init__(d_model, heads, dropout, head_dim, radius)
        self.globals_ = globals_

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        dropout = self.dropout if self.training else 0.0
        return sparse_attention(
            q, k, v, self.radius, self.globals_, _keep(mask), causal, dropout, need_weights
        )

    def new_cache(self) -> SparseCache:
        return SparseCache(self.radius, self.globals_)


# ---- LSH attention (Reformer) ------------------------------------------------------------

SELF_SCORE = -1e5  # LSH: a query's score on itself, kept only when it sees nothing else
MASKED_SCORE = -1e9  # ... on a padded key


class LSHSelfAttention(SelfAttention):
    """Reformer's LSH attention (Kitaev et al. 2020): queries and keys are shared
    (k = q / |q|), hashed into buckets by a random rotation (h(x) = argmax [xR; -xR]),
    and sorted by bucket; the sorted sequence is cut into chunks of ``bucket_size``
    and each chunk attends to itself and the chunk before it (the first chunk: to
    itself), to the keys of its own bucket there, so a query sees the keys that
    hash with it at O(n·c·d).
    ``hashes`` rounds with independent rotations are combined by their softmax
    normalisers. A query does not attend to itself unless nothing else is there
    (with shared QK it would score highest).

    The rotations are a buffer drawn once (saved with the weights), so a model
    translates deterministically; a row's bucket count is its length over
    ``bucket_size`` made even, or one bucket where it fits in one chunk (full
    attention), so the padding of a batch changes nothing.
    Not causal: which chunk a position falls in depends on the hashes of
    positions after it, so no decoding step can reproduce the training
    pass; encoder only. The ``k`` projection is not used (shared QK).
    """

    def __init__(
        self,
        d_model: int,
        heads: int,
        dropout: float = 0.0,
        head_dim: int | None = None,
        bucket_size: int = 32,
        hashes: int = 2,
        max_length: int = 1024,
    ) -> None:
        super().__init__(d_model, heads, dropout, head_dim)
        self.bucket_size, self.hashes = bucket_size, hashes
        half = max(1, -(-max_length // bucket_size) // 2)
        generator = torch.Generator().manual_seed(0)
        rotations = torch.randn(hashes, self.head_dim, half, generator=generator)
        self.register_buffer("rotations", rotations)

    def buckets(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, heads, n, head_dim) -> (batch, heads, hashes, n) bucket of each
        position in each round. A row of L real positions (``lengths``; default n)
        has L / bucket_size buckets made even, or one where L fits in a chunk: its
        own length, never the batch's padding, decides."""
        batch, heads, n, _ = x.shape
        if lengths is None:
            lengths = torch.full((batch,), n, device=x.device)
        chunks = -(-lengths // self.bucket_size)  # (batch,)
        half = (chunks // 2).clamp(1, self.rotations.size(-1))  # rotations per row
        widest = int(half.max())
        if int(chunks.max()) <= 1:
            return torch.zeros(batch, heads, self.hashes, n, dtype=torch.long, device=x.device)
        rotations = self.rotations[..., :widest].float()
        rotated = torch.einsum("bhnd,rdk->bhrnk", x.float(), rotations)
        unused = (torch.arange(widest, device=x.device) >= half[:, None])[:, None, None, None]
        # argmax over [xR; -xR] without forming it: the largest entry, or the smallest
        mixed = bool(unused.any())  # rows with fewer buckets than the widest
        high, above = (rotated.masked_fill(unused, float("-inf")) if mixed else rotated).max(-1)
        low, below = (rotated.masked_fill(unused, float("inf")) if mixed else rotated).min(-1)
        buckets = torch.where(high >= -low, above, below + half[:, None, None, None])
        return buckets.masked_fill((chunks <= 1)[:, None, None, None], 0)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if causal:
            raise ValueError(
                "LSH attention is not causal (its chunks depend on later positions): encoder only"
            )
        batch, heads, n, head_dim = q.shape
        keys = F.normalize(q.float(), dim=-1)  # shared QK
        keep = _keep(mask)
        size = min(self.bucket_size, n)
        chunks = -(-n // size)
        tail = chunks * size - n
        # sort each round's positions by (bucket, position); padding goes last
        buckets = self.buckets(q, None if keep is None else keep.sum(1))
        if keep is not None:
            buckets = buckets.masked_fill(~keep[:, None, None, :], buckets.max() + 1)
        positions = torch.arange(n, device=q.device)
        order = (buckets * n + positions).argsort(dim=-1)  # (batch, heads, hashes, n)
        order = F.pad(order, (0, tail), value=n)  # added positions: index n, a blank key
        # rows of (batch * heads * n, x) in each round's sorted order; positions added to
        # fill the last chunk read position 0 and are hidden as keys
        row_start = torch.arange(batch * heads, device=q.device).view(batch, heads, 1, 1) * n
        rows = (order.clamp(max=n - 1) + row_start).flatten()

        def sorted_chunks(t: torch.Tensor) -> torch.Tensor:
            # (batch, heads, n, x) -> (batch, heads, hashes, chunks, size, x) in sorted order
            picked = t.reshape(batch * heads * n, -1).index_select(0, rows)
            return picked.view(batch, heads, self.hashes, chunks, size, -1)

        def look_back(t: torch.Tensor, before_first: float) -> torch.Tensor:
            # each chunk, then the one before it (the first: a chunk of ``before_first``,
            # not Reformer's last chunk, whose content would depend on the padding)
            both = t.new_empty(*t.shape[:4], 2 * size, t.size(-1))
            both[..., :size, :] = t
            both[:, :, :, 1:, size:, :] = t[:, :, :, :-1]
            both[:, :, :, 0, size:, :] = before_first
            return both

        sq = sorted_chunks(q.float() * head_dim**-0.5)
        sk, sv = look_back(sorted_chunks(keys), 0.0), look_back(sorted_chunks(v.float()), 0.0)
        query_pos = order.view(batch, heads, self.hashes, chunks, size)
        key_pos = look_back(query_pos[..., None], n).squeeze(-1)  # n: no key
        sorted_buckets = F.pad(buckets, (0, 1), value=-1).gather(3, order).view(query_pos.shape)
        key_buckets = look_back(sorted_buckets[..., None], -1).squeeze(-1)
        real = torch.ones(batch, n + 1, dtype=torch.bool, device=q.device)
        real[:, n] = False
        if keep is not None:
            real[:, :n] = keep
        key_real = real.gather(1, key_pos.flatten(1)).view(key_pos.shape)
        hidden = sorted_buckets[..., :, None] != key_buckets[..., None, :]  # another bucket
        hidden |= ~key_real[..., None, :]
        # (..., chunks, size, 2 size); a query's own key is the diagonal of its chunk's part
        scores = (sq @ sk.transpose(-1, -2)).masked_fill_(hidden, MASKED_SCORE)
        scores[..., :size].diagonal(dim1=-2, dim2=-1).fill_(SELF_SCORE)
        # the softmax and its normaliser in one pass: log Z = s_top - log w_top exactly
        top, best = scores.max(-1, keepdim=True)
        weights = scores.softmax(-1)
        normaliser = top - weights.gather(-1, best).log()
        if self.training and self.dropout:
            weights = F.dropout(weights, self.dropout)
        out = weights @ sv  # (batch, heads, hashes, chunks, size, head_dim)
        # back to the original order, then the rounds weighted by their normalisers
        flat = query_pos.flatten(3)  # (batch, heads, hashes, chunks * size)
        unsorted = out.new_zeros(batch, heads, self.hashes, n + 1, head_dim)
        unsorted.scatter_(3, flat[..., None].expand(-1, -1, -1, -1, head_dim), out.flatten(3, 4))
        lse = out.new_full((batch, heads, self.hashes, n + 1), float("-inf"))
        lse.scatter_(3, flat, normaliser.flatten(3))
        share = lse[..., :n].softmax(dim=2)  # (batch, heads, hashes, n)
        context = (unsorted[..., :n, :] * share[..., None]).sum(2)
        dense = None
        if need_weights:  # the n×n weights the rounds add up to, for attention maps
            dense = weights.new_zeros(batch, heads, self.hashes, n + 1, n + 1)
            # (batch, heads, hashes, chunks * size, 2 size): each query's keys, flat n+1 x n+1
            cells = flat[..., None] * (n + 1) + key_pos.repeat_interleave(size, dim=3)
            dense.view(batch, heads, self.hashes, -1).scatter_add_(
                3, cells.flatten(3), weights.flatten(3)
            )
            dense = (dense[..., :n, :n] * share[..., None]).sum(2).to(q.dtype)
        return context.to(q.dtype), dense

    def new_cache(self) -> None:
        raise ValueError(
            "LSH attention is not causal (its chunks depend on later positions): encoder only"
        )
