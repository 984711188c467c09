"""``GET /v1/heads``: a model directory's ``heads.json`` (``rosetta heads``), served
as written, checked when the service loads, a 404 that says how to make one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from conftest import heads_report, toy_config
from rosetta.config import ServeConfig, load_config
from rosetta.serve.app import create_app
from rosetta.serve.service import TranslationService, load_heads

COMMAND = "rosetta heads MODEL_DIR --src FILE --ref FILE -o MODEL_DIR"


@pytest.fixture
def model_dir(untrained_model_dir, tmp_path) -> Path:
    """A copy of the untrained tiny Transformer (2 heads, 1 + 1 layers) to write into."""
    return Path(shutil.copytree(untrained_model_dir, tmp_path / "model"))


@pytest.fixture(scope="module")
def rnn_model_dir(untrained_model_dir, tmp_path_factory) -> Path:
    """An untrained tiny RNN with the untrained Transformer's tokenizer."""
    import torch

    from rosetta.data.tokenizer import Tokenizer
    from rosetta.model import build_model
    from rosetta.modeldir import save_model_dir

    tokenizer_dir = untrained_model_dir.parent / "tokenizer"
    config = toy_config(
        tmp_path_factory.mktemp("rnn") / "exp",
        data={"toy": {"seed": 1, "train_size": 400, "valid_size": 20, "test_size": 20}},
        model={"arch": "rnn", "hidden_size": 32, "max_positions": 24},
    )
    tokenizer = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    model = build_model(config.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
    return save_model_dir(config.experiment_dir / "model", config, tokenizer_dir, model.eval(), {})


def get(model_dir: Path, path: str):
    service = TranslationService.load(model_dir, config=ServeConfig(max_wait_ms=1))
    with TestClient(create_app(service)) as client:
        return client.get(path), client.get("/v1/model").json()["features"]


def test_no_heads_json_is_a_404_that_says_how_to_make_one(model_dir):
    answer, features = get(model_dir, "/v1/heads")
    assert answer.status_code == 404
    body = answer.json()
    assert set(body) == {"error", "status"} and body["status"] == 404
    assert COMMAND in body["error"] and "heads.json" in body["error"]
    assert features["heads"] is False


def test_heads_json_is_served_as_written(model_dir):
    report = heads_report(model_dir, pruned=(("cross", 0, 1),))
    (model_dir / "heads.json").write_text(json.dumps(report), encoding="utf-8")
    answer, features = get(model_dir, "/v1/heads")
    assert answer.status_code == 200 and answer.json() == report
    assert features["heads"] is True
    # every head of the tiny model: 2 heads in each of 3 kinds x 1 layer, one pruned
    assert len(report["heads"]) == 6
    assert [h["index"] for h in report["heads"] if h["kind"] == "cross"] == [0, None]


def test_an_rnn_has_one_alignment_head(rnn_model_dir):
    report = heads_report(rnn_model_dir)
    assert [(h["kind"], h["layer"], h["head"], h["index"]) for h in report["heads"]] == [
        ("cross", 0, 0, 0)
    ]
    model = load_config(rnn_model_dir / "config.yaml").model
    assert load_heads_written(rnn_model_dir, report, model) == report


def load_heads_written(model_dir: Path, content: dict | str, model) -> dict | None:
    text = content if isinstance(content, str) else json.dumps(content)
    (model_dir / "heads.json").write_text(text, encoding="utf-8")
    return load_heads(model_dir, model)


def head(number: int, **values):
    """A change: heads[number] updated with ``values``."""
    return lambda report: report["heads"][number].update(values)


CASES = {  # a valid report of the tiny Transformer, changed: what the error says
    "version": (lambda r: r.update(version=2), "invalid {path}: version: Input should be 1"),
    "a missing key": (lambda r: r.pop("roles"), "invalid {path}: roles: Field required"),
    "an unknown key": (head(0, colour="red"), "invalid {path}: heads.0.colour: unknown key"),
    "a role not described": (head(1, role="copying"), "role 'copying' is not one of roles"),
    "a pruned head with an index": (head(2, pruned=True), "heads.2: a pruned head has index null"),
    "a layer the model lacks": (
        head(3, layer=1),
        "heads.3: decoder_self layer 1 head 1: this model has 1 decoder_self layers",
    ),
    "an index past the layer's heads": (head(4, index=2), "index 2, but the layer has 2 heads"),
    "another architecture": (
        lambda r: r.update(arch="rnn"),
        "it describes an rnn model; this one is transformer",
    ),
    "a head twice": (
        lambda r: r["heads"].append(dict(r["heads"][0])),
        "encoder_self layer 0 head 0 twice",
    ),
    "not finite": (head(0, entropy=float("nan")), "heads.0.entropy: Input should be a finite"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_a_heads_json_that_does_not_fit_is_a_one_line_error(model_dir, case):
    change, expected = CASES[case]
    model = load_config(model_dir / "config.yaml").model
    report = heads_report(model_dir)
    change(report)
    with pytest.raises(ValueError) as error:
        load_heads_written(model_dir, report, model)
    message = str(error.value)
    assert "\n" not in message and str(model_dir / "heads.json") in message
    assert expected.format(path=model_dir / "heads.json") in message


def test_a_heads_json_that_is_not_json_is_a_one_line_error(model_dir):
    model = load_config(model_dir / "config.yaml").model
    with pytest.raises(ValueError) as error:
        load_heads_written(model_dir, json.dumps(heads_report(model_dir))[:-1], model)
    assert str(error.value).startswith(f"cannot read {model_dir / 'heads.json'}: Expecting")
    assert "\n" not in str(error.value)


def test_rosetta_serve_refuses_a_bad_heads_json_in_one_line(model_dir, capsys):
    from rosetta.cli import main

    report = heads_report(model_dir)
    report["heads"][0]["role"] = "copying"
    (model_dir / "heads.json").write_text(json.dumps(report), encoding="utf-8")
    assert main(["serve", str(model_dir), "--port", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"rosetta serve: error: invalid {model_dir / 'heads.json'}: "
        "heads.0: role 'copying' is not one of roles"
    ]
