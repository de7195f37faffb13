"""Conversions: SVD compression, materialisation, HF PEFT import/export against the real peft package."""

import json

import numpy as np
import pytest

from lrpt import Adapter, BaseModelInfo, ConversionError, PromptSpec
from lrpt.cli import main
from lrpt.conversions.lowrank import compress, to_prompt
from lrpt.conversions.peft import from_peft, to_peft


def prompt_adapter(x):
    return Adapter(PromptSpec("prompt", n_tokens=x.shape[0]), {"prompt_embeddings": x.astype(np.float32)},
                   base_model=BaseModelInfo(hidden_size=x.shape[1]))


def test_compress_is_the_best_rank_r_approximation():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 3)) @ rng.standard_normal((3, 40)) + 1e-3 * rng.standard_normal((10, 40))
    a = prompt_adapter(x)
    auto = compress(a, "auto", tol=0.01)
    assert auto.rank == 3 and auto.relative_error < 0.01
    assert auto.param_ratio == pytest.approx(3 * (10 + 40) / 400)
    for r in (1, 2, 5):
        c = compress(a, r)
        approx = c.adapter.params["lopt.U"] @ c.adapter.params["lopt.V"]
        u, s, vt = np.linalg.svd(x, full_matrices=False)
        best = (u[:, :r] * s[:r]) @ vt[:r]
        np.testing.assert_allclose(approx, best, atol=1e-4)
        assert c.relative_error == pytest.approx(np.linalg.norm(x - best) / np.linalg.norm(x), rel=1e-4)
    with pytest.raises(ConversionError, match="rank must be between 1 and 10"):
        compress(a, 11)


def test_materialize_back_to_prompt():
    spec = PromptSpec("lopt2", n_tokens=5, rank=2)
    a = Adapter.create(spec, 12, seed=0)
    p = to_prompt(a)
    assert p.spec.method == "prompt"
    np.testing.assert_allclose(p.params["prompt_embeddings"], a.materialize(), atol=1e-7)
    with pytest.raises(ConversionError, match="depends on each input"):
        to_prompt(Adapter.create(PromptSpec("lopa", n_tokens=2, rank=1, head_hidden=4), 8))


def test_peft_configs_that_json_cannot_read_are_one_error(tmp_path, capsys):
    """A 5,000-digit integer (ValueError) or deep nesting (RecursionError) in a PEFT config gave a
    traceback from inspect and convert; a FIFO as the config blocked the import for ever."""
    import os

    import safetensors.numpy

    d = tmp_path / "p"
    d.mkdir()
    safetensors.numpy.save_file({"prompt_embeddings": np.zeros((2, 4), np.float32)}, d / "adapter_model.safetensors")
    for text, words in (('{"peft_type": "PROMPT_TUNING", "x": ' + "9" * 5000 + "}", "not valid JSON"),
                        ('{"peft_type": ' + "[" * 100000 + "]" * 100000 + "}", "nested too deeply")):
        (d / "adapter_config.json").write_text(text)
        for cmd in (["inspect", str(d)], ["convert", str(d), str(tmp_path / "o")]):
            assert main(cmd) == 2
            assert words in capsys.readouterr().err
        with pytest.raises(ConversionError, match=words):
            from_peft(d)
    (d / "adapter_config.json").unlink()
    os.mkfifo(d / "adapter_config.json")
    with pytest.raises(ConversionError, match="not a regular file"):
        from_peft(d)


def test_peft_export_is_all_or_nothing_and_takes_dtype_aliases(tmp_path, monkeypatch):
    a = Adapter.create(PromptSpec("lopt1", n_tokens=4, rank=2), 8, seed=0)
    out = to_peft(a, tmp_path / "bf", dtype="bf16")
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "PROMPT_TUNING"
    (tmp_path / "empty").mkdir()
    to_peft(a, tmp_path / "empty")  # an empty directory is filled
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConversionError, match="not a directory"):
        to_peft(a, tmp_path / "file")
    import lrpt.fileio

    calls = []

    def crash_second(*args):
        calls.append(args)
        if len(calls) == 2:
            raise OSError("killed")
        return real(*args)

    real = lrpt.fileio.os.replace
    monkeypatch.setattr(lrpt.fileio.os, "replace", crash_second)
    with pytest.raises(OSError):
        to_peft(a, tmp_path / "crash")
    monkeypatch.undo()
    assert not (tmp_path / "crash").exists()  # nothing half-written: a retry is not refused
    to_peft(a, tmp_path / "crash")


def test_cli_convert_compress_and_dtype(tmp_path, capsys):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((20, 2)) @ rng.standard_normal((2, 64))
    prompt_adapter(x).save(tmp_path / "p")
    assert main(["convert", str(tmp_path / "p"), str(tmp_path / "l"), "--method", "lopt1", "--rank", "auto",
                 "--tol", "0.001"]) == 0
    assert "rank 2" in capsys.readouterr().out
    lopt = Adapter.load(tmp_path / "l")
    assert lopt.spec.method == "lopt1" and lopt.spec.rank == 2
    assert main(["convert", str(tmp_path / "p"), str(tmp_path / "h"), "--dtype", "bf16"]) == 0
    small = (tmp_path / "h" / "adapter_model.safetensors").stat().st_size
    assert small < 0.6 * (tmp_path / "p" / "adapter_model.safetensors").stat().st_size
    np.testing.assert_allclose(Adapter.load(tmp_path / "h").params["prompt_embeddings"], x, rtol=1e-2, atol=1e-2)


def test_lopa_cannot_be_exported(tmp_path, capsys):
    Adapter.create(PromptSpec("lopa", n_tokens=2, rank=1, head_hidden=4), 8).save(tmp_path / "a")
    assert main(["convert", str(tmp_path / "a"), str(tmp_path / "b"), "--to", "peft"]) == 2
    assert "depends on each input" in capsys.readouterr().err


def test_bad_peft_inputs(tmp_path, capsys):
    d = tmp_path / "lora"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    import safetensors.numpy

    safetensors.numpy.save_file({"w": np.zeros((2, 2), np.float32)}, d / "adapter_model.safetensors")
    assert main(["convert", str(d), str(tmp_path / "o")]) == 2
    assert "PEFT type LORA cannot become a soft prompt" in capsys.readouterr().err
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING", "token_dim": 3}))
    safetensors.numpy.save_file({"prompt_embeddings": np.zeros((2, 4), np.float32)}, d / "adapter_model.safetensors")
    assert main(["convert", str(d), str(tmp_path / "o")]) == 2
    assert "token_dim 3 disagrees" in capsys.readouterr().err
    cases = [  # (config, tensors, the error's words): what an import would otherwise drop or misread
        ({"peft_type": "PROMPT_TUNING", "task_type": "SEQ_CLS"}, {}, "PEFT SEQ_CLS adapter"),
        ({"peft_type": "PROMPT_TUNING"}, {"score.weight": np.zeros((2, 4), np.float32)}, "tensors a prompt does not use"),
        ({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 20}, {}, "num_virtual_tokens 20 disagrees with the 2 rows"),
        ({"peft_type": "MULTITASK_PROMPT_TUNING"}, {"prefix_task_cols": np.zeros((2, 2), np.float32),
                                                    "prefix_task_rows": np.zeros((2, 1, 4), np.float32)}, "must be 3-D"),
    ]
    for config, extra, words in cases:
        (d / "adapter_config.json").write_text(json.dumps(config))
        safetensors.numpy.save_file({"prompt_embeddings": np.zeros((2, 4), np.float32), **extra},
                                    d / "adapter_model.safetensors")
        assert main(["convert", str(d), str(tmp_path / "o")]) == 2
        assert words in capsys.readouterr().err
    (d / "adapter_model.safetensors").unlink()
    (d / "adapter_model.bin").write_bytes(b"\x80\x02}q\x00.")
    assert main(["convert", str(d), str(tmp_path / "o")]) == 2
    assert "never unpickles" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "none"), str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


# -- against the real peft package -----------------------------------------------------------------

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


@pytest.fixture
def base(tiny_dirs):
    """A fresh model per test: PEFT wraps (and may patch) the model it is given."""
    from lrpt.backends.torch.model import load_model

    return load_model(tiny_dirs["llama"])


def peft_logits(peft_model, ids, task_ids=None):
    kw = {} if task_ids is None else {"task_ids": torch.tensor([task_ids])}
    with torch.no_grad():
        return peft_model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          **kw).logits[0].float()


def lrpt_logits(model, adapter, ids):
    from lrpt.backends.torch.model import forward_logits, make_batch
    from lrpt.backends.torch.prompts import prompt_from_adapter

    with torch.no_grad():
        return forward_logits(model, prompt_from_adapter(adapter).eval(), make_batch([ids], adapter.spec.n_tokens, "right"))[0]


IDS = [1, 40, 77, 5, 120, 9]


@pytest.mark.parametrize("method", ["prompt", "lopt1", "lopt2"])
def test_peft_loads_our_export_with_the_same_logits(base, tmp_path, method):
    from peft import PeftModel

    model, _ = base
    adapter = Adapter.create(PromptSpec(method, n_tokens=5, rank=None if method == "prompt" else 2), 32, seed=3,
                             base_model=BaseModelInfo(hidden_size=32))
    to_peft(adapter, tmp_path / "peft")
    got = peft_logits(PeftModel.from_pretrained(model, tmp_path / "peft"), IDS)[5:]
    torch.testing.assert_close(got, lrpt_logits(model, adapter, IDS), rtol=0, atol=1e-5)


def test_peft_loads_an_lrpt_prompt_adapter_as_is(base, tmp_path):
    from peft import PeftModel

    model, _ = base
    adapter = Adapter.create(PromptSpec("prompt", n_tokens=4), 32, seed=1)
    adapter.save(tmp_path / "a")
    got = peft_logits(PeftModel.from_pretrained(model, tmp_path / "a"), IDS)[4:]
    torch.testing.assert_close(got, lrpt_logits(model, adapter, IDS), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING"])
def test_import_reproduces_peft_logits(base, tmp_path, kind, capsys):
    from peft import MultitaskPromptTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model

    model, _ = base
    torch.manual_seed(0)
    cfg = {"PROMPT_TUNING": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6),
           "P_TUNING": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=6, encoder_hidden_size=16),
           "MULTITASK_PROMPT_TUNING": lambda: MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6,
                                                                          num_tasks=3, num_ranks=2)}[kind]()
    pm = get_peft_model(model, cfg)
    with torch.no_grad():  # a "trained" adapter: move every prompt parameter off its init
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    pm.save_pretrained(tmp_path / "peft")
    pm.eval()
    want = peft_logits(pm, IDS, task_ids=1 if kind.startswith("MULTI") else None)[6:]
    assert main(["inspect", str(tmp_path / "peft")]) == 0
    assert kind in capsys.readouterr().out
    imported = from_peft(tmp_path / "peft", task_index=1)
    assert imported.spec.method == "prompt" and imported.spec.n_tokens == 6
    torch.testing.assert_close(lrpt_logits(model, imported, IDS), want, rtol=0, atol=1e-4)
    assert main(["convert", str(tmp_path / "peft"), str(tmp_path / "lrpt"), "--task-index", "1"]) == 0
    assert Adapter.load(tmp_path / "lrpt").spec.n_tokens == 6


def test_peft_left_padding_changes_answers_and_lrpt_does_not(base, tmp_path):
    """PEFT issue #1093, shown: PEFT's prompt sits before the pads; lrpt's sits after them."""
    from peft import PeftModel

    from lrpt.backends.torch.model import forward_logits, make_batch
    from lrpt.backends.torch.prompts import prompt_from_adapter

    model, _ = base
    adapter = Adapter.create(PromptSpec("prompt", n_tokens=4), 32, seed=2)
    to_peft(adapter, tmp_path / "p")
    pm = PeftModel.from_pretrained(model, tmp_path / "p")
    short, long = [1, 40, 77], [1, 9, 8, 7, 6, 5, 4]
    ids = torch.tensor([[0] * 4 + short, long])
    mask = torch.tensor([[0] * 4 + [1] * 3, [1] * 7])
    with torch.no_grad():
        peft_batched = pm(input_ids=ids, attention_mask=mask).logits[0, -1].float()
    peft_alone = peft_logits(pm, short)[-1]
    assert (peft_batched - peft_alone).abs().max() > 1e-3  # PEFT: the batch changed the answer
    prompt = prompt_from_adapter(adapter).eval()
    with torch.no_grad():
        ours = forward_logits(model, prompt, make_batch([short, long], 4, "left"))[0, len(short) - 1]
    torch.testing.assert_close(ours, peft_alone, rtol=0, atol=1e-5)  # lrpt: the answer PEFT gives alone


def test_convert_model_from_gguf_loads_in_both_backends(tiny_dirs, tmp_path, capsys):
    """A GGUF written here becomes an HF folder whose logits agree in transformers and mlx-lm,
    and equal those of the model the GGUF was made from."""
    pytest.importorskip("gguf")
    mx = pytest.importorskip("mlx.core")
    import mlx_lm
    from tiny import write_tiny_gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_dirs["llama"])
    assert main(["convert-model", str(gguf_path), str(tmp_path / "hf")]) == 0
    assert "loads with transformers and mlx-lm" in capsys.readouterr().out
    ids = AutoTokenizer.from_pretrained(tmp_path / "hf")("the movie was great fun").input_ids
    assert ids == AutoTokenizer.from_pretrained(tiny_dirs["llama"])("the movie was great fun").input_ids
    with torch.no_grad():
        converted = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")(torch.tensor([ids])).logits[0].numpy()
        original = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])(torch.tensor([ids])).logits[0].numpy()
    mlx_model, _ = mlx_lm.load(str(tmp_path / "hf"))
    on_mlx = np.array(mlx_model(mx.array([ids]))[0])
    np.testing.assert_allclose(converted, original, atol=1e-5)
    np.testing.assert_allclose(on_mlx, converted, atol=1e-4)
    assert main(["convert-model", str(gguf_path), str(tmp_path / "hf")]) == 2  # no silent overwrite


def test_convert_model_overwrite_never_deletes_what_lrpt_did_not_make(tmp_path, monkeypatch, capsys):
    """--overwrite refuses `.`, a parent of the input, and any folder that is not a model folder;
    nothing is read or deleted before the refusal (the checks come first)."""
    gguf = tmp_path / "work" / "x.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    monkeypatch.chdir(tmp_path / "work")
    assert main(["convert-model", str(gguf), ".", "--overwrite"]) == 2
    assert "current directory" in capsys.readouterr().err
    assert main(["convert-model", str(gguf), str(tmp_path / "work"), "--overwrite"]) == 2
    assert gguf.exists()
    unrelated = tmp_path / "photos"
    unrelated.mkdir()
    (unrelated / "cat.jpg").write_bytes(b"x")
    (unrelated / "config.json").write_text("{}")
    assert main(["convert-model", str(gguf), str(unrelated), "--overwrite"]) == 2
    assert "cat.jpg" in capsys.readouterr().err
    assert (unrelated / "cat.jpg").exists()
    no_config = tmp_path / "empty_but_not_model"
    no_config.mkdir()
    (no_config / "notes.txt").write_text("mine")
    assert main(["convert-model", str(gguf), str(no_config), "--overwrite"]) == 2
    assert (no_config / "notes.txt").read_text() == "mine"


def test_convert_model_overwrite_replaces_a_model_folder(tiny_dirs, tmp_path):
    pytest.importorskip("gguf")
    from tiny import write_tiny_gguf

    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_dirs["llama"])
    out = tmp_path / "hf"
    assert main(["convert-model", str(gguf_path), str(out)]) == 0
    (out / "config.json").write_text('{"stale": true}')
    assert main(["convert-model", str(gguf_path), str(out), "--overwrite"]) == 0
    assert "stale" not in (out / "config.json").read_text()
