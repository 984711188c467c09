"""Text in, text out: tokenise, batch by length, search, detokenise.

Sentences are sorted by length and batched by a token budget internally, and
results are returned in input order. Each sentence's result does not depend on
the batch it landed in (padding is masked everywhere).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rosetta.config import DecodeConfig
from rosetta.data.batching import make_batches
from rosetta.data.corpus import clean_line
from rosetta.data.tokenizer import PAD_ID, Tokenizer
from rosetta.decode.beam import beam_search
from rosetta.decode.common import Hypothesis
from rosetta.decode.greedy import greedy_search
from rosetta.decode.sampling import sample
from rosetta.model.linear import as_plain_linear


@dataclass
class SearchOptions:
    """How to search; defaults come from the model's ``decode`` configuration."""

    beam: int = 5
    nbest: int = 1
    length_penalty: float = 0.6
    max_len_a: float = 1.5
    max_len_b: int = 10
    max_tokens: int = 4000
    batch_size: int = 64
    sampling: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 1

    @classmethod
    def from_config(cls, cfg: DecodeConfig, **overrides) -> SearchOptions:
        base = cls(
            beam=cfg.beam,
            length_penalty=cfg.length_penalty,
            max_len_a=cfg.max_len_a,
            max_len_b=cfg.max_len_b,
            max_tokens=cfg.max_tokens,
            batch_size=cfg.batch_size,
        )
        for key, value in overrides.items():
            if value is not None:
                setattr(base, key, value)
        return base


@dataclass
class Translation:
    """The n-best translations of one input, best first."""

    source: str
    hypotheses: list[tuple[str, Hypothesis]] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.hypotheses[0][0] if self.hypotheses else ""


def pad_batch(
    sequences: list[list[int]], device: torch.device | str = "cpu", value: int = PAD_ID
) -> torch.Tensor:
    """Right-pads id lists into (batch, max_len) with ``value`` (<pad> by default)."""
    out = torch.full((len(sequences), max(map(len, sequences))), value, dtype=torch.long)
    for row, seq in enumerate(sequences):
        out[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out.to(device)


class Translator:
    """Wraps a model and its tokenizer to translate raw sentences."""

    def __init__(
        self, model: torch.nn.Module, tokenizer: Tokenizer, options: SearchOptions
    ) -> None:
        # eval mode with the CPU inference layouts made once (quantized models have
        # no rosetta ``Linear`` left to prepare, and are merely put in eval mode)
        self.model = (
            model.prepare_for_inference()
            if hasattr(model, "prepare_for_inference")
            else model.eval()
        )
        self.tokenizer = tokenizer
        self.options = options
        self.device = next(model.parameters()).device
        self.max_positions = getattr(getattr(model, "cfg", None), "max_positions", 1024)

    @classmethod
    def from_model_dir(
        cls, directory: str | Path, device: str = "cpu", quantize: str | None = None, **overrides
    ) -> Translator:
        """Loads a model directory; ``quantize="int8"`` applies PyTorch's dynamic int8
        quantization to every linear layer (CPU only; weights int8, activations
        quantized on the fly)."""
        from rosetta.modeldir import load_model_dir

        config, tokenizer, model = load_model_dir(directory, device)
        if quantize == "int8":
            if torch.device(device).type != "cpu":
                raise ValueError("dynamic int8 quantization runs on the CPU only")
            with warnings.catch_warnings():
                # PyTorch 2.13 announces the removal of quantized tensors (torchao takes
                # over); the API still works, so keep the user's terminal clean
                warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
                model = torch.ao.quantization.quantize_dynamic(
                    as_plain_linear(model), {torch.nn.Linear}, dtype=torch.qint8
                )
        elif quantize not in (None, "none"):
            raise ValueError(f"unknown quantization {quantize!r}: expected int8")
        return cls(model, tokenizer, SearchOptions.from_config(config.decode, **overrides))

    def search_ids(self, sources: list[list[int]]) -> list[list[Hypothesis]]:
        """Runs the configured search on id sequences, in input order."""
        opts = self.options
        results: list[list[Hypothesis]] = [[] for _ in sources]
        lengths = np.array([len(s) for s in sources])
        nonempty = np.flatnonzero(lengths > 0)
        generator = torch.Generator(device=self.device).manual_seed(opts.seed)
        limit = self.max_positions - 1
        batches = make_batches(
            lengths[nonempty], lengths[nonempty], opts.max_tokens, max_sentences=opts.batch_size
        )
        for batch in batches:
            rows = nonempty[batch]
            src = pad_batch([sources[i][:limit] for i in rows], self.device)
            common = dict(max_len_a=opts.max_len_a, max_len_b=opts.max_len_b, max_len=limit)
            if opts.sampling:
                found = [
                    [h]
                    for h in sample(
                        self.model,
                        src,
                        opts.temperature,
                        opts.top_k,
                        opts.top_p,
                        generator=generator,
                        **common,
                    )
                ]
            elif opts.beam == 1 and opts.nbest == 1:
                found = [[h] for h in greedy_search(self.model, src, **common, with_scores=False)]
            else:
                found = beam_search(
                    self.model, src, opts.beam, opts.length_penalty, opts.nbest, **common
                )
            for row, hyps in zip(rows, found):
                results[row] = hyps
        return results

    def translate(self, sentences: list[str]) -> list[Translation]:
        """Translates raw sentences; an empty line gives an empty translation."""
        cleaned = [clean_line(s) for s in sentences]
        ids = self.tokenizer.encode_source(cleaned)
        found = self.search_ids(ids)
        return [
            Translation(source, [(self.tokenizer.decode_target(h.tokens), h) for h in hyps])
            for source, hyps in zip(cleaned, found)
        ]

    def translate_stream(self, lines: Iterable[str], chunk: int = 1000) -> Iterator[Translation]:
        """Translates a long stream in chunks, keeping memory bounded."""
        return translate_in_chunks(self.translate, lines, chunk)


def translate_in_chunks(
    translate: Callable[[list[str]], list[Translation]], lines: Iterable[str], chunk: int
) -> Iterator[Translation]:
    """Feeds ``lines`` to ``translate`` ``chunk`` at a time (each chunk is length-sorted)."""
    buffer: list[str] = []
    for line in lines:
        buffer.append(line)
        if len(buffer) >= chunk:
            yield from translate(buffer)
            buffer = []
    if buffer:
        yield from translate(buffer)
