"""CTranslate2 export: the converted model computes what rosetta computes."""

from __future__ import annotations

import pytest
import torch

from conftest import toy_config
from rosetta.cli import main
from rosetta.config import ModelConfig
from rosetta.data.prepare import prepare
from rosetta.data.tokenizer import BOS_ID, EOS_ID, Tokenizer
from rosetta.decode.translator import SearchOptions, Translator
from rosetta.model import build_model
from rosetta.modeldir import save_model_dir

ctranslate2 = pytest.importorskip("ctranslate2")

from rosetta.export.ctranslate2 import CTranslate2Translator, export_ctranslate2  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    exp = tmp_path_factory.mktemp("tok")
    config = toy_config(exp, data={"toy": {"train_size": 500, "valid_size": 20, "test_size": 20}})
    prepare(config, log=lambda _: None)
    return config, exp / "tokenizer"


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"norm": "post"},
        {"activation": "gelu", "positional": "learned"},
        {"tie_output": False, "tie_all": False},
    ],
)
def test_converted_model_scores_like_rosetta(tokenizer_dir, tmp_path, variant):
    config, tok_dir = tokenizer_dir
    tokenizer = Tokenizer.load(tok_dir)
    torch.manual_seed(0)
    cfg = ModelConfig(
        d_model=32,
        d_ff=64,
        heads=4,
        encoder_layers=2,
        decoder_layers=2,
        max_positions=64,
        **variant,
    )
    model = build_model(cfg, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size).eval()
    config = config.model_copy(update={"model": cfg})
    model_dir = save_model_dir(tmp_path / "model", config, tok_dir, model, {})
    export_dir = export_ctranslate2(model_dir, tmp_path / "ct2")

    source = "the big dog sees two cats."
    target = "la kano granda du katojn vidas."
    src_ids = tokenizer.encode_source([source])[0]
    tgt_ids = tokenizer.encode_target([target])[0]
    with torch.no_grad():
        logits = model(torch.tensor([src_ids]), torch.tensor([[BOS_ID, *tgt_ids]]))
    expected = logits.log_softmax(-1)[0].gather(1, torch.tensor([*tgt_ids, EOS_ID])[:, None])
    engine = ctranslate2.Translator(str(export_dir), device="cpu")
    scored = engine.score_batch(
        [tokenizer.source_pieces(src_ids)], [tokenizer.target_pieces(tgt_ids)]
    )[0]
    torch.testing.assert_close(
        torch.tensor(scored.log_probs), expected.squeeze(1), atol=2e-4, rtol=1e-4
    )


@pytest.mark.slow
def test_ctranslate2_greedy_output_equals_rosetta_greedy(toy_model_dir, tmp_path, capsys):
    export_dir = tmp_path / "ct2"
    assert main(["export", str(toy_model_dir), str(export_dir)]) == 0
    corpus = toy_model_dir.parent / "corpus"
    sources = (corpus / "test.en").read_text(encoding="utf-8").splitlines()
    ours = [t.text for t in Translator.from_model_dir(toy_model_dir, beam=1).translate(sources)]
    engine = CTranslate2Translator(export_dir, SearchOptions(beam=1))
    theirs = [t.text for t in engine.translate(sources)]
    same = sum(a == b for a, b in zip(ours, theirs))
    assert same >= 0.99 * len(sources)
    capsys.readouterr()
    (tmp_path / "in.en").write_text("\n".join(sources[:5]) + "\n", encoding="utf-8")
    args = ["translate", str(export_dir), "--engine", "ctranslate2", "-i", str(tmp_path / "in.en")]
    assert main([*args, "--beam", "1"]) == 0
    assert capsys.readouterr().out.splitlines() == ours[:5]


@pytest.mark.slow
def test_dynamic_int8_quantization_still_translates_the_toy_task(toy_model_dir, capsys):
    corpus = toy_model_dir.parent / "corpus"
    args = ["evaluate", str(toy_model_dir), "--src", str(corpus / "test.en")]
    assert main([*args, "--ref", str(corpus / "test.zeta"), "--quantize", "int8"]) == 0
    bleu = float(capsys.readouterr().out.split()[2])
    assert bleu > 90
