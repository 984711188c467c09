"""What the model did for one sentence: attention, candidate words, the search tree.

Everything here looks at a translation already found and is for people, not for
BLEU: ``rosetta attention`` draws ``attention_weights``, and the service's page
shows all three. Each starts from the ``Trace`` the search kept when asked
(``Translator.translate_encoded(..., trace=True)``): what the decoder read and
produced for the best hypothesis, and a beam search's tree. Nothing is searched
again.

- ``attention_weights``: the model run once more, teacher-forced on what the
  decoder read, returning every layer's and head's weights of one kind (the
  Transformer's cross, encoder self and decoder self attention; the RNN's
  alignment α, as ``cross``).
- ``candidates``: at each produced position, the k most probable pieces and their
  probabilities under the model (the same teacher-forced pass), so one sees what
  the search chose among.
- ``tree``: the beam search's tree with each token also given as its piece.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rosetta.decode.common import Trace
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
    def of(cls, translator: TorchTranslator, src_ids: list[int], trace: Trace) -> Pieces:
        target = translator.tokenizer.target_pieces
        source = translator.tokenizer.source_pieces(src_ids)
        return cls(source, target(trace.produced), target(trace.decoder_input))

    def axes(self, kind: str) -> tuple[list[str], list[str]]:
        """(rows, columns) of an attention map of ``kind``."""
        return {
            "cross": (self.produced, self.source),
            "encoder_self": (self.source, self.source),
            "decoder_self": (self.produced, self.decoder_inputs),
        }[kind]


def _teacher_forced(
    translator: TorchTranslator, src_ids: list[int], trace: Trace
) -> tuple[torch.Tensor, torch.Tensor]:
    """(src, decoder input) of one sentence, batch 1, on the model's device."""
    if len(src_ids) > translator.max_source_len:
        raise ValueError(
            f"the sentence has {len(src_ids)} subwords; the model takes at most "
            f"{translator.max_source_len} in one piece, so what it did cannot be shown"
        )
    device = translator.device
    return pad_batch([src_ids], device), pad_batch([trace.decoder_input], device)


@torch.inference_mode()
def attention_weights(
    translator: TorchTranslator, src_ids: list[int], trace: Trace, kinds: tuple[str, ...]
) -> dict[str, list[np.ndarray]]:
    """Per layer, the (heads, rows, columns) float32 weights of each of ``kinds`` the
    model has (rows and columns: ``Pieces.axes``); a kind the model lacks is left out.
    A list, not one array: layers of a pruned model have different numbers of heads."""
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown:
        raise ValueError(f"unknown attention kind {unknown[0]!r}; choose from {', '.join(KINDS)}")
    src, tgt_in = _teacher_forced(translator, src_ids, trace)
    maps = translator.model.attention_maps(src, tgt_in)
    return {
        kind: [m[0].float().cpu().numpy() for m in maps[kind]] for kind in kinds if maps.get(kind)
    }


@torch.inference_mode()
def candidates(
    translator: TorchTranslator, src_ids: list[int], trace: Trace, k: int
) -> list[list[tuple[int, float]]]:
    """For each produced piece (``trace.produced``), the ``k`` most probable
    (token id, probability) pairs at that position, best first."""
    src, tgt_in = _teacher_forced(translator, src_ids, trace)
    probs = translator.model(src, tgt_in)[0].float().softmax(dim=-1)
    values, ids = probs.topk(min(k, probs.size(-1)), dim=-1)
    return [
        list(zip(row_ids, row_values)) for row_ids, row_values in zip(ids.tolist(), values.tolist())
    ]


def tree(translator: TorchTranslator, trace: Trace) -> dict[str, Any] | None:
    """The search tree of ``trace`` (None: its search has none): the search's settings
    (a beam search's ``size`` and ``length_penalty``) and ``{nodes, chosen}`` as in
    ``rosetta.decode.beam.BeamTrace``, each node's token also as its ``piece``."""
    if trace.tree is None:
        return None
    nodes = trace.tree["nodes"]
    pieces = translator.tokenizer.target_pieces([node["token"] for node in nodes])
    return trace.tree | {"nodes": [{**node, "piece": p} for node, p in zip(nodes, pieces)]}
