"""The RNN encoder-decoder: attention as a distribution, cached = full decoding,
the shared search, and learning the toy task."""

from __future__ import annotations

import pytest
import torch

from conftest import learning_config
from rosetta.config import model_config
from rosetta.data.prepare import prepare
from rosetta.data.tokenizer import BOS_ID, PAD_ID
from rosetta.decode import beam_search, greedy_search
from rosetta.decode.common import Lengths
from rosetta.decode.translator import Translator
from rosetta.evaluate.metrics import bleu
from rosetta.model import build_model
from rosetta.model.interface import DecoderState
from rosetta.model.rnn import AdditiveAttention, attend
from rosetta.train.trainer import train

VOCAB = 30


def rnn_model(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    options = dict(arch="rnn", d_model=16, hidden_size=24, dropout=0.0)
    return build_model(model_config({**options, **overrides}), VOCAB, VOCAB).eval()


def batch():
    generator = torch.Generator().manual_seed(0)
    src = torch.randint(4, VOCAB, (3, 7), generator=generator)
    src[0, 4:] = PAD_ID
    tgt = torch.randint(4, VOCAB, (3, 6), generator=generator)
    tgt[:, 0] = BOS_ID
    return src, tgt


VARIANTS = [
    dict(rnn_cell="lstm", attention="bahdanau"),
    dict(rnn_cell="gru", attention="bahdanau", encoder_layers=2, decoder_layers=2),
    dict(rnn_cell="lstm", attention="general", input_feeding=True),
    dict(rnn_cell="gru", attention="dot", hidden_size=16, input_feeding=False),
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decoding_equals_full_recomputation(variant):
    model = rnn_model(**variant)
    src, tgt = batch()
    full = model(src, tgt)
    state = model.init_state(model.encode(src))
    for t in range(tgt.size(1)):
        torch.testing.assert_close(
            model.decode_step(tgt[:, t], state), full[:, t], atol=1e-5, rtol=1e-4
        )


@pytest.mark.parametrize("variant", VARIANTS)
def test_written_out_decoder_cell_equals_torch_rnn(variant):
    """``DecoderRNN.step`` is ``nn.LSTM``/``nn.GRU`` written out: loaded with its
    parameters, that module gives the same outputs and final state over a sequence."""
    model = rnn_model(**variant)
    decoder, layers = model.decoder, model.cfg.decoder_layers
    input_size, hidden_size = decoder.weight_ih_l0.size(1), decoder.hidden
    rnn = (torch.nn.LSTM if model.lstm else torch.nn.GRU)(
        input_size, hidden_size, num_layers=layers, batch_first=True
    )
    rnn.load_state_dict(decoder.state_dict())  # the same names and shapes
    generator = torch.Generator().manual_seed(2)
    inputs = torch.randn(3, 5, input_size, generator=generator)
    hidden = torch.randn(layers, 3, hidden_size, generator=generator)
    cell = torch.randn(layers, 3, hidden_size, generator=generator)
    initial = (hidden, cell) if model.lstm else hidden
    expected, final = rnn(inputs, initial)
    state = DecoderState(tensors={"hidden": hidden.transpose(0, 1)})
    if model.lstm:
        state.tensors["cell"] = cell.transpose(0, 1)
    size, weights = model.cfg.d_model, decoder.step_weights(model.cfg.d_model)
    for t in range(inputs.size(1)):
        words, extra = inputs[:, t, :size], inputs[:, t, size:]
        extra = extra if extra.numel() else None
        output = decoder.step(decoder.input_gates(words, size), extra, state.tensors, weights)
        torch.testing.assert_close(output, expected[:, t])
    final_hidden = final[0] if model.lstm else final
    torch.testing.assert_close(state.tensors["hidden"], final_hidden.transpose(0, 1))
    if model.lstm:
        torch.testing.assert_close(state.tensors["cell"], final[1].transpose(0, 1))


@pytest.mark.parametrize("variant", VARIANTS)
def test_alignment_is_a_distribution_over_real_source_positions(variant):
    model = rnn_model(**variant)
    src, tgt = batch()
    alpha = model.attention_maps(src, tgt)["cross"][0]
    assert alpha.shape == (3, 1, 6, 7)  # (batch, heads, tgt_len, src_len)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(3, 1, 6))
    assert torch.all(alpha[0, :, :, 4:] == 0)


def test_additive_attention_by_hand():
    attention = AdditiveAttention(query_size=1, memory_size=1, attention_size=1)
    with torch.no_grad():
        attention.query_proj.weight.fill_(1.0)  # W
        attention.memory_proj.weight.fill_(1.0)  # U
        attention.memory_proj.bias.zero_()
        attention.v.weight.fill_(2.0)  # v
    memory = torch.tensor([[[1.0], [2.0], [-1.0]]])  # h_j
    query = torch.tensor([[0.5]])  # s_{i-1}
    mask = torch.tensor([[True, True, False]])
    context, weights = attend(attention, query, memory, attention.precompute(memory), mask)
    scores = torch.tensor([2 * torch.tanh(torch.tensor(1.5)), 2 * torch.tanh(torch.tensor(2.5))])
    expected = torch.cat([scores.softmax(0), torch.zeros(1)])
    torch.testing.assert_close(weights[0], expected)
    torch.testing.assert_close(context[0, 0], expected[0] * 1.0 + expected[1] * 2.0)


def test_shared_search_works_unchanged():
    model = rnn_model(rnn_cell="gru")
    with torch.no_grad():  # sharper distributions: no float-noise ties between tokens
        model.output.weight.mul_(4.0)
    src, _ = batch()
    greedy = [h.tokens for h in greedy_search(model, src, lengths=Lengths(b=8))]
    assert [
        h[0].tokens for h in beam_search(model, src, beam=1, alpha=0.0, lengths=Lengths(b=8))
    ] == greedy
    alone = [
        greedy_search(model, src[i : i + 1, : int(src[i].ne(PAD_ID).sum())], lengths=Lengths(b=8))
        for i in range(3)
    ]
    assert [a[0].tokens for a in alone] == greedy


@pytest.mark.parametrize("variant", VARIANTS)
def test_beam_search_does_not_depend_on_the_rest_of_the_batch(variant):
    """A source's beam attends to its own single copy of the memory."""
    model = rnn_model(seed=1, **variant)
    with torch.no_grad():
        model.output.weight.mul_(4.0)
    src, _ = batch()
    together = beam_search(model, src, beam=3, nbest=3, lengths=Lengths(b=8))
    for i in range(3):
        alone = beam_search(
            model,
            src[i : i + 1, : int(src[i].ne(PAD_ID).sum())],
            beam=3,
            nbest=3,
            lengths=Lengths(b=8),
        )[0]
        assert [h.tokens for h in alone] == [h.tokens for h in together[i]]
        for a, t in zip(alone, together[i]):
            assert a.score == pytest.approx(t.score, abs=1e-4)


def test_rnn_preset():
    cfg = model_config({"preset": "rnn_small"})
    assert (cfg.arch, cfg.rnn_cell, cfg.attention, cfg.hidden_size) == (
        "rnn",
        "lstm",
        "bahdanau",
        512,
    )


@pytest.mark.slow
def test_rnn_learns_the_toy_task(tmp_path):
    config = learning_config(
        tmp_path / "exp",
        arch="rnn",
        d_model=64,
        hidden_size=128,
        encoder_layers=1,
        decoder_layers=1,
        dropout=0.1,
    )
    prepare(config, log=lambda _: None)
    model_dir = train(config, log=lambda _: None)
    corpus = tmp_path / "exp" / "corpus"
    sources = (corpus / "test.en").read_text(encoding="utf-8").splitlines()
    references = (corpus / "test.zeta").read_text(encoding="utf-8").splitlines()
    outputs = [t.text for t in Translator.load(model_dir, beam=4).translate(sources)]
    assert bleu(outputs, references).score > 90


@pytest.mark.parametrize("variant", VARIANTS)
def test_inference_path_equals_the_training_path(variant):
    """Under inference mode the linear layers use their packed / transposed copies
    (``rosetta.model.linear``); the logits must not change."""
    model = rnn_model(**variant)
    src, tgt = batch()
    with torch.inference_mode():
        fast = model(src, tgt)
    torch.testing.assert_close(fast, model(src, tgt), atol=1e-5, rtol=1e-4)
