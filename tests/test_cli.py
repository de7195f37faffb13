"""The `lrpt` command end to end on tiny random models: every subcommand and every error case."""

import io
import json
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("mlx_lm")

from lrpt import Adapter  # noqa: E402
from lrpt.cli import main  # noqa: E402

TRAIN = ["--task", "demo", "--method", "lopt1", "--tokens", "4", "--rank", "2", "--batch-size", "8",
         "--train-limit", "64", "--eval-limit", "16"]


def lrpt(*args):
    return subprocess.run([sys.executable, "-m", "lrpt.cli", *map(str, args)], capture_output=True, text=True)


def one_error_line(capsys, code, needle):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len([x for x in err if x.startswith("lrpt: error:")]) == 1 and "Traceback" not in "\n".join(err)
    assert needle in err[-1], err[-1]


@pytest.fixture(scope="module")
def trained(tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    r = lrpt("train", "--backend", "torch", "--model", tiny_dirs["llama"], *TRAIN, "--steps", 6, "--eval-every", 3,
             "--out", out)
    assert r.returncode == 0, r.stderr
    assert "best validation accuracy" in r.stdout and "trainable parameters" in r.stdout
    assert "majority-label baseline" in r.stdout  # the score of always answering one label, beside it
    return out


def test_train_leaves_a_complete_run_dir(trained):
    names = {p.name for p in trained.iterdir()}
    assert {"adapter", "checkpoints", "metrics.jsonl", "train_config.json", "curves.png"} <= names
    assert (trained / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    adapter = Adapter.load(trained / "adapter")
    assert adapter.task.name == "demo" and adapter.spec.rank == 2 and adapter.created_by["backend"] == "torch"


def test_train_mlx_and_resume(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["train", "--backend", "mlx", "--model", str(tiny_dirs["llama"]), *TRAIN, "--steps", "4",
                 "--out", str(out)]) == 0
    assert main(["train", "--backend", "mlx", "--model", str(tiny_dirs["llama"]), *TRAIN, "--steps", "8",
                 "--out", str(out), "--resume"]) == 0
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 8 and Adapter.load(out / "adapter").created_by["backend"] == "mlx"


def test_continue_from_adapter(tiny_dirs, trained, tmp_path):
    assert main(["train", "--backend", "torch", "--model", str(tiny_dirs["llama"]), "--init-from",
                 str(trained / "adapter"), "--train-limit", "32", "--eval-limit", "0", "--steps", "2",
                 "--out", str(tmp_path / "c")]) == 0
    assert Adapter.load(tmp_path / "c" / "adapter").spec == Adapter.load(trained / "adapter").spec


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_eval_predictions_and_json(tiny_dirs, trained, tmp_path, backend, capsys):
    pred = tmp_path / "p.jsonl"
    assert main(["eval", "--backend", backend, "--model", str(tiny_dirs["llama"]), "--adapter",
                 str(trained / "adapter"), "--limit", "20", "--predictions", str(pred), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 20 and 0 <= result["accuracy"] <= 1
    lines = [json.loads(x) for x in pred.read_text().splitlines()]
    top = max((0, 1), key=[x["label"] for x in lines].count)  # ties: the first label, as majority_baseline
    assert result["majority_label"] == [" negative", " positive"][top]
    assert result["majority_baseline"] == sum(x["label"] == top for x in lines) / 20
    assert len(lines) == 20 and set(lines[0]) == {"idx", "label", "pred", "scores"} and len(lines[0]["scores"]) == 2
    assert all(x["pred"] == max(range(2), key=lambda k: x["scores"][k]) for x in lines)


def test_generate_args_and_stdin(tiny_dirs, trained, capsys, monkeypatch):
    base = ["generate", "--backend", "torch", "--model", str(tiny_dirs["llama"]), "--adapter",
            str(trained / "adapter"), "--max-tokens", "4", "--json"]
    assert main([*base, "the plot was dull", "what a film"]) == 0
    a = capsys.readouterr().out
    outs = json.loads(a)
    assert [o["input"] for o in outs] == ["Review: the plot was dull\nSentiment:",
                                         "Review: what a film\nSentiment:"]  # the task template
    monkeypatch.setattr(sys, "stdin", io.StringIO("the plot was dull\nwhat a film\n"))  # no inputs: read stdin
    assert main(base) == 0 and capsys.readouterr().out == a


def test_data_dir_custom_labels(tiny_dirs, tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    rows = [{"review": f"the movie was {w}", "stars": lab} for w, lab in (("great", "good"), ("awful", "bad"))] * 8
    for split in ("train", "validation"):
        (d / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["train", "--backend", "torch", "--model", str(tiny_dirs["llama"]), "--data", str(d),
                 "--text-field", "review", "--label-field", "stars", "--labels", "bad,good",
                 "--steps", "2", "--batch-size", "4", "--out", str(tmp_path / "r")]) == 0
    assert Adapter.load(tmp_path / "r" / "adapter").task.label_words == [" bad", " good"]


def test_completion_data(tiny_dirs, tmp_path, capsys):
    d = tmp_path / "data"
    d.mkdir()
    rows = [{"prompt": f"say {w}:", "completion": f" {w}"} for w in ("yes", "no", "fun", "plot")] * 4
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (d / "validation.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:6]))
    assert main(["train", "--backend", "torch", "--model", str(tiny_dirs["llama"]), "--data", str(d),
                 "--steps", "2", "--batch-size", "4", "--out", str(tmp_path / "r")]) == 0
    assert Adapter.load(tmp_path / "r" / "adapter").task.kind == "completion"
    printed = capsys.readouterr().out  # its best evaluation is a loss, not an accuracy of 5.56
    assert "best validation loss (per target token)" in printed and "accuracy" not in printed
    results = []
    for backend in ("torch", "mlx"):
        capsys.readouterr()
        assert main(["eval", "--backend", backend, "--model", str(tiny_dirs["llama"]), "--adapter",
                     str(tmp_path / "r" / "adapter"), "--data", str(d), "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    a, b = results
    assert a["examples"] == 6 and abs(a["loss"] - b["loss"]) < 1e-4 and a["perplexity"] > 1
    assert main(["eval", "--model", str(tiny_dirs["llama"]), "--adapter", str(tmp_path / "r" / "adapter"),
                 "--data", str(d), "--predictions", str(tmp_path / "p.jsonl")]) == 2
    assert "this is a completion task" in capsys.readouterr().err and not (tmp_path / "p.jsonl").exists()


# -- errors: one line, exit code 2 ----------------------------------------------------------------


def test_unknown_task_subprocess(tiny_dirs, tmp_path):
    r = lrpt("train", "--model", tiny_dirs["llama"], "--task", "nope", "--out", tmp_path / "x")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "lrpt: error: unknown task 'nope': use one of ag_news, boolq, cb, demo, rte, sst2, topics, trec, or --data DIR"]


def test_missing_fields(tiny_dirs, tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    (d / "train.jsonl").write_text('{"txt": "a", "label": 0}\n')
    code = main(["train", "--model", str(tiny_dirs["llama"]), "--data", str(d), "--labels", "a,b",
                 "--out", str(tmp_path / "o")])
    one_error_line(capsys, code, "rows have no field 'text'")


def test_malformed_line_names_file_and_line(tiny_dirs, tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    (d / "train.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1\n')
    code = main(["train", "--model", str(tiny_dirs["llama"]), "--data", str(d), "--labels", "a,b",
                 "--out", str(tmp_path / "o")])
    one_error_line(capsys, code, "train.jsonl:2: malformed JSON line")


def test_label_words_that_tokenize_to_nothing(tiny_dirs, tmp_path, capsys, monkeypatch):
    import lrpt.tokens
    import lrpt.training

    real = lrpt.tokens.label_token_ids

    def nothing_for_b(tokenizer, words):
        class Empty:
            def __call__(self, w, add_special_tokens=False):
                return {"input_ids": [] if w.strip() == "b" else tokenizer(w, add_special_tokens=False)["input_ids"]}
        return real(Empty(), words)

    monkeypatch.setattr(lrpt.training, "label_token_ids", nothing_for_b)
    code = main(["train", "--backend", "torch", "--model", str(tiny_dirs["llama"]), "--task", "demo",
                 "--train-limit", "8", "--eval-limit", "0", "--steps", "1", "--labels", "a,b", "--out", str(tmp_path / "o")])
    one_error_line(capsys, code, "label word ' b' tokenizes to nothing")


def test_adapter_for_another_base_model(tiny_dirs, trained, capsys):
    code = main(["eval", "--backend", "torch", "--model", str(tiny_dirs["qwen2"]), "--adapter", str(trained / "adapter"),
                 "--limit", "4"])
    one_error_line(capsys, code, "embeddings differ")
    code = main(["generate", "--backend", "mlx", "--model", str(tiny_dirs["gpt2"]), "--adapter",
                 str(trained / "adapter"), "hi"])
    one_error_line(capsys, code, "embeddings differ")


def test_backend_not_installed(tiny_dirs, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "mlx_lm" else real(n, *a))
    code = main(["train", "--backend", "mlx", "--model", str(tiny_dirs["llama"]), "--task", "demo",
                 "--out", str(tmp_path / "o")])
    one_error_line(capsys, code, "pip install 'lrpt[mlx]'")


def test_convert_subprocess(trained, tmp_path):
    r = lrpt("convert", trained / "adapter", tmp_path / "peft", "--to", "peft")
    assert r.returncode == 0, r.stderr
    r = lrpt("inspect", tmp_path / "peft", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["peft_type"] == "PROMPT_TUNING"
    bad = lrpt("convert", tmp_path / "missing", tmp_path / "x")
    assert bad.returncode == 2 and bad.stderr.startswith("lrpt: error:") and len(bad.stderr.splitlines()) == 1


def test_inspect_and_convert_model_errors(tmp_path, capsys):
    one_error_line(capsys, main(["inspect", str(tmp_path / "none")]), "does not exist")
    one_error_line(capsys, main(["convert-model", str(tmp_path / "x.gguf"), str(tmp_path / "o")]), "does not exist")


def test_unwritable_output_is_one_line(tiny_dirs, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = main(["train", "--backend", "torch", "--model", str(tiny_dirs["llama"]), *TRAIN, "--steps", "1",
                 "--out", str(blocker / "run")])
    one_error_line(capsys, code, "Not a directory")
