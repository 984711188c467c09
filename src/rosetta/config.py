"""Typed experiment configuration, loaded from one YAML file.

Every section is a pydantic model that forbids unknown keys, so a typo such as
``modle:`` or ``d_modle: 256`` is an error naming the key, and a bad value names
the key and what was expected. ``load_config`` also applies ``--set key=value``
overrides from the command line before validation.
"""

from __future__ import annotations

import math
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from rosetta.device import check_device_name


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the key."""


class Section(BaseModel):
    """Base for all sections: unknown keys are errors, assignments are validated, and
    no number may be NaN or infinite (``.inf`` would pass every ``gt=0`` bound)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ToyData(Section):
    """Settings of the built-in toy task (see ``rosetta.data.toy``)."""

    seed: int = 1
    train_size: int = Field(20000, gt=0)
    valid_size: int = Field(500, gt=0)
    test_size: int = Field(500, gt=0)
    # each line holds a run of consecutive sentences, [fewest, most]: [1, 1] is the
    # sentence task; e.g. [25, 250] the long-input task (~200-2,000 subwords per line)
    sentences: tuple[int, int] = (1, 1)
    # the referent task: each line opens with its topic and later says "someone",
    # which only the topic can translate (rosetta.data.toy; a long-range test)
    referent: bool = False
    # ... with the referent's ending (-ulo or -eto) drawn per line and shown only in
    # the target's first sentence: what a decoder must carry from there itself
    referent_style: bool = False

    @model_validator(mode="after")
    def _sentences_range(self) -> ToyData:
        fewest, most = self.sentences
        if not 1 <= fewest <= most:
            raise ValueError(
                f"sentences must be [fewest, most] with 1 <= fewest <= most, "
                f"got {list(self.sentences)}"
            )
        return self


class TrainingCorpus(Section):
    """One training corpus of several: a file prefix (``PATH.{src,tgt}``, each
    possibly compressed) or a TSV, under ``data.root`` unless absolute, and the
    share of the training pairs it gives (its ``weight`` over the sum of all)."""

    path: str
    weight: float | None = Field(None, gt=0.0)
    name: str | None = None

    @property
    def label(self) -> str:
        return self.name or Path(self.path).name


class DataConfig(Section):
    """Where the parallel corpus lives and how it is filtered.

    ``train`` is one corpus (a file prefix or a TSV) or a list of corpora, each
    optionally weighted: with weights, each epoch draws the corpora in those
    proportions (over- or under-sampling them); without, it is their union."""

    root: Path | None = None
    src_lang: str = "en"
    tgt_lang: str = "de"
    train: str | list[TrainingCorpus] = "train"
    valid: str = "valid"
    test: str | None = "test"
    toy: ToyData | None = None
    max_len: int = Field(128, gt=0)
    max_ratio: float = Field(3.0, gt=1.0)
    remove_duplicates: bool = False  # training pairs seen before, exactly, after cleaning
    remove_copies: bool = False  # training pairs whose source equals their target

    @model_validator(mode="after")
    def _root_or_toy(self) -> DataConfig:
        if self.root is None and self.toy is None:
            raise ValueError("set data.root (a folder holding the corpus) or data.toy")
        return self

    @model_validator(mode="after")
    def _corpora(self) -> DataConfig:
        if isinstance(self.train, str):
            return self
        if not self.train:
            raise ValueError("train: give at least one corpus")
        if self.toy is not None:
            raise ValueError("train: the toy task is one corpus; give train as a name")
        weighted = [corpus.weight is not None for corpus in self.train]
        if any(weighted) and not all(weighted):
            raise ValueError("train: give every corpus a weight, or none")
        labels = [corpus.label for corpus in self.train]
        if len(set(labels)) != len(labels):
            raise ValueError(f"train: corpus names must differ, got {labels} (set name:)")
        return self

    @property
    def corpora(self) -> list[TrainingCorpus]:
        """The training corpora, one when ``train`` is a name."""
        if isinstance(self.train, str):
            return [TrainingCorpus(path=self.train)]
        return list(self.train)


class TokenizerConfig(Section):
    """SentencePiece subword model."""

    type: Literal["bpe", "unigram"] = "bpe"
    vocab_size: int = Field(8000, ge=16)
    joint: bool = True
    character_coverage: float = Field(1.0, gt=0.0, le=1.0)
    byte_fallback: bool = True
    input_sentence_size: int = Field(0, ge=0)


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "toy": dict(d_model=128, d_ff=512, heads=4, encoder_layers=2, decoder_layers=2, dropout=0.1),
    "small": dict(d_model=256, d_ff=1024, heads=4, encoder_layers=3, decoder_layers=3, dropout=0.1),
    "base": dict(d_model=512, d_ff=2048, heads=8, encoder_layers=6, decoder_layers=6, dropout=0.1),
    "rnn_small": dict(
        arch="rnn",
        d_model=256,
        hidden_size=512,
        rnn_cell="lstm",
        attention="bahdanau",
        encoder_layers=1,
        decoder_layers=1,
        dropout=0.3,
    ),
}


class ModelSection(Section):
    """What every architecture has. A ``preset`` fills the sizes; explicit keys win."""

    d_model: int = Field(512, gt=0)  # the embedding (and output) size
    encoder_layers: int = Field(6, ge=1)
    decoder_layers: int = Field(6, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    max_positions: int = Field(1024, gt=0)
    tie_output: bool = True
    tie_all: bool = True

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("preset") in MODEL_PRESETS:
            return {**MODEL_PRESETS[values["preset"]], **values}
        return values


class AttentionConfig(Section):
    """Which self-attention a Transformer stack runs (``rosetta.model.efficient``).

    ``full``: softmax over every position, O(n²·d). ``local``: each position
    sees the ``radius`` positions on each side (in the decoder, the ``radius``
    before it), O(n·r·d). ``linear``: kernelised attention with the feature map
    ``feature_map`` (``elu``: elu(x)+1; ``favor``: Performer's positive random
    features, ``features`` of them), O(n·d²), and a fixed-size decoding state.
    ``lowrank``: Linformer, keys and values projected along the length to
    ``rank`` rows, O(n·k·d), for the encoder only and for sources of at most
    ``model.max_positions`` positions. ``sparse``: ``local``'s window plus the
    first ``global_tokens`` positions, which every position sees and which (in
    the encoder) see every position (Longformer, BigBird), O(n·(r+g)·d).
    ``lsh``: Reformer's shared-QK attention within buckets of a random-rotation
    hash, chunks of ``bucket_size`` sorted positions seeing their own and the
    previous chunk, ``hashes`` rounds, O(n·c·d), for the encoder only.
    """

    variant: Literal["full", "local", "linear", "lowrank", "sparse", "lsh"] = "full"
    radius: int = Field(16, ge=1)
    feature_map: Literal["elu", "favor"] = "elu"
    features: int = Field(64, ge=1)
    rank: int = Field(64, ge=1)
    global_tokens: int = Field(1, ge=0)
    bucket_size: int = Field(32, ge=1)
    hashes: int = Field(2, ge=1)


class TransformerConfig(ModelSection):
    """``model.arch: transformer`` (the default)."""

    arch: Literal["transformer"] = "transformer"
    preset: Literal["toy", "small", "base"] | None = None
    d_ff: int = Field(2048, gt=0)
    heads: int = Field(8, gt=0)
    attention_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    activation: Literal["relu", "gelu", "swish"] = "relu"  # swish: SiLU, x * sigmoid(x)
    norm: Literal["pre", "post"] = "pre"
    # sinusoidal: the paper's interleaved sin/cos; sinusoidal_halves: all sines, then all
    # cosines (Marian's and fairseq's layout; the same frequencies)
    positional: Literal["sinusoidal", "sinusoidal_halves", "learned"] = "sinusoidal"
    output_bias: bool = False  # a bias on the output layer (Marian's final_logits_bias)
    encoder_attention: AttentionConfig = AttentionConfig()  # self-attention of the encoder
    decoder_attention: AttentionConfig = AttentionConfig()  # ... and of the decoder
    # heads left in attention modules that were pruned (``rosetta heads --prune``), by
    # module name ("encoder.0.self", "decoder.2.cross"); the others have ``heads``.
    # A head keeps its width, d_model / heads.
    head_counts: dict[str, int] = {}

    def heads_at(self, module: str) -> int:
        """The number of heads of attention module ``module`` (see ``attention_modules``)."""
        return self.head_counts.get(module, self.heads)

    def attention_modules(self) -> list[str]:
        """Every attention module's name, in the order of the model: "encoder.{layer}.self",
        then per decoder layer "decoder.{layer}.self" and "decoder.{layer}.cross"."""
        encoder = [f"encoder.{i}.self" for i in range(self.encoder_layers)]
        decoder = [
            f"decoder.{i}.{kind}" for i in range(self.decoder_layers) for kind in ("self", "cross")
        ]
        return encoder + decoder

    @model_validator(mode="after")
    def _heads_divide(self) -> TransformerConfig:
        if self.d_model % self.heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by heads ({self.heads})")
        known = self.attention_modules()
        for module, count in self.head_counts.items():
            if module not in known:
                raise ValueError(
                    f"head_counts: no attention module {module!r} in this model "
                    f"(modules: {known[0]} .. {known[-1]})"
                )
            if not 1 <= count <= self.heads:
                raise ValueError(
                    f"head_counts: {module} has {count} heads; between 1 and heads ({self.heads})"
                )
        low_rank = self.encoder_attention
        if low_rank.variant == "lowrank" and low_rank.rank > self.max_positions:
            raise ValueError(
                f"encoder_attention.rank ({low_rank.rank}) cannot exceed max_positions "
                f"({self.max_positions}): Linformer projects at most that many positions"
            )
        if self.decoder_attention.variant == "lowrank":
            raise ValueError(
                "decoder_attention.variant lowrank is not possible: Linformer's projection "
                "along the length mixes future positions; use full, local, linear or sparse"
            )
        if self.decoder_attention.variant == "lsh":
            raise ValueError(
                "decoder_attention.variant lsh is not possible: which chunk a position "
                "falls in depends on the hashes of later positions, so no decoding step "
                "can reproduce the training pass; use full, local, linear or sparse"
            )
        return self


class NATConfig(TransformerConfig):
    """``model.arch: nat``: a non-autoregressive Transformer, a conditional masked
    language model (CMLM, Ghazvininejad et al. 2019) over the encoder.

    Its decoder reads ``<mask>`` at the positions it has to fill in and attends
    to every position (no causal mask); the target length comes from a classifier
    on the mean-pooled encoder output over offsets ``-max_length_offset ...
    +max_length_offset`` from the source length, trained jointly with weight
    ``length_loss_weight``. Training masks a uniformly drawn number of target
    tokens and predicts them; ``glancing > 0`` trains instead with glancing
    (GLAT, Qian et al. 2021): a first pass from all masks, then a share
    ``glancing`` of its errors revealed as gold tokens, the loss on the rest.
    Decoding: ``rosetta.decode.mask_predict`` (``decode.iterations``,
    ``decode.length_beam``).
    """

    arch: Literal["nat"]  # type: ignore[assignment]
    # how the decoder knows how many tokens to emit: ``classifier`` (a length
    # classifier, mask-predict), ``eos`` (a fixed ceil(upsample x source length)
    # positions, the output cut at the first <eos>) or ``ctc`` (the encoder output
    # up-sampled by ``upsample``, blanks and repeats collapsed; rosetta.model.ctc)
    # or ``crf`` (``eos``'s positions decoded jointly by a linear-chain CRF with
    # ``crf_rank`` low-rank transitions over each position's ``crf_beam`` best
    # tokens; rosetta.model.crf)
    length: Literal["classifier", "eos", "ctc", "crf"] = "classifier"
    upsample: float = Field(2.0, ge=1.0, le=8.0)  # decoder positions per source piece
    crf_rank: int = Field(32, ge=1)
    crf_beam: int = Field(64, ge=1)
    length_loss_weight: float = Field(0.1, ge=0.0)
    max_length_offset: int = Field(32, ge=1)
    glancing: float = Field(0.0, ge=0.0, le=1.0)


class RNNConfig(ModelSection):
    """``model.arch: rnn``: the bidirectional RNN encoder-decoder with attention."""

    arch: Literal["rnn"]
    preset: Literal["rnn_small"] | None = None
    rnn_cell: Literal["lstm", "gru"] = "lstm"
    hidden_size: int = Field(512, gt=0)
    attention: Literal["bahdanau", "dot", "general"] = "bahdanau"
    input_feeding: bool = True

    @model_validator(mode="after")
    def _hidden_even(self) -> RNNConfig:
        if self.hidden_size % 2:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be even: "
                "the bidirectional encoder gives each direction half"
            )
        return self


# The model section is one of the architectures, chosen by its ``arch`` key; each
# checks its own keys, so an RNN key in a Transformer configuration is an error.
ModelConfig = Annotated[TransformerConfig | NATConfig | RNNConfig, Field(discriminator="arch")]
ARCHITECTURES: dict[str, type[ModelSection]] = {
    "transformer": TransformerConfig,
    "nat": NATConfig,
    "rnn": RNNConfig,
}

# Until the model section was split by architecture, every configuration saved
# (a model directory's config.yaml, a checkpoint) listed the other architecture's
# keys too, at these defaults; such keys are dropped when they hold these values.
_FLAT_DEFAULTS = {
    "transformer": dict(
        d_ff=2048,
        heads=8,
        attention_dropout=0.0,
        activation="relu",
        norm="pre",
        positional="sinusoidal",
    ),
    "rnn": dict(rnn_cell="lstm", hidden_size=512, attention="bahdanau", input_feeding=True),
}


def _model_section(values: Any) -> Any:
    """The model section's keys with its preset's ``arch`` (default: transformer), and
    without another architecture's keys left at their defaults by older versions."""
    if not isinstance(values, dict):
        return values
    preset = MODEL_PRESETS.get(values.get("preset"), {})
    arch = values.get("arch", preset.get("arch", "transformer"))
    values = {**values, "arch": arch}
    for other, defaults in _FLAT_DEFAULTS.items():
        if other != arch:
            for key, default in defaults.items():
                if key in values and values[key] == default:
                    del values[key]
    return values


_MODEL_ADAPTER: TypeAdapter = TypeAdapter(ModelConfig)


def model_config(values: dict[str, Any]) -> TransformerConfig | NATConfig | RNNConfig:
    """Validates a model section (as written in YAML or saved by any version)."""
    return _MODEL_ADAPTER.validate_python(_model_section(values))


class ScheduledSamplingConfig(Section):
    """``train.scheduled_sampling``: feed the decoder some of its own predictions
    during training (Bengio et al. 2015), in the parallel two-pass form of
    Mihaylova & Martins (2019) and Duckworth et al. (2019): a teacher-forced pass
    without gradients predicts every position; each decoder input after <bos> is
    replaced by the model's prediction of it with probability ``rate(step)``; a
    second pass on the mixed input learns the gold labels. The RNN uses the
    classic per-step form instead (``RNNSeq2Seq.scheduled_states``).

    The rate goes from ``start`` to ``end`` as ``progress`` goes from 0 to 1 over
    the optimizer steps ``i``, with ``speed`` = k steps:
    ``linear`` min(1, i / k); ``exponential`` 1 - exp(-i / k); ``inverse_sigmoid``
    1 - eps(i) / eps(0) with eps(i) = k / (k + exp(i / k)), Bengio et al.'s
    decay of the teacher-forcing probability (halfway near k ln k steps).
    ``sample``: draw the predictions from the model's distribution instead of
    taking its most probable token.
    """

    schedule: Literal["linear", "exponential", "inverse_sigmoid"] = "inverse_sigmoid"
    start: float = Field(0.0, ge=0.0, le=1.0)
    end: float = Field(0.25, ge=0.0, le=1.0)
    speed: float = Field(1000.0, gt=0.0)
    sample: bool = False

    def rate(self, step: int) -> float:
        """The probability that a decoder input is the model's own prediction."""
        x = step / self.speed
        if self.schedule == "linear":
            progress = min(1.0, x)
        elif self.schedule == "exponential":
            progress = 1.0 - math.exp(-x)
        else:
            k = self.speed
            eps = k / (k + math.exp(min(x, 700.0)))
            progress = 1.0 - eps / (k / (k + 1.0))
        return self.start + (self.end - self.start) * progress


class SequenceLevelConfig(Section):
    """``train.sequence_level``: fine-tuning on whole sentences against a sentence
    metric (``rosetta.train.sequence_level``; README "Sequence-level training"),
    usually from a trained model (``init``).

    ``method``: ``mrt``, minimum risk training (Shen et al. 2016): each source's
    ``candidates`` (distinct ones) get the distribution p~(c) proportional to
    p(c)^``sharpness`` renormalised over the set, and the loss is the risk
    sum_c p~(c) cost(c); ``reinforce``: REINFORCE (Williams 1992, the MIXER family of
    Ranzato et al. 2016) over samples drawn as drawn, each sample's reward minus the
    mean reward of the source's other samples (the leave-one-out baseline).
    ``metric``: sentence BLEU or chrF by sacreBLEU on detokenised text (cost = 1 -
    score / 100). ``generate``: ``sample`` (ancestral, at ``temperature``) or
    ``beam`` (its n-best; MRT only: REINFORCE needs draws). ``include_reference``
    adds the reference to MRT's set. ``token_weight`` lambda mixes in the
    token-level loss (Edunov et al. 2018): lambda * label-smoothed loss per target
    token + (1 - lambda) * the sequence-level loss, both per sentence."""

    method: Literal["mrt", "reinforce"] = "mrt"
    metric: Literal["bleu", "chrf"] = "bleu"
    candidates: int = Field(8, ge=2, le=256)
    generate: Literal["sample", "beam"] = "sample"
    temperature: float = Field(1.0, gt=0.0, le=100.0)
    include_reference: bool = False
    sharpness: float = Field(1.0, gt=0.0)
    token_weight: float = Field(0.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _reinforce_needs_draws(self) -> SequenceLevelConfig:
        if self.method == "reinforce" and self.generate != "sample":
            raise ValueError(
                "reinforce estimates the gradient from draws: generate must be sample "
                "(beam's n-best is for mrt)"
            )
        if self.method == "reinforce" and self.include_reference:
            raise ValueError("include_reference is for mrt (the reference is not a draw)")
        return self


class TrainConfig(Section):
    """Optimisation, validation and stopping."""

    max_tokens: int = Field(4096, gt=0)
    accumulate: int = Field(1, ge=1)
    lr: float | None = Field(None, gt=0.0)
    warmup: int = Field(4000, ge=1)
    schedule: Literal["noam", "inverse_sqrt", "constant", "plateau"] = "noam"
    plateau_factor: float = Field(0.5, gt=0.0, lt=1.0)
    plateau_patience: int = Field(1, ge=1)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-9, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    clip_norm: float = Field(1.0, ge=0.0)
    max_steps: int = Field(0, ge=0)
    max_epochs: int = Field(0, ge=0)
    max_time: str | None = None
    valid_every: int = Field(1000, ge=1)
    valid_bleu: bool = True
    valid_bleu_size: int = Field(0, ge=0)
    log_every: int = Field(50, ge=1)
    keep_last: int = Field(5, ge=1)
    max_nonfinite: int = Field(10, ge=1)  # consecutive NaN/inf losses before training stops
    patience: int = Field(0, ge=0)
    average_last: int = Field(0, ge=0)
    # GNMT alphas tried with the model's beam on the whole validation set when the
    # model directory is written; the best becomes its decode.length_penalty
    length_penalty_grid: list[Annotated[float, Field(ge=0.0)]] = []
    attention_samples: int = Field(0, ge=0)
    seed: int = 1
    threads: int = Field(0, ge=0)
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    scheduled_sampling: ScheduledSamplingConfig | None = None
    sequence_level: SequenceLevelConfig | None = None  # whole-sentence fine-tuning
    # parts whose weights stay as they are (fine-tuning from ``init``): embeddings (and
    # the output layer tied to them), the encoder's layers, the decoder's
    freeze: list[Literal["embeddings", "encoder", "decoder"]] = []
    device: str = "auto"  # auto (CUDA when there is one) | cpu | cuda | cuda:N

    _device = field_validator("device")(lambda value: check_device_name(value))

    @field_validator("amp", mode="before")
    @classmethod
    def _amp_off(cls, value: Any) -> Any:
        # YAML 1.1 reads an unquoted `off` (in a file or a --set override) as False
        return "off" if value is False else value

    @model_validator(mode="after")
    def _check_time(self) -> TrainConfig:
        if self.max_time is not None:
            parse_duration(self.max_time)
        return self


# The flat ``decode`` keys of configurations written before the search section: read
# into ``decode.search`` (a frozen list; ``rosetta.decode.search`` reads such sections)
LEGACY_SEARCH_KEYS = frozenset(
    {"beam", "nbest", "length_penalty", "sampling", "temperature", "top_k", "top_p", "seed",
     "iterations", "length_beam"}
)  # fmt: skip


class DecodeConfig(Section):
    """How to search: the one place that holds the search settings, used by
    validation BLEU, ``translate``, ``evaluate``, the Python API and the service.

    ``search`` names the search and its options, e.g. ``{kind: beam, beam: 5,
    nbest: 1, length_penalty: 0.6}`` (kinds and options: ``rosetta.decode.search``,
    which checks the section against the model when a translator is made; empty:
    the model's own default, beam search or mask-predict). The other keys apply to
    every search. ``scores`` asks for every hypothesis's log-probability even where
    the search does not need it (greedy search and CTranslate2 skip it otherwise).
    The flat keys of older configurations (``beam: 5``, ``sampling: true``, ...)
    are read into ``search``.
    """

    search: dict[str, Any] = {}
    max_len_a: float = Field(1.5, ge=0.0)  # output budget: a * source length + b
    max_len_b: int = Field(10, ge=1)
    max_tokens: int = Field(4000, gt=0)  # padded source tokens per batch
    batch_size: int = Field(64, ge=1)  # sentences per batch
    # the share of batch_size that must be free before waiting sentences join a running
    # batch: 1 = only once it has emptied (static batches: the fastest offline on a CPU,
    # README "Continuous batching"); smaller = continuous batching
    refill: float = Field(1.0, gt=0.0, le=1.0)
    scores: bool = False
    device: str = "cpu"  # cpu | auto (CUDA when there is one) | cuda | cuda:N

    _device = field_validator("device")(lambda value: check_device_name(value))

    @model_validator(mode="before")
    @classmethod
    def _flat_search_keys(cls, values: Any) -> Any:
        """Older configurations' flat search keys, moved into ``search``; given over a
        search section (``with_overrides(beam=1)``), they make it one of that form."""
        if not isinstance(values, dict) or not LEGACY_SEARCH_KEYS & set(values):
            return values
        values = dict(values)
        section = dict(values.get("search") or {})
        section.pop("kind", None)
        for key in LEGACY_SEARCH_KEYS & set(values):
            section[key] = values.pop(key)
        return {**values, "search": section}

    def with_overrides(self, **overrides: Any) -> DecodeConfig:
        """A copy with every override that is not None, validated as a whole."""
        values = {**self.model_dump(), **{k: v for k, v in overrides.items() if v is not None}}
        try:
            return DecodeConfig.model_validate(values)
        except ValidationError as error:
            raise ConfigError(f"invalid search options:\n{format_error(error)}") from None


class ServeConfig(Section):
    """``rosetta serve``: how requests are batched and what one may ask for. Every
    limit a request breaks is answered with a JSON error that names it."""

    max_texts: int = Field(64, ge=1, description="texts per request (413)")
    max_chars: int = Field(2000, ge=1, description="characters per text (413)")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="request body (413)")
    max_beam: int = Field(16, ge=1, description="beam size and n-best (422)")
    max_attention_weights: int = Field(
        2_000_000, ge=0,
        description="attention weights one request may return, over its texts and kinds (413)",
    )  # fmt: skip
    max_search_items: int = Field(
        100_000, ge=0, description="search candidates and tree nodes one request may return (413)"
    )  # fmt: skip
    max_queue: int = Field(65536, ge=1, description="source subwords waiting (503 beyond)")
    batch_tokens: int = Field(4000, ge=1, description="source subwords decoded together at most")
    continuous: bool = Field(
        False,
        description="continuous batching (torch engine): a request's sentences join the running "
        "search within a few steps and leave it when they end (short requests do not wait for "
        "long ones); false: requests are grouped, each group decoded until its longest sentence "
        "ends (more throughput on a CPU: README, Serving)",
    )
    max_sentences: int = Field(
        64, ge=1, description="sentences decoded together at most (continuous batching)"
    )
    max_wait_ms: float = Field(
        20.0, ge=0.0, description="how long a group waits for requests still coming"
    )
    timeout_s: float = Field(30.0, gt=0.0, description="how long a request may wait in all (504)")
    glossaries: str = Field(
        "",
        description="glossaries requests may name: NAME=FILE[,NAME=FILE] (TSV files, "
        "as rosetta translate --glossary reads)",
    )
    max_glossary_terms: int = Field(
        1000, ge=0, description="terms in a glossary sent with a request (413)"
    )
    retry_after_s: int = Field(1, ge=1, description="the Retry-After of a 503")


class ExperimentConfig(Section):
    """One experiment: data, tokenizer, model, training and decoding."""

    experiment_dir: Path
    # a model directory this experiment starts from (fine-tuning): its tokenizer,
    # its architecture (``rosetta.modeldir.resolve_init``) and, at step 0, its weights
    init: Path | None = None
    data: DataConfig
    tokenizer: TokenizerConfig = TokenizerConfig()
    model: ModelConfig = Field(default_factory=TransformerConfig)
    train: TrainConfig = TrainConfig()
    decode: DecodeConfig = DecodeConfig()

    @field_validator("model", mode="before")
    @classmethod
    def _model_arch(cls, values: Any) -> Any:
        return _model_section(values)

    @model_validator(mode="after")
    def _objective_fits_the_model(self) -> ExperimentConfig:
        if self.train.scheduled_sampling is not None and self.model.arch == "nat":
            raise ValueError(
                "train.scheduled_sampling feeds a left-to-right decoder its own previous "
                "tokens; model.arch nat has no previous tokens (glancing is its counterpart)"
            )
        if self.train.sequence_level is not None:
            if self.model.arch == "nat":
                raise ValueError(
                    "train.sequence_level scores whole sentences a left-to-right decoder writes; "
                    "model.arch nat does not write left to right"
                )
            if self.train.scheduled_sampling is not None:
                raise ValueError(
                    "train.sequence_level and train.scheduled_sampling are two objectives: "
                    "set one of them"
                )
        return self

    def to_yaml(self) -> str:
        """The resolved configuration (presets expanded), as saved next to checkpoints."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


def parse_duration(text: str) -> float:
    """Parses ``90``, ``90s``, ``60m``, ``1.5h`` or ``1d`` into seconds."""
    match = _DURATION.match(str(text))
    if not match:
        raise ValueError(f"bad duration {text!r}: expected a number with s, m, h or d, e.g. 60m")
    value, unit = float(match.group(1)), match.group(2) or "s"
    return value * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


def format_error(error: ValidationError) -> str:
    """A validation error as lines ``  key: what is wrong``."""
    lines = []
    for item in error.errors():
        loc = list(item["loc"])
        arch = ""
        if len(loc) > 1 and loc[0] == "model" and loc[1] in ARCHITECTURES:
            arch = f" (for model.arch {loc.pop(1)})"  # the union's tag: say it, not as a key
        key = ".".join(str(part) for part in loc) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "missing":
            message = "required key is missing"
        lines.append(f"  {key}: {message}{arch}")
    return "\n".join(lines)


def _yaml_problem(error: Exception) -> str:
    """One line for a YAML error: what is wrong and where (line and column, 1-based)."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


# PyYAML raises ValueError or RecursionError on a few malformed scalars and on very
# deep nesting rather than a YAMLError; all of them mean "not valid YAML"
_YAML_ERRORS = (yaml.YAMLError, ValueError, RecursionError)


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Applies one ``a.b.c=value`` override in place; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"bad override {assignment!r}: expected key=value")
    key, raw = assignment.split("=", 1)
    parts = [part.strip() for part in key.split(".")]
    if not all(parts):
        raise ConfigError(f"bad override {assignment!r}: expected a key such as train.lr")
    try:
        value = yaml.safe_load(raw)
    except _YAML_ERRORS as error:
        raise ConfigError(
            f"bad override {assignment!r}: the value is not valid YAML: {_yaml_problem(error)}"
        ) from None
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"bad override {assignment!r}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def config_from_dict(data: dict[str, Any], source: str = "config") -> ExperimentConfig:
    """Validates a plain dict into an ``ExperimentConfig``, with readable errors."""
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"invalid configuration in {source}:\n{format_error(error)}") from None


def packaged_config(name: str) -> Path:
    """A configuration shipped inside the package (``toy.yaml``: the demo's), so that
    ``rosetta demo`` works from any directory."""
    return Path(str(resources.files("rosetta") / "configs" / name))


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Reads a YAML experiment file, applies ``key=value`` overrides and validates it."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a leading BOM is not YAML
    except OSError as error:
        raise ConfigError(f"cannot read configuration {path}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} is not UTF-8 text (byte {error.start + 1})") from None
    try:
        data = yaml.safe_load(text)
    except _YAML_ERRORS as error:
        raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(error)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (data, model, train, ...)")
    for assignment in overrides:
        apply_override(data, assignment)
    return config_from_dict(data, str(path))
