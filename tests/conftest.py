"""Shared fixtures: tiny experiments on the toy task, and the Multi30k location."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from rosetta.config import ExperimentConfig, config_from_dict

ROOT = Path(__file__).resolve().parents[1]
MULTI30K = ROOT.parent / "shared" / "data" / "multi30k"


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(2)


def toy_config(experiment_dir: Path, **sections) -> ExperimentConfig:
    """A small toy-task experiment; keyword arguments update the sections."""
    data = {
        "experiment_dir": str(experiment_dir),
        "data": {
            "toy": {"seed": 1, "train_size": 3000, "valid_size": 100, "test_size": 100},
            "src_lang": "en",
            "tgt_lang": "zeta",
        },
        "tokenizer": {"vocab_size": 300, "byte_fallback": False},
        "model": {
            "d_model": 32,
            "d_ff": 64,
            "heads": 2,
            "encoder_layers": 1,
            "decoder_layers": 1,
            "max_positions": 128,
        },
        "train": {
            "max_tokens": 1024,
            "lr": 2e-3,
            "warmup": 20,
            "schedule": "inverse_sqrt",
            "max_steps": 12,
            "valid_every": 4,
            "log_every": 2,
            "valid_bleu_size": 10,
        },
        "decode": {"beam": 2},
    }
    for section, values in sections.items():
        data[section].update(values)
    if data["model"].get("arch") == "rnn":  # the Transformer's sizes do not apply
        for key in ("d_ff", "heads"):
            data["model"].pop(key, None)
    return config_from_dict(data)


def quiet(*_args, **_kwargs) -> None:
    """A ``log`` that says nothing."""


def copy_prepared(prepared: Path, dest: Path) -> Path:
    """The same generated corpus, tokenizer and cached data in another experiment folder."""
    for name in ("corpus", "tokenizer", "data"):
        shutil.copytree(prepared / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A prepared ``toy_config`` experiment, for tests to copy with ``copy_prepared``."""
    from rosetta.data.prepare import prepare

    exp = tmp_path_factory.mktemp("base")
    prepare(toy_config(exp), log=quiet)
    return exp


def learning_config(experiment_dir: Path, **model) -> ExperimentConfig:
    """A toy experiment a tiny model learns well in well under a minute on 2 cores."""
    return toy_config(
        experiment_dir,
        data={"toy": {"seed": 1, "train_size": 8000, "valid_size": 100, "test_size": 200}},
        model={
            "d_model": 64,
            "d_ff": 256,
            "heads": 4,
            "encoder_layers": 2,
            "decoder_layers": 2,
            **model,
        },
        train={
            "max_tokens": 3000,
            "lr": 3e-3,
            "warmup": 60,
            "max_steps": 350,
            "valid_every": 350,
            "valid_bleu_size": 100,
            "log_every": 50,
        },
    )


@pytest.fixture(scope="session")
def toy_model_dir(tmp_path_factory) -> Path:
    """A Transformer trained on the toy task once per test session."""
    from rosetta.data.prepare import prepare
    from rosetta.train.trainer import train

    torch.set_num_threads(2)
    config = learning_config(tmp_path_factory.mktemp("toy_model") / "exp")
    prepare(config, log=lambda _: None)
    return train(config, log=lambda _: None)


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory) -> Path:
    """A tiny Transformer trained a few steps on the toy task (seed 1): a model
    directory to start from (``init``), with its prepared experiment beside it."""
    from rosetta.data.prepare import prepare
    from rosetta.train.trainer import train

    config = toy_config(tmp_path_factory.mktemp("pretrained") / "exp", train={"max_steps": 4})
    prepare(config, log=quiet)
    return train(config, log=quiet)


@pytest.fixture(scope="session")
def untrained_model_dir(tmp_path_factory) -> Path:
    """An untrained tiny Transformer (max_positions 24) with a toy-task tokenizer, for
    tests where only the plumbing matters: line counts, long inputs, errors."""
    from rosetta.data.prepare import prepare
    from rosetta.data.tokenizer import Tokenizer
    from rosetta.model import build_model
    from rosetta.modeldir import save_model_dir

    exp = tmp_path_factory.mktemp("untrained") / "exp"
    config = toy_config(
        exp,
        data={"toy": {"seed": 1, "train_size": 400, "valid_size": 20, "test_size": 20}},
        model={"max_positions": 24},
    )
    prepare(config, log=lambda _: None)
    tokenizer = Tokenizer.load(exp / "tokenizer")
    torch.manual_seed(0)
    model = build_model(config.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
    return save_model_dir(exp / "model", config, exp / "tokenizer", model.eval(), {})


HEAD_ROLES = {
    "positional": "attends to a fixed offset (the previous or next token)",
    "rare-word": "attends to the rarest token of the sentence",
    "alignment": "attends to the source word being translated",
    "local": "attends within a few tokens",
    "diffuse": "spreads its attention widely",
    "mixed": "none of the above",
}


def heads_report(model_dir: Path, pruned: tuple[tuple[str, int, int], ...] = ()) -> dict:
    """A ``heads.json`` (version 1) for every attention head of ``model_dir``'s
    model, kinds, layers and heads read from its config: roles in turn, made-up
    numbers; the heads in ``pruned`` ((kind, layer, head)) marked pruned, the
    indices of the others in their layer closing up."""
    from rosetta.config import load_config

    model = load_config(model_dir / "config.yaml").model
    if model.arch == "rnn":
        shape = {"cross": (1, 1)}
    else:
        shape = {
            "encoder_self": (model.encoder_layers, model.heads),
            "decoder_self": (model.decoder_layers, model.heads),
            "cross": (model.decoder_layers, model.heads),
        }
    roles, heads = list(HEAD_ROLES), []
    for kind, (layers, count) in shape.items():
        for layer in range(layers):
            index = 0
            for head in range(count):
                gone = (kind, layer, head) in pruned
                number = len(heads)
                heads.append({
                    "kind": kind, "layer": layer, "head": head,
                    "index": None if gone else index,
                    "role": roles[number % len(roles)],
                    "detail": "previous token" if number % len(roles) == 0 else "",
                    "confidence": 0.5 + number / 100, "entropy": 1.0, "distance": 1.5,
                    "importance": {
                        "masking_bleu": None if number % 3 == 2 else round(0.1 * number, 2),
                        "masking_nll": 0.031,
                        "gradient": round(0.5 + 0.01 * number, 2),
                    },
                    "pruned": gone,
                })  # fmt: skip
                index += not gone
    return {
        "version": 1,
        "model": model_dir.name,
        "arch": "rnn" if model.arch == "rnn" else "transformer",
        "sentences": 20,
        "thresholds": {"positional": 0.5, "rare-word": 0.4, "alignment": 0.3},
        "roles": HEAD_ROLES,
        "heads": heads,
    }


def batch_of(sources: list[list[int]], targets: list[list[int]]):
    """A training batch of id lists (no <bos>/<eos> given: they are added)."""
    from rosetta.data.batching import Batch
    from rosetta.data.tokenizer import BOS_ID, EOS_ID, PAD_ID

    def pad(rows: list[list[int]]) -> torch.Tensor:
        width = max(len(r) for r in rows)
        return torch.tensor([r + [PAD_ID] * (width - len(r)) for r in rows])

    return Batch(
        src=pad(sources),
        src_lengths=torch.tensor([len(s) for s in sources]),
        tgt_in=pad([[BOS_ID, *t] for t in targets]),
        tgt_out=pad([[*t, EOS_ID] for t in targets]),
        indices=torch.arange(len(sources)),
    )


@pytest.fixture(scope="session")
def distilled_toy(toy_model_dir, tmp_path_factory) -> Path:
    """The tiny AR teacher's translations of its own training set (sequence-level
    distillation), once per session: the training set of the NAT tests."""
    from rosetta.decode.distill import distill
    from rosetta.decode.translator import Translator

    teacher_config = learning_config(toy_model_dir.parent)  # the teacher's own corpus
    target = tmp_path_factory.mktemp("distilled") / "distilled"
    return distill(Translator.load(toy_model_dir, beam=2), toy_model_dir, teacher_config,
                   target, log=quiet)  # fmt: skip


def train_on_distilled(distilled: Path, experiment_dir: Path, **model) -> Path:
    """A tiny NAT (``model``: its keys beside ``arch: nat``) trained 600 updates on a
    distilled set; its model directory."""
    from rosetta.data.prepare import prepare
    from rosetta.train.trainer import train

    config = learning_config(experiment_dir, arch="nat", **model)
    data = config.data.model_copy(
        update={"root": distilled, "toy": None, "train": "train", "valid": "valid", "test": "test"}
    )
    train_section = config.train.model_copy(update={"max_steps": 600, "valid_every": 600})
    config = config.model_copy(update={"data": data, "train": train_section})
    prepare(config, log=quiet)
    return train(config, log=quiet)
