"""SentencePiece subword tokenizer and the vocabulary's special tokens.

The SentencePiece model *is* the vocabulary: piece ids are the ids of the
model's embedding table. The four special tokens have fixed ids in every model
rosetta trains, so code can refer to them as constants:

====== ===== =============================================
id     piece use
====== ===== =============================================
0      <pad> padding; ignored by the loss and masked in attention
1      <unk> a piece outside the vocabulary (rare: byte fallback is on by default)
2      <bos> first decoder input ("start of sentence")
3      <eos> last label; generation stops when it is produced
====== ===== =============================================

Text is NFC-normalised by ``rosetta.data.corpus`` before it gets here, and the
SentencePiece models use the ``identity`` normalisation rule with whitespace
kept as is, so ``decode(encode(text)) == text`` (no-break spaces, typographic
quotes and umlauts included).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm

from rosetta.memory import release_memory

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIAL_PIECES = {PAD_ID: "<pad>", UNK_ID: "<unk>", BOS_ID: "<bos>", EOS_ID: "<eos>"}
# The input of a non-autoregressive decoder at the positions it has to fill in: a
# control symbol, so no text ever encodes to it and decoding drops it. Tokenizers
# trained before it existed have a plain piece at id 4 (``Tokenizer.has_mask``).
MASK_ID, MASK_PIECE = 4, "<mask>"

JOINT_MODEL = "spm.model"
SOURCE_MODEL = "spm.src.model"
TARGET_MODEL = "spm.tgt.model"
OPTIONS = "tokenizer.options.json"  # a TokenizerOptions, when any differs from its default


@dataclass(frozen=True)
class TokenizerOptions:
    """What a tokenizer does besides its SentencePiece models (rosetta's own: nothing).

    ``source_eos``: every source sentence ends with <eos>, as Marian's models were
    trained. ``lookup_pieces``: text is cut into pieces by SentencePiece, and each
    piece takes the id of its string in the vocabulary, as Marian and HuggingFace
    do; it differs from SentencePiece's own ids for a character that one side's
    model does not know but the joint vocabulary has (the other side's piece)."""

    source_eos: bool = False
    lookup_pieces: bool = False

    def changed(self) -> dict[str, bool]:
        return {k: v for k, v in asdict(self).items() if v != getattr(TokenizerOptions, k)}


def write_options(directory: str | Path, options: TokenizerOptions) -> None:
    """Writes ``options`` beside the SentencePiece models in ``directory``."""
    path = Path(directory) / OPTIONS
    path.write_text(json.dumps(asdict(options)) + "\n", encoding="utf-8")


def train_sentencepiece(
    sentences: Iterable[str],
    model_path: Path,
    vocab_size: int,
    model_type: str = "bpe",
    character_coverage: float = 1.0,
    byte_fallback: bool = True,
) -> Path:
    """Trains one SentencePiece model on ``sentences`` and writes it to ``model_path``.

    ``vocab_size`` is an upper bound (``hard_vocab_limit`` is off), so a small
    corpus such as the toy task does not fail for lack of pieces.

    The sentences are written to a file first, one a line, and SentencePiece
    reads that file. Handing it the iterator instead interleaves the reading of
    the corpus (every staged line, when ``sentences`` samples a corpus of
    millions) with the trainer's allocations: at 6.4M pairs the training phase
    then peaked 200 MB higher than at 0.4M with the same sample, where from a
    file it peaks the same (``benchmarks/data_scale.py``).
    """
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=model_path.parent) as tmp:
        prefix = Path(tmp) / "spm"
        sample = Path(tmp) / "sentences.txt"
        with open(sample, "w", encoding="utf-8", newline="\n") as file:
            file.writelines(sentence + "\n" for sentence in sentences)
        try:
            spm.SentencePieceTrainer.train(
                input=str(sample),
                model_prefix=str(prefix),
                model_type=model_type,
                vocab_size=vocab_size,
                character_coverage=character_coverage,
                byte_fallback=byte_fallback,
                hard_vocab_limit=False,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                pad_id=PAD_ID,
                unk_id=UNK_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                pad_piece=SPECIAL_PIECES[PAD_ID],
                unk_piece=SPECIAL_PIECES[UNK_ID],
                bos_piece=SPECIAL_PIECES[BOS_ID],
                eos_piece=SPECIAL_PIECES[EOS_ID],
                control_symbols=[MASK_PIECE],
                num_threads=2,
                minloglevel=2,
            )
        except RuntimeError as error:
            raise ValueError(
                f"SentencePiece could not train a {vocab_size}-piece model: "
                f"{str(error).split('] ')[-1]} (byte fallback alone needs 260 pieces)"
            ) from None
        shutil.move(f"{prefix}.model", model_path)
        shutil.move(f"{prefix}.vocab", model_path.with_suffix(".vocab"))
    return model_path


def _load_processor(path: str | Path) -> spm.SentencePieceProcessor:
    """Opens one SentencePiece model; a damaged or foreign file is a ``ValueError``."""
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as error:
        reason = str(error).split("] ")[-1].strip() or "empty or unreadable"
        raise ValueError(f"{path} is not a SentencePiece model ({reason})") from None


def sample_sentences(
    pairs: Collection[tuple[str, str]], sides: tuple[int, ...], size: int, seed: int = 0
) -> Iterator[str]:
    """The sentences of ``sides`` (0: source, 1: target) of ``pairs`` in corpus order,
    or, when they are more than ``size`` (and ``size`` is not 0), those of a
    uniform random sample of ``size // len(sides)`` pairs: a joint model sees
    both sides of the pairs it samples, as it sees both sides of a whole corpus.
    The sample is drawn with a seeded generator (the same corpus gives the same
    sample) before SentencePiece sees any sentence, so SentencePiece holds the
    sample only, whatever the size of the corpus."""
    chosen = None
    if size and size < len(pairs) * len(sides):
        chosen = np.zeros(len(pairs), dtype=bool)
        picked = np.random.default_rng(seed).choice(len(pairs), size // len(sides), replace=False)
        chosen[picked] = True
    for index, pair in enumerate(pairs):
        if chosen is None or chosen[index]:
            for side in sides:
                yield pair[side]


def _read_options(directory: Path) -> TokenizerOptions:
    path = directory / OPTIONS
    if not path.exists():
        return TokenizerOptions()
    try:
        options = json.loads(path.read_text(encoding="utf-8"))
        return TokenizerOptions(**options)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{path} is damaged (not JSON)") from None
    except TypeError:
        raise ValueError(f"{path} holds options this rosetta does not know: {options}") from None


class Tokenizer:
    """Source and target subword models (one shared model when ``joint``)."""

    def __init__(
        self,
        source_model: str | Path,
        target_model: str | Path | None = None,
        options: TokenizerOptions = TokenizerOptions(),
    ) -> None:
        self.options = options
        self.source = _load_processor(source_model)
        self.target = self.source if target_model is None else _load_processor(target_model)
        self.joint = target_model is None
        for processor in {id(self.source): self.source, id(self.target): self.target}.values():
            for token_id, piece in SPECIAL_PIECES.items():
                if processor.id_to_piece(token_id) != piece:
                    raise ValueError(
                        f"SentencePiece model maps id {token_id} to "
                        f"{processor.id_to_piece(token_id)!r}, expected {piece!r}"
                    )

    @classmethod
    def train(
        cls,
        pairs: Collection[tuple[str, str]],
        directory: str | Path,
        vocab_size: int,
        joint: bool = True,
        model_type: str = "bpe",
        character_coverage: float = 1.0,
        byte_fallback: bool = True,
        input_sentence_size: int = 0,
    ) -> Tokenizer:
        """Trains on the training pairs only and saves the model(s) in ``directory``.

        ``pairs`` is iterated once per model (twice for separate vocabularies): a
        list, or another sized re-iterable such as a file reader. With
        ``input_sentence_size``, each model is trained on a uniform random sample
        of that many of its sentences (``sample_sentences``)."""
        directory = Path(directory)
        options = dict(
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
        )
        models = {JOINT_MODEL: (0, 1)} if joint else {SOURCE_MODEL: (0,), TARGET_MODEL: (1,)}
        release_memory()
        for name, sides in models.items():
            sentences = sample_sentences(pairs, sides, input_sentence_size)
            train_sentencepiece(sentences, directory / name, **options)
            release_memory()
        return cls.load(directory)

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Loads the model(s) saved by ``train`` from ``directory``."""
        directory = Path(directory)
        options = _read_options(directory)
        if (directory / JOINT_MODEL).exists():
            return cls(directory / JOINT_MODEL, options=options)
        if (directory / SOURCE_MODEL).exists() and (directory / TARGET_MODEL).exists():
            return cls(directory / SOURCE_MODEL, directory / TARGET_MODEL, options)
        raise FileNotFoundError(
            f"no SentencePiece model ({JOINT_MODEL} or {SOURCE_MODEL}) in {directory}"
        )

    def fingerprint(self) -> str:
        """SHA-256 of the subword model(s): what checkpoints and model directories are
        bound to, since the embedding rows mean nothing under another vocabulary."""
        digest = hashlib.sha256(b"joint" if self.joint else b"separate")
        if self.options.changed():  # tokenizers without options keep their fingerprints
            digest.update(json.dumps(self.options.changed(), sort_keys=True).encode())
        digest.update(self.source.serialized_model_proto())
        if not self.joint:
            digest.update(self.target.serialized_model_proto())
        return digest.hexdigest()

    def files(self) -> list[str]:
        """Names of the files that make up this tokenizer (for copying it)."""
        names = [JOINT_MODEL] if self.joint else [SOURCE_MODEL, TARGET_MODEL]
        names += [name.replace(".model", ".vocab") for name in names]
        return names + ([OPTIONS] if self.options.changed() else [])

    @property
    def has_mask(self) -> bool:
        """Whether the target model holds ``<mask>`` at ``MASK_ID`` (what a
        non-autoregressive model needs)."""
        return self.target.id_to_piece(MASK_ID) == MASK_PIECE

    @property
    def src_vocab_size(self) -> int:
        return self.source.get_piece_size()

    @property
    def tgt_vocab_size(self) -> int:
        return self.target.get_piece_size()

    def encode_source(self, texts: list[str], threads: int = 1) -> list[list[int]]:
        """Source sentences to piece ids, on ``threads`` of SentencePiece's threads:
        no <bos>, and <eos> only with ``options.source_eos`` (rosetta's own models
        do not need one; Marian's were trained with it)."""
        return self._encode(self.source, texts, threads, self.options.source_eos)

    def encode_target(self, texts: list[str], threads: int = 1) -> list[list[int]]:
        """Target sentences to piece ids (without <bos>/<eos>; batching adds them)."""
        return self._encode(self.target, texts, threads, False)

    def _encode(
        self, processor: spm.SentencePieceProcessor, texts: list[str], threads: int, eos: bool
    ) -> list[list[int]]:
        if not self.options.lookup_pieces:
            return processor.encode(texts, num_threads=threads, add_eos=eos)
        pieces = processor.encode(texts, out_type=str, num_threads=threads)
        ending = [EOS_ID] if eos else []
        return [[*processor.piece_to_id(sentence), *ending] for sentence in pieces]

    def decode_target(self, ids: Sequence[int]) -> str:
        """Piece ids back to detokenised text; special tokens are dropped."""
        return self.target.decode([i for i in ids if i > EOS_ID])

    def source_pieces(self, ids: Sequence[int]) -> list[str]:
        return [self.source.id_to_piece(int(i)) for i in ids]

    def target_pieces(self, ids: Sequence[int]) -> list[str]:
        return [self.target.id_to_piece(int(i)) for i in ids]
