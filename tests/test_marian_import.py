"""``rosetta import marian``: an OPUS-MT model in HuggingFace's layout, converted,
computes what ``transformers`` computes.

No hub is reachable here: each test model is a small random ``MarianMTModel``
with SentencePiece models trained on a little generated text, saved in the hub
layout (config.json, weights, source.spm, target.spm, vocab.json). Logits agree
within 1e-4 (float32, different kernels), and greedy and beam-5 outputs are the
same tokens.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
import torch

transformers = pytest.importorskip("transformers")

from rosetta.decode.translator import Translator  # noqa: E402
from rosetta.importers.marian import MarianImportError, import_marian  # noqa: E402
from rosetta.modeldir import load_model_dir  # noqa: E402

WORDS = {
    "src": "the a dog cat runs sees big small red ball house river old man woman child",
    "tgt": "der die das Hund Katze läuft sieht groß klein rot Ball Haus Fluss alt Mann",
}
ARCHITECTURES = {
    # name: (config.json options, weight file format)
    "swish_tied": (dict(activation_function="swish", encoder_layers=2, decoder_layers=1), True),
    "relu_untied_output": (
        dict(activation_function="relu", encoder_layers=1, decoder_layers=2,
             tie_word_embeddings=False),
        False,
    ),
    "gelu_separate_embeddings": (
        dict(activation_function="gelu", encoder_layers=2, decoder_layers=2,
             share_encoder_decoder_embeddings=False, encoder_attention_heads=4,
             decoder_attention_heads=4),
        True,
    ),
}  # fmt: skip


def sentences(side: str, n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    words = WORDS[side].split()
    return [" ".join(rng.choice(words, size=rng.integers(2, 8))) for _ in range(n)]


def train_spm(side: str, path) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences(side, 400, 1)),
        model_prefix=str(path),
        model_type="unigram",
        vocab_size=50,
        minloglevel=2,
        hard_vocab_limit=False,
    )  # Marian's ids: <unk> 0, <s> 1, </s> 2


def marian_folder(tmp_path, name: str) -> tuple:
    """A random Marian model of architecture ``name`` in the hub layout."""
    options, safetensors = ARCHITECTURES[name]
    folder = tmp_path / name
    folder.mkdir()
    for side, file in (("src", "source"), ("tgt", "target")):
        train_spm(side, tmp_path / f"{name}_{side}")
        (folder / f"{file}.spm").write_bytes((tmp_path / f"{name}_{side}.model").read_bytes())
    pieces = ["</s>", "<unk>"]
    for file in ("source", "target"):
        processor = spm.SentencePieceProcessor(model_file=str(folder / f"{file}.spm"))
        for i in range(processor.get_piece_size()):
            piece = processor.id_to_piece(i)
            if not (processor.is_control(i) or processor.is_unknown(i)) and piece not in pieces:
                pieces.append(piece)
    pieces.append("<pad>")
    vocab = {piece: i for i, piece in enumerate(pieces)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    pad = vocab["<pad>"]
    sizes = dict(
        d_model=16, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2,
        decoder_attention_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    # init_std 0.3 (not 0.02): weights large enough that the output depends on the
    # source, so that a wrongly mapped encoder could not pass unseen
    config = transformers.MarianConfig(
        vocab_size=len(vocab), pad_token_id=pad, eos_token_id=0, decoder_start_token_id=pad,
        scale_embedding=True, init_std=0.6, **{**sizes, **options},
    )  # fmt: skip
    torch.manual_seed(len(name))
    model = transformers.MarianMTModel(config).eval()
    bias = 0.1 * torch.randn(1, len(vocab))  # random, so that the rows' order is tested too
    tokenizer = transformers.MarianTokenizer(
        source_spm=str(folder / "source.spm"),
        target_spm=str(folder / "target.spm"),
        vocab=str(folder / "vocab.json"),
    )
    probes = [tokenizer(text, return_tensors="pt") for text in sentences("src", 16, 11)]
    for boost in range(12):  # the smallest </s> bias with which most outputs end by themselves
        model.final_logits_bias.copy_(bias + torch.eye(1, len(vocab)) * boost)
        with torch.no_grad():
            lengths = [
                model.generate(
                    **probe, do_sample=False, max_new_tokens=40, bad_words_ids=[[pad]]
                ).size(1)
                - 2
                for probe in probes
            ]
        ended = [n for n in lengths if n < 39]
        if len(ended) >= 8:
            break
    model.save_pretrained(folder)
    if not safetensors:  # the older format, which transformers 5 no longer writes
        (folder / "model.safetensors").unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder, model, vocab


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def imported(request, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("marian")
    folder, model, vocab = marian_folder(tmp_path, request.param)
    out = import_marian(folder, tmp_path / "rosetta", "en", "de", log=lambda _: None)
    return folder, model, vocab, out


def marian_ids(tokenizer, ids: list[int], vocab: dict[str, int]) -> list[int]:
    """rosetta ids as Marian's, through the pieces."""
    names = {"<eos>": "</s>", "<unk>": "<unk>", "<pad>": "<pad>"}
    return [vocab[names.get(piece, piece)] for piece in tokenizer.target_pieces(ids)]


def test_weights_in_the_expected_format(imported):
    folder, *_ = imported
    files = {path.name for path in folder.iterdir()}
    assert files & {"model.safetensors", "pytorch_model.bin"}


def test_tokenisation_is_marians(imported):
    folder, _, vocab, out = imported
    tokenizer = load_model_dir(out)[1]
    hf = transformers.MarianTokenizer(
        source_spm=str(folder / "source.spm"),
        target_spm=str(folder / "target.spm"),
        vocab=str(folder / "vocab.json"),
    )
    for text in [*sentences("src", 20, 7), "a dog sees an unseen zebra"]:
        ours = tokenizer.encode_source([text])[0]
        assert ours[-1] == 3  # </s> ends every source, as Marian's
        assert marian_ids(tokenizer, ours, vocab) == hf(text)["input_ids"]


def test_logits_equal_transformers(imported):
    _, model, vocab, out = imported
    _, tokenizer, ours = load_model_dir(out)
    sources = [tokenizer.encode_source([t])[0] for t in sentences("src", 4, 3)]
    targets = [tokenizer.encode_target([t])[0] for t in sentences("tgt", 4, 4)]
    for src, tgt in zip(sources, targets):
        tgt_in = [2, *tgt]  # rosetta's <bos>: Marian's decoder start token
        with torch.no_grad():
            logits = ours(torch.tensor([src]), torch.tensor([tgt_in]))[0]
            reference = model(
                input_ids=torch.tensor([marian_ids(tokenizer, src, vocab)]),
                decoder_input_ids=torch.tensor(
                    [[vocab["<pad>"], *marian_ids(tokenizer, tgt, vocab)]]
                ),
            ).logits[0]
        rows = [i for i in range(logits.size(1)) if i != 2]  # <bos> is never predicted
        columns = marian_ids(tokenizer, rows, vocab)
        difference = (logits[:, rows] - reference[:, columns]).abs().max().item()
        assert difference < 1e-4, difference
        with torch.no_grad():  # the source matters: another one changes the logits
            other = ours(torch.tensor([sources[0] if src != sources[0] else sources[1]]),
                         torch.tensor([tgt_in]))[0]  # fmt: skip
        assert (other - logits).abs().max() > 0.1


@pytest.mark.parametrize("beam", [1, 5])
def test_outputs_equal_transformers_generate(imported, beam):
    """Every output that ends by itself within 40 tokens is the same; one that runs to
    the limit (a random model may loop) has the same first 39 tokens under greedy
    search (transformers forces </s> as the 40th)."""
    _, model, vocab, out = imported
    translator = Translator.load(out, beam=beam, length_penalty=0.0, max_len_a=0, max_len_b=60)
    tokenizer = translator.tokenizer
    compared = []  # tokens compared, by sentence
    for text in sentences("src", 16, 11):
        ids = marian_ids(tokenizer, tokenizer.encode_source([text])[0], vocab)
        generated = model.generate(
            torch.tensor([ids]),
            num_beams=beam,
            do_sample=False,
            max_new_tokens=40,
            length_penalty=0.0,
            early_stopping=False,  # at length penalty 0, exactly rosetta's stopping rule
            bad_words_ids=[[vocab["<pad>"]]],
        )[0].tolist()[1:]  # without the start token
        found = translator.search_ids([tokenizer.encode_source([text])[0]])[0].hypotheses[0]
        ours = marian_ids(tokenizer, [t for t in found.tokens if t != 3], vocab)
        if len(generated) < 40:  # ended by </s>
            assert ours == generated[:-1], text
            compared.append(len(ours))
        elif beam == 1:
            assert ours[:39] == generated[:39], text
            compared.append(39)
    assert len(compared) >= 6, compared  # (beam search favours short outputs: some are empty)
    assert beam > 1 or sum(n > 0 for n in compared) >= 3, compared


def test_the_imported_directory_translates_from_the_command_line(imported, tmp_path):
    *_, out = imported
    source = tmp_path / "in.txt"
    source.write_text("\n".join(sentences("src", 5, 21)) + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "rosetta", "translate", str(out), "-i", str(source)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 5


def test_ctranslate2_export_of_an_import_translates_the_same(imported, tmp_path):
    pytest.importorskip("ctranslate2")
    from rosetta.export.ctranslate2 import export_ctranslate2

    *_, out = imported
    exported = export_ctranslate2(out, tmp_path / "ct2")
    texts = sentences("src", 8, 31)
    ours = Translator.load(out, beam=1).translate(texts)
    theirs = Translator.load(exported, engine="ctranslate2", beam=1).translate(texts)
    assert [t.text for t in ours] == [t.text for t in theirs]


# ---- refusals -------------------------------------------------------------------------


@pytest.fixture()
def folder(tmp_path):
    return marian_folder(tmp_path, "swish_tied")[0]


def test_a_missing_source_spm_is_refused(folder, tmp_path):
    (folder / "source.spm").unlink()
    with pytest.raises(MarianImportError, match=r"source\.spm is missing"):
        import_marian(folder, tmp_path / "out", log=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_a_vocabulary_that_does_not_fit_the_weights_is_refused(folder, tmp_path):
    vocab = json.loads((folder / "vocab.json").read_text())
    del vocab[max(vocab, key=vocab.get)]
    (folder / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(MarianImportError, match=r"pieces but config\.json's vocab_size is"):
        import_marian(folder, tmp_path / "out", log=lambda _: None)


@pytest.mark.parametrize(
    "option, message",
    [
        ({"some_new_option": 1}, "option.s. this import does not map: some_new_option"),
        ({"activation_function": "gelu_new"}, "activation_function 'gelu_new' is not supported"),
        ({"normalize_before": True}, "normalize_before = True is not supported"),
        ({"decoder_ffn_dim": 64}, "encoder_ffn_dim = 32 and decoder_ffn_dim = 64 differ"),
    ],
)
def test_an_option_the_import_does_not_map_is_refused(folder, tmp_path, option, message):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **option}))
    with pytest.raises(MarianImportError, match=message):
        import_marian(folder, tmp_path / "out", log=lambda _: None)


def test_a_pickle_that_runs_code_is_not_loaded(folder, tmp_path):
    (folder / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, folder / "pytorch_model.bin")
    with pytest.raises(MarianImportError, match="cannot be read as plain tensors"):
        import_marian(folder, tmp_path / "out", log=lambda _: None)


def test_the_imported_directory_evaluates_explains_and_serves(imported, tmp_path):
    from fastapi.testclient import TestClient

    from rosetta.config import ServeConfig
    from rosetta.serve.app import create_app
    from rosetta.serve.service import TranslationService

    *_, out = imported
    texts = sentences("src", 4, 41)
    (tmp_path / "src.txt").write_text("\n".join(texts) + "\n")
    (tmp_path / "ref.txt").write_text("\n".join(sentences("tgt", 4, 42)) + "\n")
    rosetta = [sys.executable, "-m", "rosetta"]
    done = subprocess.run(
        [*rosetta, "evaluate", str(out), "--src", str(tmp_path / "src.txt"),
         "--ref", str(tmp_path / "ref.txt")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0 and "BLEU" in done.stdout, done.stderr
    done = subprocess.run(
        [*rosetta, "attention", str(out), "--src", texts[0], "--format", "json"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    attention = json.loads(done.stdout)
    assert attention["columns"][-1] == "<eos>"  # Marian's </s> ends the source
    service = TranslationService.load(out, config=ServeConfig(max_wait_ms=10))
    with TestClient(create_app(service)) as client:
        request = {"text": texts, "beam": 3, "nbest": 2, "return_search": True}
        body = client.post("/v1/translate", json=request).json()
        assert len(body["translations"]) == 4
        assert all(len(t["hypotheses"]) == 2 for t in body["translations"])
        assert client.get("/").status_code == 200  # the page
