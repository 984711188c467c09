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

from rosetta.config import RNNConfig
from rosetta.data.tokenizer import PAD_ID
from rosetta.model.interface import DecoderState, EncoderOutput, Seq2Seq
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


class DecoderRNN(nn.Module):
    """The decoder's stacked LSTM/GRU, stepped one position at a time.

    Its parameters have ``nn.LSTM``/``nn.GRU``'s names, shapes and initialisation
    (``weight_ih_l0``, ... ; gates i, f, g, o and r, z, n), so checkpoints and the
    maths match those modules (a test holds the step equal to them), but the step
    is written out: the decoder must interleave attention between steps, and
    training computes the previous words' share of the first layer's gates for all
    steps in one product (``input_gates``) instead of a small one per step.
    """

    def __init__(self, input_size: int, hidden: int, layers: int, lstm: bool, dropout: float):
        super().__init__()
        self.lstm, self.layers, self.hidden, self.dropout = lstm, layers, hidden, dropout
        gates = (4 if lstm else 3) * hidden
        bound = hidden**-0.5
        for layer in range(layers):
            inputs = input_size if layer == 0 else hidden
            for name, shape in (
                (f"weight_ih_l{layer}", (gates, inputs)),
                (f"weight_hh_l{layer}", (gates, hidden)),
                (f"bias_ih_l{layer}", (gates,)),
                (f"bias_hh_l{layer}", (gates,)),
            ):
                self.register_parameter(
                    name, nn.Parameter(torch.empty(shape).uniform_(-bound, bound))
                )

    def input_gates(self, embedded: torch.Tensor, word_size: int) -> torch.Tensor:
        """The previous words' share of the first layer's gates, W_ih[:, :d] y plus the
        input bias (and, for the LSTM, the recurrent bias): for one step (batch,
        d_model) or, in training, every step at once (batch, tgt_len, d_model)."""
        weight = self.weight_ih_l0[:, :word_size]
        bias = self.bias_ih_l0
        if self.lstm:  # the GRU keeps its recurrent bias inside the reset gate
            bias = bias + self.bias_hh_l0
        return torch.nn.functional.linear(embedded, weight, bias)

    def step_weights(self, word_size: int) -> list[dict[str, torch.Tensor]]:
        """Per layer, the parameters as ``step`` multiplies by them. Taken once per
        unrolled sequence, not per step: each slice costs a full-size gradient buffer
        in the backward pass."""
        weights = []
        for layer in range(self.layers):
            w_ih = getattr(self, f"weight_ih_l{layer}")
            w_hh = getattr(self, f"weight_hh_l{layer}")
            b_ih, b_hh = getattr(self, f"bias_ih_l{layer}"), getattr(self, f"bias_hh_l{layer}")
            if layer == 0:  # the previous word's share is in ``input_gates``
                entry = {"input_t": w_ih[:, word_size:].t()}
            else:
                entry = {"input_t": w_ih.t(), "input_bias": b_ih + b_hh if self.lstm else b_ih}
            entry["hidden_t"] = w_hh.t()
            if not self.lstm:
                entry["hidden_bias"] = b_hh
            weights.append(entry)
        return weights

    def step(
        self,
        word_gates: torch.Tensor,
        extra: torch.Tensor | None,
        tensors: dict[str, torch.Tensor],
        weights: list[dict[str, torch.Tensor]],
    ) -> torch.Tensor:
        """One step of the stack: layer 0 reads the previous word (``word_gates``) and
        ``extra`` (the context or the fed-back attentional vector), each layer above
        reads the one below. Updates ``tensors`` (``hidden``, and ``cell`` for the
        LSTM, each (batch, layers, hidden)); returns the top layer's output."""
        hiddens = tensors["hidden"].unbind(1)
        cells = tensors["cell"].unbind(1) if self.lstm else None
        new_hiddens, new_cells = [], []
        output = None
        for layer, (hidden, w) in enumerate(zip(hiddens, weights)):
            size = hidden.size(1)
            if layer == 0:
                gates_x = word_gates
                if extra is not None:
                    gates_x = torch.addmm(gates_x, extra, w["input_t"])
            else:  # nn.LSTM's dropout between layers
                below = nn.functional.dropout(output, self.dropout, self.training)
                gates_x = torch.addmm(w["input_bias"], below, w["input_t"])
            if self.lstm:  # gates i, f, g, o
                gates = torch.addmm(gates_x, hidden, w["hidden_t"])
                in_forget, candidate, out = gates.split([2 * size, size, size], 1)
                in_gate, forget = torch.sigmoid(in_forget).chunk(2, 1)
                cell = forget * cells[layer] + in_gate * torch.tanh(candidate)
                output = torch.sigmoid(out) * torch.tanh(cell)
                new_cells.append(cell)
            else:  # gates r, z, n; the reset gate scales W_hn h + b_hn
                gates_h = torch.addmm(w["hidden_bias"], hidden, w["hidden_t"])
                x_rz, x_n = gates_x.split([2 * size, size], 1)
                h_rz, h_n = gates_h.split([2 * size, size], 1)
                reset, update = torch.sigmoid(x_rz + h_rz).chunk(2, 1)
                candidate = torch.tanh(x_n + reset * h_n)
                output = candidate + update * (hidden - candidate)
            new_hiddens.append(output)
        tensors["hidden"] = torch.stack(new_hiddens, 1)
        if self.lstm:
            tensors["cell"] = torch.stack(new_cells, 1)
        return output


class RNNSeq2Seq(Seq2Seq):
    """Bidirectional RNN encoder, attentional RNN decoder."""

    def __init__(self, cfg: RNNConfig, src_vocab_size: int, tgt_vocab_size: int) -> None:
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
        self.decoder = DecoderRNN(decoder_input, hidden, layers, self.lstm, cfg.dropout)
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
        self,
        embedded: torch.Tensor,
        word_gates: torch.Tensor,
        state: DecoderState,
        cell_weights: list[dict[str, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoder step: embedded y_{i-1} (batch, d_model) and its gate share
        (``_input_gates``) -> readout (batch, d_model) and attention weights
        (batch, src_len); advances ``state``."""
        t, s = state.tensors, state.sources
        if self.bahdanau:
            context, weights = attend(
                self.attention,
                t["hidden"][:, -1],
                s["memory"],
                s["keys"],
                s["memory_mask"],
                state.group,
            )
            output = self.decoder.step(word_gates, context, t, cell_weights)
        else:
            output = self.decoder.step(word_gates, t.get("feed"), t, cell_weights)
            context, weights = attend(
                self.attention, output, s["memory"], s["keys"], s["memory_mask"], state.group
            )
        readout = torch.tanh(self.readout(torch.cat([output, context, embedded], dim=-1)))
        if "feed" in t:
            t["feed"] = readout
        state.step += 1
        return self.dropout(readout), weights

    def decode_step(self, tokens: torch.Tensor, state: DecoderState) -> torch.Tensor:
        """tokens (batch,) -> logits (batch, tgt_vocab)."""
        embedded = self.dropout(self.tgt_embed(tokens))
        gates = self.decoder.input_gates(embedded, self.cfg.d_model)
        readout, _ = self._step(embedded, gates, state, self.decoder.step_weights(self.cfg.d_model))
        return self.output(readout)

    # ---- training path -------------------------------------------------------------
    def _unroll(self, src: torch.Tensor, tgt_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced unrolling: readouts (batch, tgt_len, d_model) and attention
        weights (batch, tgt_len, src_len)."""
        state = self.init_state(self.encode(src))
        embedded = self.dropout(self.tgt_embed(tgt_in))
        word_gates = self.decoder.input_gates(embedded, self.cfg.d_model)
        cell_weights = self.decoder.step_weights(self.cfg.d_model)
        readouts, weights = [], []
        # unbind, not [:, i]: its backward stacks the step gradients once instead of
        # filling a zero tensor of the whole sequence's size per step
        for word, gates in zip(embedded.unbind(1), word_gates.unbind(1)):
            readout, alpha = self._step(word, gates, state, cell_weights)
            readouts.append(readout)
            weights.append(alpha)
        return torch.stack(readouts, dim=1), torch.stack(weights, dim=1)

    def hidden_states(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """The readouts tanh(W_o [s_i; c_i; y_{i-1}]) (batch, tgt_len, d_model)."""
        return self._unroll(src, tgt_in)[0]

    def scheduled_states(
        self, src: torch.Tensor, tgt_in: torch.Tensor, rate: float, sample: bool = False
    ) -> torch.Tensor:
        """Scheduled sampling in its classic per-step form (Bengio et al. 2015): at each
        step after the first, each sentence reads, with probability ``rate``, the word
        the decoder itself predicted at the step before (its most probable, or one
        drawn with ``sample``; no gradient flows through the choice) instead of the
        gold one. Readouts (batch, tgt_len, d_model)."""
        state = self.init_state(self.encode(src))
        gold = self.dropout(self.tgt_embed(tgt_in))
        gold_gates = self.decoder.input_gates(gold, self.cfg.d_model)
        cell_weights = self.decoder.step_weights(self.cfg.d_model)
        swaps = torch.rand(tgt_in.shape, device=tgt_in.device) < rate
        swaps &= tgt_in.ne(PAD_ID)
        swaps[:, 0] = False  # <bos> stays
        readouts = []
        for step, (word, gates) in enumerate(zip(gold.unbind(1), gold_gates.unbind(1))):
            swap = swaps[:, step]
            if readouts and bool(swap.any()):
                with torch.no_grad():
                    logits = self.output(readouts[-1]).float()
                    own = (
                        torch.multinomial(logits.softmax(-1), 1).squeeze(1)
                        if sample
                        else logits.argmax(-1)
                    )
                embedded = self.dropout(self.tgt_embed(own))
                own_gates = self.decoder.input_gates(embedded, self.cfg.d_model)
                word = torch.where(swap[:, None], embedded, word)
                gates = torch.where(swap[:, None], own_gates, gates)
            readout, _ = self._step(word, gates, state, cell_weights)
            readouts.append(readout)
        return torch.stack(readouts, dim=1)

    @torch.no_grad()
    def attention_maps(
        self, src: torch.Tensor, tgt_in: torch.Tensor
    ) -> dict[str, list[torch.Tensor]]:
        """The alignment matrix α as one layer with one head: ``cross`` holds
        [(batch, 1, tgt_len, src_len)]; an RNN has no self-attention."""
        _, weights = self._unroll(src, tgt_in)
        return {"encoder_self": [], "decoder_self": [], "cross": [weights[:, None]]}
