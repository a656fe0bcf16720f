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
from zoo.text.tokenizer import ENDS_WITH_SPACE, HAS_NEWLINE, STARTS_WITH_SPACE

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


def test_piece_flags_follow_the_decoded_text(bpe):
    """A piece's flags say whether its text starts or ends with whitespace and holds a newline;
    checked on every piece of real code against its decoded text."""
    table = bpe.token_flags()
    assert table.shape == (bpe.vocab_size,) and table.dtype == np.uint8
    assert not table[:BYTE_OFFSET].any() and not table[bpe.vocab_size - NUM_SENTINELS:].any()
    ids = bpe.encode(CODE[0][:4000])
    seen = set()
    ascii_space = " \t\n\r\x0b\x0c"
    for i in ids.tolist():
        text = bpe.decode([i])
        assert bool(table[i] & STARTS_WITH_SPACE) == (text[:1] != "" and text[0] in ascii_space)
        assert bool(table[i] & ENDS_WITH_SPACE) == (text[-1:] != "" and text[-1] in ascii_space)
        assert bool(table[i] & HAS_NEWLINE) == ("\n" in text)
        seen.add(int(table[i]))
    assert {0, STARTS_WITH_SPACE} <= seen and any(f & HAS_NEWLINE for f in seen)
    # The byte tokenizer's table says the same of single bytes as its is_whitespace.
    byte_table, ids = ByteTokenizer().token_flags(), np.arange(VOCAB_SIZE)
    np.testing.assert_array_equal(byte_table[ids] != 0, ByteTokenizer().is_whitespace(ids))
    assert byte_table[BYTE_OFFSET + 10] == STARTS_WITH_SPACE | ENDS_WITH_SPACE | HAS_NEWLINE


def test_whole_word_masking_takes_whole_pieces_words(bpe):
    """With a BPE, whole-word MLM selects every piece of a word or none (a word: a piece that
    starts with whitespace or follows one that ends with it, and the pieces up to the next)."""
    text = "\n".join(CODE)[:30000]
    ids = bpe.encode(text)[: 8 * 256].reshape(8, 256)
    flags = bpe.token_flags()[ids]
    out = mlm_mask(ids, jax.random.key(3), rate=0.3, max_predictions=256, whole_word=True,
                   vocab_size=bpe.vocab_size, flags=flags)
    selected = np.zeros(ids.shape, bool)
    positions, weights = np.asarray(out.positions), np.asarray(out.weights) > 0
    for row in range(8):
        selected[row, positions[row][weights[row]]] = True
    words = 0
    texts = {i: bpe.decode([i]) for i in np.unique(ids).tolist()}   # the oracle: decoded text
    for row in range(8):
        pieces = [texts[i] for i in ids[row].tolist()]
        begins = np.array([p[:1] != "" and p[0] in " \t\n\r\x0b\x0c" for p in pieces])
        after_space = np.array([True] + [p[-1:] != "" and p[-1] in " \t\n\r\x0b\x0c"
                                         for p in pieces[:-1]])
        starts = np.flatnonzero(begins | after_space)
        for start, end in zip(starts, list(starts[1:]) + [256]):
            word = selected[row, start:end]
            assert word.all() or not word.any(), (row, start, end)
            words += int(word.all() and end - start > 1)
        assert 0.2 < selected[row].mean() < 0.4
    assert words > 20       # multi-piece words were taken whole, many times


def test_bart_permutes_lines_of_pieces(bpe):
    """BART's sentence permutation with a BPE: sentences end at pieces holding a newline; the
    permuted row holds the same lines (as text), reordered, and the flags move with them."""
    from objectives.bart import sentence_permutation
    # Indented code: a line's newline must not share a piece with the next line's indentation.
    lines = [f"    line_{i} = {i} * x\n" for i in range(12)]
    ids = bpe.encode("".join(lines))
    flags = bpe.token_flags()[ids]
    out, moved = sentence_permutation(jax.numpy.asarray(ids), len(ids), jax.random.key(0),
                                      ratio=1.0, flags=jax.numpy.asarray(flags))
    out = np.asarray(out)
    np.testing.assert_array_equal(np.asarray(moved), bpe.token_flags()[out])
    text = bpe.decode(out)
    assert text != "".join(lines) and sorted(text.splitlines()) == sorted(
        line[:-1] for line in lines)


def test_bpe_runs_get_the_tokenizer_flags_and_other_modalities_are_refused(data_dir, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setattr(subword, "TRAIN_CHARS", 200_000)
    config = zoo.config.load(TEXT + ":bart,tiny", ["data.tokenizer=bpe:300"])
    experiment = zoo.train.build(config)          # BART permutes lines by default: accepted
    assert experiment.objective.vocab_size == 7 + 300 + 100
    assert experiment.objective.token_flags is None
    zoo.train.attach_tokenizer(experiment, str(tmp_path))
    table = experiment.tokenizer.token_flags()
    assert experiment.objective.token_flags == tuple(table.tolist())
    batch = next(zoo.train.make_batches(experiment))
    prepared = experiment.objective.prepare(batch, jax.random.key(0))
    rows = batch["tokens"].shape[0]
    assert all(np.asarray(leaf).shape[0] == rows for leaf in jax.tree.leaves(prepared))
    # Without the run's tokenizer a subword objective cannot tell words: a clear error.
    bare = zoo.train.build(zoo.config.load(TEXT + ":mlm,tiny", ["data.tokenizer=bpe:300",
                                                                "objective.whole_word=True"]))
    with pytest.raises(ValueError, match=r"^objective.whole_word: finds words or lines by "
                                         r"whitespace, but these subword ids come without"):
        bare.objective.prepare(batch, jax.random.key(0))
    # The same with a BPE whose vocabulary is as large as the byte tokenizer's (256 pieces):
    # the objective knows it reads pieces, not bytes.
    same_size = zoo.train.build(zoo.config.load(TEXT + ":mlm,tiny", [
        "data.tokenizer=bpe:256", "objective.whole_word=True"])).objective
    assert same_size.vocab_size == VOCAB_SIZE and same_size.subword
    with pytest.raises(ValueError, match=r"^objective.whole_word: .* subword ids come without"):
        same_size.prepare(batch, jax.random.key(0))
    with pytest.raises(ValueError, match=r"^objective.subword: True differs from data.tokenizer"):
        zoo.train.build(zoo.config.load(TEXT + ":mlm,tiny", ["objective.subword=True"]))
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
