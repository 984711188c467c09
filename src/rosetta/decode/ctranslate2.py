"""Translating with a CTranslate2 export (``rosetta export``): an engine beside
rosetta's own (``rosetta.decode.translator.TorchTranslator``), chosen with
``Translator.load(..., engine="ctranslate2")`` or ``--engine ctranslate2``.

CTranslate2 is an optional dependency (``pip install rosetta-nmt[export]``):
``ctranslate2_module`` imports it, with a clear error where it is missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rosetta.config import DecodeConfig, load_config
from rosetta.data.tokenizer import BOS_ID, PAD_ID, SPECIAL_PIECES, Tokenizer
from rosetta.decode.common import Found, Hypothesis, Search
from rosetta.decode.search import SEARCHES
from rosetta.decode.translator import Translator
from rosetta.device import resolve_device
from rosetta.modeldir import CONFIG, verify_checksums


def ctranslate2_module() -> Any:
    """The ``ctranslate2`` module, or an ``ImportError`` saying how to install it."""
    try:
        import ctranslate2
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "CTranslate2 is not installed: pip install 'rosetta-nmt[export]'"
        ) from error
    return ctranslate2


class CTranslate2Translator(Translator):
    """The same ``translate`` as ``rosetta.decode.translator.TorchTranslator``, run by
    CTranslate2 (``Translator.load(..., engine="ctranslate2")``) on a ``rosetta
    export`` folder; it runs the searches that say how CTranslate2 runs them
    (``Search.ctranslate2``: greedy, beam, sampling).

    Everything around the search (cleaning, long inputs, n-best assembly,
    streaming, the lock) is ``Translator``'s, shared with rosetta's own engine. Within
    the search, as rosetta does: <bos> and <pad> can never be produced; sampling
    draws with beam 1 (CTranslate2's random sampling), ``nbest`` samples per
    input, seeded once per translator by ``options.seed``. Each hypothesis's
    ``log_prob`` (with ``options.scores``) is CTranslate2's own scoring of it:
    the total log-probability with <eos>, as rosetta reports. Differences: beam
    search ranks by log-probability / length ** length_penalty rather than the
    GNMT penalty, and ``score`` is that normalised value. The length limit is one
    number per call, so sentences go to it in groups of equal length budget
    (``max_len_a * source length + max_len_b``), as rosetta's search gives each
    sentence its own: an output that runs to the limit ends where rosetta's does.
    """

    def __init__(
        self,
        export_dir: str | Path,
        options: DecodeConfig | None = None,
        device: str = "cpu",
        threads: int = 0,
        **given: Any,
    ) -> None:
        """``options``: the search settings (default: the export's ``decode`` section),
        ``given`` settings over them (``beam=4``, ...: ``with_options``); ``device``:
        cpu, cuda or cuda:N."""
        ct2 = ctranslate2_module()
        export_dir = Path(export_dir)
        if not (export_dir / "model.bin").exists():
            raise FileNotFoundError(
                f"{export_dir} is not a CTranslate2 export (run `rosetta export` first)"
            )
        verify_checksums(export_dir)
        self.config = load_config(export_dir / CONFIG)
        options = options if options is not None else self.config.decode
        tokenizer = Tokenizer.load(export_dir)
        super().__init__(tokenizer, options, self.config.model.max_positions - 1, **given)
        # CTranslate2's sampling generators are seeded when its worker threads start
        ct2.set_random_seed(self.search.seed or 0)
        kind, _, index = device.partition(":")
        self.engine = ct2.Translator(
            str(export_dir),
            device=kind,
            device_index=int(index or 0),
            inter_threads=1,
            intra_threads=threads or torch.get_num_threads(),
        )

    @classmethod
    def from_export(
        cls, export_dir: str | Path, device: str | None = None, **search: Any
    ) -> CTranslate2Translator:
        """An export with its own ``decode`` settings, overridden by ``search``, on
        ``device`` (None: the export's ``decode.device``)."""
        config = load_config(Path(export_dir) / CONFIG)
        place = resolve_device(device or config.decode.device)
        name = place.type if place.index is None else f"{place.type}:{place.index}"
        return cls(export_dir, config.decode, name, **search)

    @property
    def searches(self) -> list[type[Search]]:
        return [search for search in SEARCHES if search.in_ctranslate2]

    def describe(self) -> str:
        return "CTranslate2"

    def engine_search(self, sources: list[list[int]], trace: bool = False) -> list[Found]:
        if trace:
            raise ValueError("CTranslate2 does not show what its search did: use engine torch")
        opts = self.options
        search = self.search.ctranslate2(self.tokenizer.tgt_vocab_size)
        limit = self.max_source_len
        pieces = [self.tokenizer.source_pieces(ids) for ids in sources]
        # rosetta's budget counts the <eos>; CTranslate2's limit counts tokens before it
        groups: dict[int, list[int]] = {}
        for k, p in enumerate(pieces):
            budget = min(int(len(p) * opts.max_len_a + opts.max_len_b), limit) - 1
            groups.setdefault(max(budget, 1), []).append(k)
        found: list = [None] * len(pieces)
        for budget, members in groups.items():
            outputs = self.engine.translate_batch(
                [pieces[k] for k in members],
                max_decoding_length=budget,
                max_input_length=0,  # sources are within the limit already; never cut
                max_batch_size=opts.batch_size,
                batch_type="examples",
                return_scores=True,
                suppress_sequences=[[SPECIAL_PIECES[BOS_ID]], [SPECIAL_PIECES[PAD_ID]]],
                **search,
            )
            for k, output in zip(members, outputs):
                found[k] = output
        target = self.tokenizer.target
        results = [
            [
                Hypothesis([target.piece_to_id(p) for p in tokens], float(score), float("nan"))
                for tokens, score in zip(output.hypotheses, output.scores)
            ]
            for output in found
        ]
        if opts.scores:
            self._score(pieces, results, [output.hypotheses for output in found])
        return [Found(hyps) for hyps in results]

    def _score(
        self, pieces: list[list[str]], results: list[list[Hypothesis]], outputs: list
    ) -> None:
        """Sets each hypothesis's ``log_prob`` to its total log-probability with <eos>.

        CTranslate2's search score leaves out the <eos> of an output cut at the
        length limit and is divided by length ** length_penalty in beam search;
        scoring the output again gives exactly rosetta's quantity.
        """
        sources = [p for p, hyps in zip(pieces, outputs) for _ in hyps]
        targets = [tokens for hyps in outputs for tokens in hyps]
        scored = iter(self.engine.score_batch(sources, targets, max_input_length=0))
        for hyps in results:
            for hypothesis in hyps:
                hypothesis.log_prob = float(sum(next(scored).log_probs))
