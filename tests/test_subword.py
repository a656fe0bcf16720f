"""The optional subword tokenizer (``data.tokenizer = "bpe:N"``): a byte-level BPE trained
offline on the run's corpus, in zoo's id layout, saved once in the workdir and reused."""
from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

import zoo.config
import zoo.train
from objectives.mlm import mlm_mask
from zoo.text import BYTE_OFFSET, MASK, NUM_SENTINELS, VOCAB_SIZE, ByteTokenizer, subword

pytest.importorskip("tokenizers")   # the `subword` extra; the test extra installs it

ROOT = Path(__file__).resolve().parents[1]
TEXT = f"{ROOT / 'experiments' / 'text_pycode.py'}"
CODE = [open(f, encoding="utf-8").read()
        for f in sorted(glob.glob(os.path.join(os.path.dirname(json.__file__), "*.py")))]


@pytest.fixture(scope="module")
def bpe():
    return subword.train_bpe(CODE, 600)


def test_specs_and_vocabulary_sizes():
    assert subword.parse("byte") == ("byte", None)
    assert subword.parse("bpe:4096") == ("bpe", 4096)
    assert subword.vocab_size("byte") == VOCAB_SIZE
    # specials + pieces + sentinels, as the byte layout (7 + 256 + 100)
    assert subword.vocab_size("bpe:1000") == BYTE_OFFSET + 1000 + NUM_SENTINELS
    for bad in ("bpe", "bpe:100", "bpe:x", "wordpiece", "byte:3"):
        with pytest.raises(ValueError, match=r"^data.tokenizer: unknown .*allowed: 'byte' or"):
            subword.parse(bad)
    with pytest.raises(ValueError, match="data.tokenizer"):
        zoo.config.load(TEXT + ":mlm,tiny", ["data.tokenizer=bpe"])


def test_round_trip_and_id_layout(bpe):
    assert bpe.vocab_size == BYTE_OFFSET + 600 + NUM_SENTINELS
    texts = ["def f(x):\n    return x  # é ünïcode ✓", "", "\t\n  ", "x" * 50, CODE[0][:3000]]
    for text in texts:
        ids = bpe.encode(text)
        assert ids.dtype == np.int32
        assert bpe.decode(ids) == text
        # Only pieces: never a special id or a sentinel.
        assert ids.size == 0 or (ids.min() >= BYTE_OFFSET
                                 and ids.max() < bpe.vocab_size - NUM_SENTINELS)
    # Subwords compress code well beyond one token per byte.
    sample = "\n".join(CODE)[:20000]
    assert len(bpe.encode(sample)) < 0.6 * len(sample.encode("utf-8"))


def test_decode_shows_sentinels_and_mask_and_drops_pad_eos(bpe):
    ids = bpe.encode("return x")
    row = np.concatenate([[MASK], ids, [bpe.vocab_size - 1, bpe.vocab_size - 2, 0, 1]])
    assert bpe.decode(row) == "<mask>return x<extra_id_0><extra_id_1>"


def test_training_is_deterministic_and_serialises(bpe):
    again = subword.train_bpe(CODE, 600)
    assert again.to_json() == bpe.to_json()
    loaded = subword.SubwordTokenizer.from_json(bpe.to_json())
    text = CODE[1][:2000]
    np.testing.assert_array_equal(loaded.encode(text), bpe.encode(text))


def test_mlm_random_tokens_cover_the_pieces_not_only_bytes():
    vocab = subword.vocab_size("bpe:1000")
    tokens = np.full((4, 256), BYTE_OFFSET + 900, np.int32)   # a high piece id, not a byte
    out = mlm_mask(tokens, jax.random.key(0), rate=1.0, max_predictions=256, mask_prob=0.0,
                   random_prob=1.0, vocab_size=vocab)
    randoms = np.asarray(out.inputs)
    assert randoms.min() >= BYTE_OFFSET and randoms.max() < vocab - NUM_SENTINELS
    assert (randoms >= BYTE_OFFSET + 256).mean() > 0.5   # most of the 1000 pieces are not bytes


def test_bart_random_tokens_cover_the_pieces():
    from objectives.bart import bart_noise
    vocab = subword.vocab_size("bpe:1000")
    tokens = np.full((8, 128), BYTE_OFFSET + 900, np.int32)
    noised, lengths = bart_noise(tokens, jax.random.key(1), mask_ratio=0.5, random_ratio=1.0,
                                 permute_sentences=0.0, insert_ratio=0.2,
                                 num_random_tokens=vocab - BYTE_OFFSET - NUM_SENTINELS)
    noised = np.asarray(noised)
    content = noised[np.arange(noised.shape[1]) < np.asarray(lengths)[:, None]]
    randoms = content[content != BYTE_OFFSET + 900]
    assert randoms.size > 100 and randoms.min() >= BYTE_OFFSET
    assert randoms.max() < vocab - NUM_SENTINELS and (randoms >= BYTE_OFFSET + 256).mean() > 0.5


def test_byte_only_options_and_modalities_are_refused():
    cases = [(":mlm,tiny", ["objective.whole_word=True"], "objective.whole_word"),
             (":bart,tiny", [], "objective.permute_sentences"),
             (":bart,tiny", ["objective.permute_sentences=0"], None),
             (":span_corruption,tiny", ["objective.noise_density=0.15"], None)]
    for arg, settings, error in cases:
        config = zoo.config.load(TEXT + arg, ["data.tokenizer=bpe:300", *settings])
        if error is None:
            assert zoo.train.build(config).objective.vocab_size == 7 + 300 + 100
            continue
        with pytest.raises(ValueError, match=rf"^{error}: .*allowed with it"):
            zoo.train.build(config)
    image = zoo.config.load(f"{ROOT / 'experiments' / 'mae_digits.py'}:tiny",
                            ["data.tokenizer=bpe:300"])
    with pytest.raises(ValueError, match=r"^data.tokenizer: 'bpe:300' is for text objectives"):
        zoo.train.build(image)


def test_the_workdir_keeps_its_tokenizer(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(subword, "TRAIN_CHARS", 300_000)
    data = zoo.config.DataConfig(name="pycode", tokenizer="bpe:400")
    assert isinstance(subword.tokenizer_for(zoo.config.DataConfig(name="pycode")), ByteTokenizer)
    first = subword.tokenizer_for(data, str(tmp_path))
    path = tmp_path / subword.TOKENIZER_FILE
    saved = path.read_text()
    assert json.loads(saved)["num_pieces"] == 400 and first.vocab_size == 7 + 400 + 100

    def no_training(*args, **kwargs):
        raise AssertionError("a workdir with a tokenizer must not train another")

    monkeypatch.setattr(subword, "train_bpe", no_training)
    second = subword.tokenizer_for(data, str(tmp_path))
    assert path.read_text() == saved
    np.testing.assert_array_equal(second.encode("import os\n"), first.encode("import os\n"))
    other = zoo.config.DataConfig(name="pycode", tokenizer="bpe:500")
    with pytest.raises(ValueError, match=r"^data.tokenizer: 'bpe:500', but .* holds 400 pieces"):
        subword.tokenizer_for(other, str(tmp_path))
    assert path.read_text() == saved   # never overwritten


@pytest.mark.slow   # three compilations of a new vocabulary's programs (~80 s)
def test_a_bpe_run_trains_saves_resumes_and_probes_with_its_tokenizer(data_dir, tmp_path,
                                                                       monkeypatch):
    import zoo.probe
    monkeypatch.setattr(subword, "TRAIN_CHARS", 300_000)
    settings = ["data.tokenizer=bpe:400", "progress=False", "log_every=1", "peak_flops=1e12"]
    workdir = str(tmp_path / "run")
    config = zoo.config.load(TEXT + ":mlm,tiny", [*settings, "steps=2"])
    summary = zoo.train.train(config, workdir)
    assert summary["step"] == 2 and np.isfinite(summary["loss"])
    path = Path(workdir) / subword.TOKENIZER_FILE
    saved = path.read_text()
    tokenizer = subword.SubwordTokenizer.from_json(saved)
    # The model's vocabulary is the tokenizer's (pieces + specials + sentinels).
    state, _ = zoo.train.restore_or_init(zoo.train.build(config), workdir)
    shapes = {tuple(x.shape) for x in jax.tree.leaves(state.params)}
    assert any(tokenizer.vocab_size in shape for shape in shapes), shapes

    # The batches the run reads are the BPE's tokens of the corpus.
    experiment = zoo.train.attach_tokenizer(zoo.train.build(config), workdir)
    rows = next(zoo.train.make_batches(experiment))["tokens"]
    assert rows.max() >= BYTE_OFFSET + 256 and rows.max() < tokenizer.vocab_size

    def no_training(*args, **kwargs):
        raise AssertionError("resume and probe must reuse the workdir's tokenizer")

    monkeypatch.setattr(subword, "train_bpe", no_training)
    resumed = zoo.config.load(TEXT + ":mlm,tiny", [*settings, "steps=3"])
    zoo.train.train(resumed, workdir)
    assert path.read_text() == saved
    scores = zoo.probe.probe(resumed, workdir)
    assert 0.0 <= scores["linear_probe"] <= 1.0 and scores["step"] == 3
