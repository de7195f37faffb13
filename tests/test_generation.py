"""Generation rules on every backend: stop strings end decoding as they appear, compile is honoured or
refused, the prefix-cache policy, and the shared text rules of lrpt.decoding."""

import importlib

import pytest
from tiny import TEXTS, spec_for, tokenizer

from lrpt.decoding import cut_at_stop, decode_new, row_text, wants_prefix_cache
from lrpt.errors import LrptError
from lrpt.spec import PromptSpec


@pytest.fixture(params=["torch", "mlx"], scope="module")
def loaded(request, tiny_dirs):
    from lrpt.backends import get_backend

    pytest.importorskip({"torch": "torch", "mlx": "mlx_lm"}[request.param])
    backend = get_backend(request.param)
    model, tok = backend.load_model(tiny_dirs["llama"], dtype="float32", quiet=True)
    return request.param, backend, model, tok


def _count_decode_steps(name, model, monkeypatch) -> list[int]:
    """A counter of forward passes (torch) / batch-generator steps (MLX) while the test runs."""
    calls = [0]
    if name == "torch":
        real_forward = model.forward

        def forward(*args, **kwargs):
            calls[0] += 1
            return real_forward(*args, **kwargs)

        monkeypatch.setattr(model, "forward", forward)
    else:
        g = importlib.import_module("mlx_lm.generate")  # the package attribute is the function
        real = g.BatchGenerator.next_generated

        def counted(self):
            calls[0] += 1
            return real(self)

        monkeypatch.setattr(g.BatchGenerator, "next_generated", counted)
    return calls


def test_stop_string_ends_decoding_as_it_appears(loaded, monkeypatch):
    name, backend, model, tok = loaded
    prompt = backend.init_prompt(spec_for("lopt1"), model, tok, seed=0)
    full = backend.generate(model, tok, prompt, TEXTS[:1], max_tokens=40)[0]
    assert len(full) > 6
    stop = full[2:4]
    calls = _count_decode_steps(name, model, monkeypatch)
    cut = backend.generate(model, tok, prompt, TEXTS[:1], max_tokens=40, stop=[stop])[0]
    assert cut == full[: full.find(stop)]
    assert calls[0] < 20, f"{calls[0]} decode steps: generation ran on past the stop string"


def test_compile_is_honoured_or_refused(loaded):
    name, backend, model, tok = loaded
    prompt = backend.init_prompt(spec_for("prompt"), model, tok, seed=0)
    if name == "mlx":
        with pytest.raises(LrptError, match="torch backend"):
            backend.generate(model, tok, prompt, TEXTS[:1], max_tokens=4, compile=True)
    else:  # a static cache (compiled on CUDA only, by transformers): the same greedy text
        assert backend.generate(model, tok, prompt, TEXTS, max_tokens=6, compile=True) == backend.generate(
            model, tok, prompt, TEXTS, max_tokens=6)


def test_prefix_cache_policy():
    assert not wants_prefix_cache(None, True)
    assert not wants_prefix_cache(spec_for("lopa"), True)
    assert wants_prefix_cache(spec_for("lopt1"), True) and not wants_prefix_cache(spec_for("lopt1"), False)
    assert not wants_prefix_cache(PromptSpec("prompt", n_tokens=512), None)  # measured: it never paid


def test_row_text_cuts_at_eos_then_stop():
    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(96 + i) for i in ids)

    assert row_text(Tok(), [1, 2, 3, 9, 4], eos={9}, stop=None) == "abc"
    assert row_text(Tok(), [1, 2, 3, 4], eos={9}, stop=["c", "b"]) == "a"
    assert cut_at_stop("hello", ["", "zz"]) == "hello"


def test_mlx_sampling_applies_the_temperature_before_the_nucleus():
    """p = (0.5, 0.3, 0.2) at temperature 0.5 is (0.66, 0.24, 0.11): a 0.6 nucleus holds token 0 alone.
    Cut before the temperature (mlx-lm's make_sampler) it would hold tokens 0 and 1."""
    mx = pytest.importorskip("mlx.core")
    from lrpt.backends.mlx.decode import sample_tokens

    logprobs = mx.log(mx.array([[0.5, 0.3, 0.2]] * 400))
    tokens = sample_tokens(logprobs, 0.5, 0.6, key=mx.random.key(0))
    assert set(tokens.tolist()) == {0}
    tokens = sample_tokens(logprobs, 1.0, 1.0, key=mx.random.key(0))
    assert set(tokens.tolist()) == {0, 1, 2}


def _sentencepiece_like():
    """A Metaspace tokenizer whose decoder strips the text's first space, as Llama 2's and Mistral's do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁Q": 3, ":": 4, "▁more": 5, "▁text": 6, "▁A": 7}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", continuing_subword_prefix=""))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_a_continuation_keeps_its_leading_space_so_stop_strings_match():
    """Decoded alone, " Q:" came back "Q:": the stop string " Q:" never matched (torch's generate had
    stopped on it, yet the text kept it; MLX's tail check missed it and decoded on to max_tokens)."""
    sp = _sentencepiece_like()
    assert sp.decode([3, 4]) == "Q:" and decode_new(sp, [3, 4]) == " Q:"
    assert decode_new(sp, [5, 3, 4]) == " more Q:"
    assert row_text(sp, [3, 4, 5, 6], eos={2}, stop=[" Q:"]) == ""
    assert row_text(sp, [7, 3, 4, 5], eos={2}, stop=[" Q:"]) == " A"
    bl = tokenizer()  # byte-level: the same text as a plain decode
    for text in TEXTS[:4]:
        ids = bl.encode(" " + text, add_special_tokens=False)
        assert decode_new(bl, ids) == bl.decode(ids) == " " + text
