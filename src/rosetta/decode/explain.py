"""What the model did for one sentence: attention, candidate words, the search tree.

Everything here looks at a translation already found and is for people, not for
BLEU: ``rosetta attention`` draws ``attention_weights``, and the service's page
shows all three (``explain``).

- ``attention_weights``: the model run once more, teacher-forced on its own
  output, returning every layer's and head's weights of one kind (the
  Transformer's cross, encoder self and decoder self attention; the RNN's
  alignment α, as ``cross``).
- ``candidates``: at each output position, the k most probable pieces and their
  probabilities under the model (the same teacher-forced pass), so one sees what
  the search chose among.
- ``traced_beam_search``: the beam search the translator runs, with its
  ``BeamTrace`` (every hypothesis kept and pruned, with scores).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rosetta.data.tokenizer import BOS_ID, EOS_ID
from rosetta.decode.beam import BeamTrace, beam_search
from rosetta.decode.common import Hypothesis, Lengths
from rosetta.decode.mask_predict import mask_predict
from rosetta.decode.translator import TorchTranslator, pad_batch

KINDS = ("cross", "encoder_self", "decoder_self")


@dataclass
class Pieces:
    """The tokens a map's rows and columns stand for, as subword pieces.

    ``source``: the source sentence; ``produced``: the piece each decoder step
    produced (the output, then <eos>), the rows of cross and decoder-self
    attention; ``decoder_inputs``: what each step read (<bos>, then the output).
    """

    source: list[str]
    produced: list[str]
    decoder_inputs: list[str]

    @classmethod
    def of(cls, translator: TorchTranslator, src_ids: list[int], output: list[int]) -> Pieces:
        tokenizer = translator.tokenizer
        produced = output if _fills_in(translator) else [*output, EOS_ID]
        return cls(
            tokenizer.source_pieces(src_ids),
            tokenizer.target_pieces(produced),
            tokenizer.target_pieces(decoder_input(translator, src_ids, output)),
        )

    def axes(self, kind: str) -> tuple[list[str], list[str]]:
        """(rows, columns) of an attention map of ``kind``."""
        return {
            "cross": (self.produced, self.source),
            "encoder_self": (self.source, self.source),
            "decoder_self": (self.produced, self.decoder_inputs),
        }[kind]


def _fills_in(translator: TorchTranslator) -> bool:
    return not translator.autoregressive


def decoder_input(translator: TorchTranslator, src_ids: list[int], output: list[int]) -> list[int]:
    """What the decoder read while producing ``output``: <bos> and the output before
    each step (left to right); for a non-autoregressive model, its last pass's
    input (the output with ``<mask>`` where that pass filled in), found by running
    the translator's mask-predict on the sentence again."""
    if not _fills_in(translator):
        return [BOS_ID, *output]
    opts = translator.options
    inputs: list[list[int]] = []
    src = pad_batch([src_ids], translator.device)
    lengths = Lengths.of(opts, translator.max_source_len)
    found = mask_predict(
        translator.model, src, opts.iterations, opts.length_beam, 1, lengths, inputs
    )
    if found[0][0].tokens != list(output):
        raise ValueError("this output is not the model's own translation of the sentence")
    return inputs[0]


def _teacher_forced(
    translator: TorchTranslator, src_ids: list[int], output: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(src, decoder input) of one sentence, batch 1, on the model's device."""
    if len(src_ids) > translator.max_source_len:
        raise ValueError(
            f"the sentence has {len(src_ids)} subwords; the model takes at most "
            f"{translator.max_source_len} in one piece, so what it did cannot be shown"
        )
    device = translator.device
    tgt_in = decoder_input(translator, src_ids, output)
    return pad_batch([src_ids], device), pad_batch([tgt_in], device)


@torch.inference_mode()
def attention_weights(
    translator: TorchTranslator, src_ids: list[int], output: list[int], kinds: tuple[str, ...]
) -> dict[str, np.ndarray]:
    """(layers, heads, rows, columns) float32 weights of each of ``kinds`` the model
    has (rows and columns: ``Pieces.axes``); a kind the model lacks is left out."""
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown:
        raise ValueError(f"unknown attention kind {unknown[0]!r}; choose from {', '.join(KINDS)}")
    src, tgt_in = _teacher_forced(translator, src_ids, output)
    maps = translator.model.attention_maps(src, tgt_in)
    return {
        kind: torch.stack([m[0] for m in maps[kind]]).float().cpu().numpy()
        for kind in kinds
        if maps.get(kind)
    }


@torch.inference_mode()
def candidates(
    translator: TorchTranslator, src_ids: list[int], output: list[int], k: int
) -> list[list[tuple[int, float]]]:
    """For each produced piece (the output, then <eos>), the ``k`` most probable
    (token id, probability) pairs at that step, best first."""
    src, tgt_in = _teacher_forced(translator, src_ids, output)
    probs = translator.model(src, tgt_in)[0].float().softmax(dim=-1)
    values, ids = probs.topk(min(k, probs.size(-1)), dim=-1)
    return [
        list(zip(row_ids, row_values)) for row_ids, row_values in zip(ids.tolist(), values.tolist())
    ]


def traced_beam_search(
    translator: TorchTranslator, src_ids: list[int]
) -> tuple[list[Hypothesis], dict[str, Any]]:
    """The translator's beam search on one sentence, with its tree: the hypotheses
    (exactly those ``translate`` returns) and ``{nodes, chosen}`` as in ``BeamTrace``
    with each token also given as its piece."""
    opts = translator.options
    if opts.sampling or opts.beam == 1 or _fills_in(translator):
        raise ValueError("only beam search (beam > 1, no sampling) has a search tree")
    src, _ = _teacher_forced(translator, src_ids, [])
    trace = BeamTrace()
    lengths = Lengths.of(opts, translator.max_source_len)
    hyps = beam_search(
        translator.model, src, opts.beam, opts.length_penalty, opts.nbest, lengths, trace
    )[0]
    pieces = translator.tokenizer.target_pieces([node["token"] for node in trace.nodes[0]])
    nodes = [{**node, "piece": piece} for node, piece in zip(trace.nodes[0], pieces)]
    return hyps, {"nodes": nodes, "chosen": trace.chosen.get(0, [])}
