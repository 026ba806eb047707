"""Property-based tests (Hypothesis): the configurator's value parsing, tokenizer and streaming-decoder round
trips on arbitrary Unicode, prepare_bpe's piece cutting, and the sampling filters."""
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import prepare_bpe
from configurator import configure
from generate import sample_next
from tokenizer import BOS, EOS, BPETokenizer, CharTokenizer, StreamDecoder

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def settings_of(argv):
    scope = dict(n=3, lr=0.1, name="x", flag=False, sizes=[1, 2])
    return configure(scope, argv)[0]


@FAST
@given(st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
       st.lists(st.integers(-5, 5), max_size=4))
def test_values_given_on_the_command_line_arrive_as_given(n, lr, flag, sizes):
    got = settings_of([f"--n={n}", f"--lr={lr!r}", f"--flag={flag}", f"--sizes={sizes}"])
    assert got["n"] == n and got["lr"] == lr and got["flag"] is flag and got["sizes"] == sizes


@FAST
@given(st.text().filter(lambda t: t[:1] not in "'\""))
def test_a_string_setting_keeps_any_text_verbatim(text):
    assert settings_of([f"--name={text}"])["name"] == text  # "1e3", "0x10", "None", "[1]" stay text


@FAST
@given(st.text(max_size=30))
def test_any_text_for_a_number_is_a_number_or_one_line_and_exit_1(text):
    try:
        got = settings_of([f"--n={text}", f"--lr={text}"])
    except SystemExit as e:
        assert str(e.code).startswith("error: ") and "\n" not in str(e.code)
    else:  # taken by both: an integer literal, as an int and as the same value in a float
        assert type(got["n"]) is int and type(got["lr"]) is float and got["lr"] == float(got["n"])


@pytest.fixture(scope="module")
def bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Hello world, héllo wörld! 中文 😀 def f(x):\n    return x\n"] * 20, trainer=trainer)
    return BPETokenizer(tok)


@FAST
@given(st.text())
def test_bpe_round_trips_and_streams_any_unicode(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    stream = StreamDecoder(bpe)
    assert "".join(stream.push(i) for i in ids) + stream.flush() == text  # split characters are held, not lost


@FAST
@given(st.text(min_size=1))
def test_characters_round_trip_and_stream(text):
    tok = CharTokenizer(sorted(set(text)))
    stream = StreamDecoder(tok)
    assert "".join(stream.push(i) for i in tok.encode(text)) + stream.flush() == tok.decode(tok.encode(text)) == text


@FAST
@given(st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=300), st.integers(4, 24))
def test_pieces_of_a_file_encode_like_the_whole(bpe, tmp_path_factory, text, size):
    """prepare_bpe reads files in pieces cut where pre-tokenization never joins text: the pieces rejoin to the
    file and encode to the same tokens. (Only a run of 16*size characters without whitespace may be cut anywhere;
    a NUL byte makes it a binary file, refused.)"""
    assume(max((len(run) for run in text.split()), default=0) < 16 * size)
    path = tmp_path_factory.mktemp("piece") / "doc.txt"
    path.write_text(text, encoding="utf-8", newline="")
    parts = list(prepare_bpe.pieces(path, size))
    assert "".join(parts) == text
    assert [i for ids in bpe.encode_batch(parts) for i in ids] == bpe.encode(text)


@FAST
@given(st.lists(st.floats(-1e4, 1e4) | st.just(-math.inf), min_size=2, max_size=40), st.data())
def test_sampling_filters_always_leave_a_token_to_pick(values, data):
    assume(any(math.isfinite(v) for v in values))
    vocab = len(values)
    logits = torch.tensor([values])
    seen = torch.tensor([data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=30))])
    controls = dict(temperature=data.draw(st.floats(0.05, 5)), top_k=data.draw(st.integers(0, vocab + 2)),
                    top_p=data.draw(st.floats(0.0, 1.0)), min_p=data.draw(st.floats(0.0, 1.0)),
                    repetition_penalty=data.draw(st.floats(1.0, 3.0)),
                    no_repeat_ngram_size=data.draw(st.integers(0, 3)))
    token = sample_next(logits, seen=seen, generator=torch.Generator().manual_seed(0), **controls).item()
    assert 0 <= token < vocab and math.isfinite(values[token])  # never a token the model ruled out
    greedy = sample_next(logits, **{**controls, "temperature": 0.0}).item()
    assert logits[0, greedy] == logits.max()  # greedy: the likeliest (without `seen`, nothing is penalised)
