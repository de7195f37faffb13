"""Adapter format v1: round trip, PEFT fields, atomic saves, and every defect on load."""

import dataclasses
import json
import pickle

import numpy as np
import pytest
import safetensors.numpy

from lrpt import Adapter, AdapterFormatError, BaseModelInfo, BaseModelMismatchError, LrptError, PromptSpec, Task
from lrpt.adapter import CONFIG_NAME, WEIGHTS_NAME
from lrpt.basemodel import fingerprint_from_rows, fingerprint_rows
from lrpt.fileio import encode_safetensors, read_safetensors

D = 16


def make(method="lopt1", **kw) -> Adapter:
    spec = PromptSpec(method, n_tokens=4, rank=None if method == "prompt" else 2, head_hidden=8, **kw)
    task = Task("demo", template="Q: {text}\nA:", label_words=[" no", " yes"])
    base = BaseModelInfo("tiny", "llama", D, 100, {"scheme": "rowmeanabs-v1", "values": [0.1] * 8})
    return Adapter.create(spec, D, seed=1, task=task, base_model=base)


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "ad"
    make().save(path)
    return path


@pytest.mark.parametrize("method", ["prompt", "lopt1", "lopt2", "lopa"])
def test_round_trip(tmp_path, method):
    a = make(method)
    a.save(tmp_path / "a")
    b = Adapter.load(tmp_path / "a")
    assert b.spec == a.spec and b.task == a.task and b.base_model == a.base_model
    for k in a.params:
        assert b.params[k].dtype == np.float32
        np.testing.assert_array_equal(a.params[k], b.params[k])
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


def test_file_is_standard_safetensors_with_metadata(saved):
    tensors = safetensors.numpy.load_file(saved / WEIGHTS_NAME)
    assert set(tensors) == {"lopt.U", "lopt.V"} and tensors["lopt.U"].dtype == np.float32
    from safetensors import safe_open

    with safe_open(saved / WEIGHTS_NAME, "np") as f:
        meta = f.metadata()
    assert meta["format"] == "lrpt" and meta["format_version"] == "1"
    assert PromptSpec.from_json(meta["spec"]) == make().spec
    cfg = json.loads((saved / CONFIG_NAME).read_text())
    assert cfg["format"] == "lrpt" and cfg["format_version"] == 1 and cfg["created_by"]["lrpt_version"]
    # and the other way: a file written by the reference package is read by ours
    ref = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    safetensors.numpy.save_file(ref, saved / "ref.safetensors", metadata={"a": "b"})
    got, meta, dtypes = read_safetensors(saved / "ref.safetensors")
    np.testing.assert_array_equal(got["x"], ref["x"])
    assert meta == {"a": "b"} and dtypes == {"x": "F32"}


def test_prompt_method_carries_peft_fields(tmp_path):
    make("prompt").save(tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["num_virtual_tokens"] == 4 and cfg["token_dim"] == D
    assert "prompt_embeddings" in safetensors.numpy.load_file(tmp_path / "p" / WEIGHTS_NAME)
    make("lopt1").save(tmp_path / "l")
    assert "peft_type" not in json.loads((tmp_path / "l" / CONFIG_NAME).read_text())


@pytest.mark.parametrize("with_base", [True, False])
def test_a_text_initialised_prompt_loads_in_peft_with_or_without_a_base_name(tmp_path, with_base):
    """PEFT refuses TEXT init without a tokenizer path: without a base model's name the config says RANDOM."""
    peft = pytest.importorskip("peft")
    plain = make("prompt")
    a = dataclasses.replace(plain, spec=dataclasses.replace(plain.spec, init="text", init_text="hello"),
                            base_model=plain.base_model if with_base else None)
    a.save(tmp_path / "p")
    cfg = peft.PeftConfig.from_pretrained(str(tmp_path / "p"))
    assert cfg.num_virtual_tokens == 4
    assert str(cfg.prompt_tuning_init).endswith("TEXT" if with_base else "RANDOM")


@pytest.mark.parametrize("dtype, code, tol", [("bf16", "BF16", 1e-2), ("float16", "F16", 1e-3)])
def test_small_dtype_export_loads_as_float32(tmp_path, dtype, code, tol):
    a = make("prompt")
    a.save(tmp_path / "s", dtype=dtype)
    _, _, dtypes = read_safetensors(tmp_path / "s" / WEIGHTS_NAME)
    assert set(dtypes.values()) == {code}
    b = Adapter.load(tmp_path / "s")
    assert b.params["prompt_embeddings"].dtype == np.float32
    np.testing.assert_allclose(b.params["prompt_embeddings"], a.params["prompt_embeddings"], rtol=tol, atol=1e-6)


def test_save_overwrites_atomically_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "ad"
    make().save(path)
    b = make()
    b.params["lopt.U"] = b.params["lopt.U"] + 1
    b.save(path)
    np.testing.assert_array_equal(Adapter.load(path).params["lopt.U"], b.params["lopt.U"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


def test_failed_save_keeps_old_adapter(tmp_path, monkeypatch):
    path = tmp_path / "ad"
    make().save(path)
    before = (path / WEIGHTS_NAME).read_bytes()
    import lrpt.fileio

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(lrpt.fileio.os, "replace", boom)
    with pytest.raises(OSError):
        make("lopt1").save(path)
    assert (path / WEIGHTS_NAME).read_bytes() == before
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


def test_a_mix_of_two_saves_is_refused_and_a_hand_edited_config_is_not(tmp_path):
    """Re-saving into a directory replaces its two files one after the other; a crash between them
    left new weights beside the old config, which loaded (same spec) with the old task."""
    path = tmp_path / "ad"
    make().save(path)
    old_config = (path / CONFIG_NAME).read_bytes()
    b = make()
    b.params["lopt.U"] = b.params["lopt.U"] + 1
    b.task = Task("other", template="{text}", label_words=[" a", " b", " c"])
    b.save(path)
    edited = json.loads((path / CONFIG_NAME).read_text())
    edited["task"]["name"] = "renamed by hand"
    (path / CONFIG_NAME).write_text(json.dumps(edited))
    assert Adapter.load(path).task.name == "renamed by hand"
    (path / CONFIG_NAME).write_bytes(old_config)  # what the crash left: the old config, the new weights
    with pytest.raises(AdapterFormatError, match="mixes two saves"):
        Adapter.load(path)
    legacy = json.loads(old_config)
    del legacy["weights_sha256"]  # files written before the digest load as before
    (path / CONFIG_NAME).write_text(json.dumps(legacy))
    assert Adapter.load(path).spec == b.spec


def test_a_header_whose_length_looks_like_pickle_magic_still_loads(tmp_path):
    """The header length is the file's first 8 bytes: a 640-byte header starts with b"\\x80\\x02",
    a pickle's magic; such a valid adapter was refused as a pickle."""
    for k in range(1, 400):
        a = Adapter(PromptSpec("prompt", n_tokens=2, init="text", init_text="x" * k), {"prompt_embeddings": np.ones((2, 8), np.float32)})
        a.save(tmp_path / str(k))
        if (tmp_path / str(k) / WEIGHTS_NAME).read_bytes()[:2] == b"\x80\x02":
            break
    else:
        pytest.fail("no text length gave a 640-byte header")
    assert Adapter.load(tmp_path / str(k)).spec.init_text == "x" * k


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_saving_a_value_the_dtype_cannot_hold_is_refused(tmp_path, dtype):
    """A finite value past float16's (or bf16's) range became Inf in the file, which load refuses."""
    a = make("prompt")
    a.params["prompt_embeddings"][0, 0] = 1e5 if dtype == "float16" else 3.4e38
    with pytest.raises(AdapterFormatError, match=f"too large for {dtype}"):
        a.save(tmp_path / "a", dtype=dtype)
    assert not (tmp_path / "a").exists()
    with pytest.raises(AdapterFormatError, match="too large for float32"):
        encode_safetensors({"x": np.array([1e39], np.float64)})


def test_a_rank_is_checked_for_every_method():
    with pytest.raises(LrptError, match="rank must be an integer"):
        PromptSpec("prompt", rank="x").validate()
    with pytest.raises(LrptError, match="larger than n_tokens"):
        PromptSpec("lopt1", n_tokens=2, rank=3).validate()
    assert PromptSpec("prompt", rank=4).validate().rank == 4


# -- every defect, each on its own -------------------------------------------------------------


def _config(path):
    return json.loads((path / CONFIG_NAME).read_text())


def _write_config(path, cfg):
    (path / CONFIG_NAME).write_text(json.dumps(cfg))


def _rewrite_weights(path, tensors, spec=None, dtype="float32"):
    meta = {"format": "lrpt", "format_version": "1", "spec": (spec or make().spec).to_json()}
    (path / WEIGHTS_NAME).write_bytes(encode_safetensors(tensors, meta, dtype))


def corrupt_missing_dir(p):
    import shutil

    shutil.rmtree(p)


def corrupt_missing_weights(p):
    (p / WEIGHTS_NAME).unlink()


def corrupt_zero_byte(p):
    (p / WEIGHTS_NAME).write_bytes(b"")


def corrupt_truncated(p):
    data = (p / WEIGHTS_NAME).read_bytes()
    (p / WEIGHTS_NAME).write_bytes(data[: len(data) - 7])


def corrupt_garbage_header(p):
    data = bytearray((p / WEIGHTS_NAME).read_bytes())
    data[9:20] = b"#" * 11
    (p / WEIGHTS_NAME).write_bytes(bytes(data))


class Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def corrupt_pickle(p):
    (p / WEIGHTS_NAME).write_bytes(pickle.dumps({"lopt.U": Evil()}, protocol=2))


def corrupt_config_not_json(p):
    (p / CONFIG_NAME).write_text("{not json")


def corrupt_config_wrong_type(p):
    cfg = _config(p)
    cfg["format_version"] = "1"
    _write_config(p, cfg)


def corrupt_config_is_list(p):
    (p / CONFIG_NAME).write_text("[1, 2]")


def corrupt_unknown_method(p):
    cfg = _config(p)
    cfg["spec"]["method"] = "lopt9"
    _write_config(p, cfg)


def corrupt_newer_version(p):
    cfg = _config(p)
    cfg["format_version"] = 2
    _write_config(p, cfg)


def corrupt_missing_tensor(p):
    t = safetensors.numpy.load_file(p / WEIGHTS_NAME)
    del t["lopt.V"]
    _rewrite_weights(p, t)


def corrupt_extra_tensor(p):
    t = safetensors.numpy.load_file(p / WEIGHTS_NAME)
    t["lopt.W"] = np.zeros((2, 2), np.float32)
    _rewrite_weights(p, t)


def corrupt_wrong_shape(p):
    t = safetensors.numpy.load_file(p / WEIGHTS_NAME)
    t["lopt.U"] = np.zeros((5, 2), np.float32)
    _rewrite_weights(p, t)


def corrupt_wrong_dtype(p):
    t = safetensors.numpy.load_file(p / WEIGHTS_NAME)
    _rewrite_weights(p, t, dtype="float16")  # config still says float32


def corrupt_int_dtype(p):
    t = {k: v.astype(np.int32) for k, v in safetensors.numpy.load_file(p / WEIGHTS_NAME).items()}
    safetensors.numpy.save_file(
        t, p / WEIGHTS_NAME, metadata={"format": "lrpt", "format_version": "1", "spec": make().spec.to_json()}
    )


def corrupt_nan(p):
    t = safetensors.numpy.load_file(p / WEIGHTS_NAME)
    t["lopt.U"][0, 0] = np.nan
    _rewrite_weights(p, t)


def corrupt_inf(p):
    t = safetensors.numpy.load_file(p / WEIGHTS_NAME)
    t["lopt.V"][1, 3] = -np.inf
    _rewrite_weights(p, t)


def corrupt_spec_disagrees(p):
    t = safetensors.numpy.load_file(p / WEIGHTS_NAME)
    _rewrite_weights(p, t, spec=PromptSpec("lopt1", n_tokens=4, rank=2, activation="relu"))


def corrupt_no_metadata(p):
    safetensors.numpy.save_file(safetensors.numpy.load_file(p / WEIGHTS_NAME), p / WEIGHTS_NAME)


def corrupt_missing_config(p):
    (p / CONFIG_NAME).unlink()


DEFECTS = {
    corrupt_missing_dir: "does not exist",
    corrupt_missing_weights: "is missing",
    corrupt_zero_byte: "empty",
    corrupt_truncated: "truncated",
    corrupt_garbage_header: "corrupt header|not a safetensors",
    corrupt_pickle: "pickle",
    corrupt_config_not_json: "not valid JSON",
    corrupt_config_wrong_type: "must be an integer",
    corrupt_config_is_list: "JSON object",
    corrupt_unknown_method: "unknown method",
    corrupt_newer_version: "newer than this lrpt",
    corrupt_missing_tensor: r"missing tensor\(s\) lopt.V",
    corrupt_extra_tensor: r"unexpected tensor\(s\) lopt.W",
    corrupt_wrong_shape: "has shape",
    corrupt_wrong_dtype: "F16, but the config says float32",
    corrupt_int_dtype: "dtype I32",
    corrupt_nan: "NaN or Inf",
    corrupt_inf: "NaN or Inf",
    corrupt_spec_disagrees: "disagrees",
    corrupt_no_metadata: "no lrpt metadata",
    corrupt_missing_config: "adapter_config.json is missing",
}


@pytest.mark.parametrize("defect", list(DEFECTS), ids=lambda f: f.__name__[8:])
def test_each_defect_gives_one_lrpt_error(saved, defect, capsys):
    defect(saved)
    with pytest.raises(LrptError, match=DEFECTS[defect]) as info:
        Adapter.load(saved)
    assert "\n" not in str(info.value)
    assert "unpickled!" not in capsys.readouterr().out


def test_peft_adapter_is_recognised(tmp_path):
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(AdapterFormatError, match="HF PEFT LORA adapter"):
        Adapter.load(tmp_path)


def test_base_model_check():
    rows = np.random.default_rng(0).standard_normal((8, D)).astype(np.float32)
    fp = fingerprint_from_rows(rows)
    mine = BaseModelInfo("m", "llama", D, 100, fp)
    mine.check_compatible(BaseModelInfo("m", "llama", D, 100, fingerprint_from_rows(rows * 1.01)))
    with pytest.raises(BaseModelMismatchError, match="hidden_size 16"):
        mine.check_compatible(BaseModelInfo("x", "llama", 32, 100, fp))
    with pytest.raises(BaseModelMismatchError, match="vocab_size"):
        mine.check_compatible(BaseModelInfo("x", "llama", D, 101, fp), force=True)
    other = BaseModelInfo("x", "llama", D, 100, fingerprint_from_rows(rows * 2))
    with pytest.raises(BaseModelMismatchError, match="fingerprint"):
        mine.check_compatible(other)
    mine.check_compatible(other, force=True)
    assert fingerprint_rows(100) == [0, 14, 28, 42, 57, 71, 85, 99]
