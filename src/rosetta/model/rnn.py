"""RNN encoder-decoder with attention (SPEC §3; Bahdanau et al., 2015; Luong et al., 2015).

* Encoder: embeddings -> bidirectional LSTM/GRU; each direction gets half of
  ``hidden_size``, so the annotations h_j have ``hidden_size`` features.
* Bridge: the decoder's initial state is tanh(W [h_fwd_final; h_bwd_final]) of
  the encoder's top layer, one learned map per decoder layer (and one for the
  LSTM cell).
* Additive (Bahdanau) attention: e_ij = vᵀ tanh(W s_{i-1} + U h_j), α_i =
  softmax_j(e_ij) with padding masked, c_i = Σ_j α_ij h_j. The previous state
  s_{i-1} asks the question; the context joins the previous word as the RNN
  input; the next word is predicted from tanh(W_o [s_i; c_i; y_{i-1}]).
* Luong ``dot``/``general`` attention is the cheaper option: the new state s_i
  queries the annotations after the RNN step, and with ``input_feeding`` the
  previous attentional vector is fed back into the next step's input.

The model implements the incremental interface of ``rosetta.model.interface``
(``encode``/``init_state``/``decode_step``), so every search works unchanged.
``U h_j`` is computed once per sentence in ``init_state``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rosetta.config import ModelConfig
from rosetta.data.tokenizer import PAD_ID
from rosetta.model.interface import DecoderState, EncoderOutput
from rosetta.model.linear import Linear


class AdditiveAttention(nn.Module):
    """Bahdanau attention: e_ij = vᵀ tanh(W s + U h_j)."""

    def __init__(self, query_size: int, memory_size: int, attention_size: int) -> None:
        super().__init__()
        self.query_proj = Linear(query_size, attention_size, bias=False)  # W
        self.memory_proj = Linear(memory_size, attention_size)  # U
        self.v = Linear(attention_size, 1, bias=False)

    def precompute(self, memory: torch.Tensor) -> torch.Tensor:
        """U h_j for every source position, once per sentence: (sources, src_len, attn)."""
        return self.memory_proj(memory)

    def scores(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        # (sources, 1, src_len, attn) + (sources, group, 1, attn) -> (sources, group, src_len)
        return self.v(torch.tanh(keys[:, None] + self.query_proj(query)[:, :, None])).squeeze(-1)


class MultiplicativeAttention(nn.Module):
    """Luong attention: ``dot`` e_ij = sᵀ h_j, or ``general`` e_ij = sᵀ W_a h_j."""

    def __init__(self, query_size: int, memory_size: int, general: bool) -> None:
        super().__init__()
        if not general and query_size != memory_size:
            raise ValueError("dot attention needs equal decoder and encoder sizes")
        self.memory_proj = Linear(memory_size, query_size, bias=False) if general else None

    def precompute(self, memory: torch.Tensor) -> torch.Tensor:
        return self.memory_proj(memory) if self.memory_proj is not None else memory

    def scores(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        # (sources, group, size) @ (sources, size, src_len) -> (sources, group, src_len)
        return torch.bmm(query, keys.transpose(1, 2))


def attend(
    attention: nn.Module,
    query: torch.Tensor,
    memory: torch.Tensor,
    keys: torch.Tensor,
    mask: torch.Tensor,
    group: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over real source positions and the weighted sum of annotations.

    query (sources * group, q), a source's ``group`` queries (its beam) in
    consecutive rows; memory (sources, src_len, m) and keys, one copy per source;
    mask (sources, src_len), True on real tokens. Returns context
    (sources * group, m) and weights α (sources * group, src_len).
    """
    grouped = query.reshape(-1, group, query.size(-1))  # (sources, group, q)
    scores = attention.scores(grouped, keys).masked_fill(~mask[:, None], float("-inf"))
    weights = scores.softmax(dim=-1)  # (sources, group, src_len)
    context = torch.bmm(weights, memory)  # (sources, group, m)
    return context.view(query.size(0), -1), weights.view(query.size(0), -1)


class RNNSeq2Seq(nn.Module):
    """Bidirectional RNN encoder, attentional RNN decoder."""

    def __init__(self, cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.src_vocab_size, self.tgt_vocab_size = src_vocab_size, tgt_vocab_size
        size, hidden = cfg.d_model, cfg.hidden_size
        self.lstm = cfg.rnn_cell == "lstm"
        rnn = nn.LSTM if self.lstm else nn.GRU
        self.tgt_embed = nn.Embedding(tgt_vocab_size, size, padding_idx=PAD_ID)
        share = cfg.tie_all and src_vocab_size == tgt_vocab_size
        self.src_embed = (
            self.tgt_embed if share else nn.Embedding(src_vocab_size, size, padding_idx=PAD_ID)
        )
        self.dropout = nn.Dropout(cfg.dropout)
        self.encoder = rnn(
            size,
            hidden // 2,
            num_layers=cfg.encoder_layers,
            batch_first=True,
            bidirectional=True,
            dropout=cfg.dropout if cfg.encoder_layers > 1 else 0.0,
        )
        layers = cfg.decoder_layers
        self.bridge = Linear(hidden, layers * hidden)
        self.cell_bridge = Linear(hidden, layers * hidden) if self.lstm else None
        self.bahdanau = cfg.attention == "bahdanau"
        if self.bahdanau:
            self.attention: nn.Module = AdditiveAttention(hidden, hidden, hidden)
            decoder_input = size + hidden  # previous word and context
        else:
            self.attention = MultiplicativeAttention(hidden, hidden, cfg.attention == "general")
            decoder_input = size + (size if cfg.input_feeding else 0)
        self.decoder = rnn(
            decoder_input,
            hidden,
            num_layers=layers,
            batch_first=True,
            dropout=cfg.dropout if layers > 1 else 0.0,
        )
        # readout: tanh(W_o [s_i; c_i; y_{i-1}]) has the embedding size so the
        # output projection can share the target embedding
        self.readout = Linear(hidden + hidden + size, size)
        self.output = Linear(size, tgt_vocab_size, bias=False)
        if cfg.tie_output:
            self.output.weight = self.tgt_embed.weight

    # ---- incremental interface -----------------------------------------------------
    def encode(self, src: torch.Tensor) -> EncoderOutput:
        """src (batch, src_len) -> annotations (batch, src_len, hidden_size)."""
        pad_mask = src.eq(PAD_ID)
        lengths = (~pad_mask).sum(dim=1)
        embedded = self.dropout(self.src_embed(src))
        packed = pack_padded_sequence(
            embedded, lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        outputs, final = self.encoder(packed)
        memory, _ = pad_packed_sequence(outputs, batch_first=True, total_length=src.size(1))
        return EncoderOutput(memory=self.dropout(memory), pad_mask=pad_mask, final_state=final)

    def _initial_state(self, final: torch.Tensor, bridge: nn.Linear) -> torch.Tensor:
        # final: (layers * 2, batch, hidden / 2) -> top layer, both directions (batch, hidden)
        top = torch.cat([final[-2], final[-1]], dim=-1)
        batch = top.size(0)
        # (batch, decoder_layers, hidden): batch first, so DecoderState.select works
        return torch.tanh(bridge(top)).view(batch, self.cfg.decoder_layers, -1)

    def init_state(self, encoder_output: EncoderOutput) -> DecoderState:
        """The bridged initial decoder state and U h_j, computed once."""
        final = encoder_output.final_state
        memory = encoder_output.memory
        sources = {
            "memory": memory,
            "keys": self.attention.precompute(memory),
            "memory_mask": ~encoder_output.pad_mask,
        }
        tensors = {"hidden": self._initial_state(final[0] if self.lstm else final, self.bridge)}
        if self.lstm:
            tensors["cell"] = self._initial_state(final[1], self.cell_bridge)
        if not self.bahdanau and self.cfg.input_feeding:
            tensors["feed"] = memory.new_zeros(memory.size(0), self.cfg.d_model)
        return DecoderState(tensors=tensors, sources=sources)

    def _step(
        self, embedded: torch.Tensor, state: DecoderState
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoder step: embedded y_{i-1} (batch, d_model) -> readout (batch, d_model)
        and attention weights (batch, src_len); advances ``state``."""
        t, s = state.tensors, state.sources
        # the RNN wants (layers, batch, hidden); the state keeps batch first
        hidden = t["hidden"].transpose(0, 1).contiguous()
        recurrent = (hidden, t["cell"].transpose(0, 1).contiguous()) if self.lstm else hidden
        if self.bahdanau:
            context, weights = attend(
                self.attention,
                t["hidden"][:, -1],
                s["memory"],
                s["keys"],
                s["memory_mask"],
                state.group,
            )
            rnn_input = torch.cat([embedded, context], dim=-1)
            output, recurrent = self.decoder(rnn_input[:, None], recurrent)
            output = output[:, 0]
        else:
            feed = [t["feed"]] if "feed" in t else []
            rnn_input = torch.cat([embedded, *feed], dim=-1)
            output, recurrent = self.decoder(rnn_input[:, None], recurrent)
            output = output[:, 0]
            context, weights = attend(
                self.attention, output, s["memory"], s["keys"], s["memory_mask"], state.group
            )
        readout = torch.tanh(self.readout(torch.cat([output, context, embedded], dim=-1)))
        if self.lstm:
            t["hidden"], t["cell"] = (r.transpose(0, 1) for r in recurrent)
        else:
            t["hidden"] = recurrent.transpose(0, 1)
        if "feed" in t:
            t["feed"] = readout
        state.step += 1
        return self.dropout(readout), weights

    def decode_step(self, tokens: torch.Tensor, state: DecoderState) -> torch.Tensor:
        """tokens (batch,) -> logits (batch, tgt_vocab)."""
        readout, _ = self._step(self.dropout(self.tgt_embed(tokens)), state)
        return self.output(readout)

    # ---- training path -------------------------------------------------------------
    def _unroll(self, src: torch.Tensor, tgt_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced unrolling: readouts (batch, tgt_len, d_model) and attention
        weights (batch, tgt_len, src_len)."""
        state = self.init_state(self.encode(src))
        embedded = self.dropout(self.tgt_embed(tgt_in))
        readouts, weights = [], []
        for i in range(tgt_in.size(1)):
            readout, alpha = self._step(embedded[:, i], state)
            readouts.append(readout)
            weights.append(alpha)
        return torch.stack(readouts, dim=1), torch.stack(weights, dim=1)

    def forward(
        self, src: torch.Tensor, tgt_in: torch.Tensor, label_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (batch, tgt_len, vocab), or (tokens, vocab) for ``label_mask`` positions."""
        readouts, _ = self._unroll(src, tgt_in)
        if label_mask is not None:
            readouts = readouts[label_mask]
        return self.output(readouts)

    @torch.no_grad()
    def attention_maps(
        self, src: torch.Tensor, tgt_in: torch.Tensor
    ) -> dict[str, list[torch.Tensor]]:
        """The alignment matrix α as one layer with one head: ``cross`` holds
        [(batch, 1, tgt_len, src_len)]; an RNN has no self-attention."""
        _, weights = self._unroll(src, tgt_in)
        return {"encoder_self": [], "decoder_self": [], "cross": [weights[:, None]]}
