"""Training a collapsed run once more at a lower lr (``--retry-collapsed``, the default).

Why: at lr 1e-1 ``lopt1`` on SmolLM2 (SST-2, seed 1, CUDA graphs) fell to chance by step 300 of
1,000 and never left, with a finite loss that the divergence guard does not see; the same seed
trains to 88% eagerly or at lr 3e-2 (benchmarks/RESULTS.md, "The SST-2 seed-1 collapse"). A user
gets a prompt that answers one label for every input, and the advice of the warning at the end
(train again with a lower ``--lr``) is what the library can do itself. Measured (H100, 24 jobs of
the four-task grid, RESULTS.md "``lopt1`` at lr 5e-2"): it fired on that job only, whose retry at
3.33e-2 ended at 88.1% (the same job without the rule: 48.9%, on an H200).

The rule: a classification run of at least :data:`MIN_STEPS` steps whose final prompt scores no
better than always answering the most frequent label, measured on a fixed sample of up to
:data:`SAMPLE` of its own *training* rows (never the evaluation rows, which keep-best reads), trains
once more from its starting prompt, with a fresh optimizer, the same data order and schedule, and
the lr × :data:`LR_FACTOR`. It is one run: the same directory, steps numbered on (a 1,000-step run
that retries ends at step 2,000), one ``metrics.jsonl`` with a ``retry`` record between the two
attempts, keep-best choosing over both, and ``--resume`` exact in either attempt (a checkpoint of
the first attempt holds the starting prompt, ``{param}.initial``; one of the second holds where it
began). It happens at most once. The check costs one scoring pass over the sample. A run stopped
early does not retry (it ended on its own evaluations); a retry's early stopping counts only its own
evaluations, while keep-best compares both attempts'. Each attempt is the run's planned length
(``--resume --steps N`` sets it for both). On imbalanced data a weak prompt that has not collapsed can
also tie the majority label on the sample; it retries too, and the run ends with the second attempt.

Short runs are left alone: one that ends at chance may not have trained long enough, and a lower
lr would not help it.
"""

from __future__ import annotations

import numpy as np

from .data import majority_baseline

MIN_STEPS = 100  # runs shorter than this never retry
SAMPLE = 512  # training rows the final prompt is scored on
LR_FACTOR = 1 / 3  # the second attempt's lr, as a multiple of the first's (the lr probe's lower step)
SUFFIX = ".initial"  # a checkpoint's optimizer.safetensors holds the starting prompt under {param}.initial


def collapse_reason(ops, seed: int) -> str | None:
    """Why the prompt as it is now has collapsed (:class:`lrpt.training.Training` ``ops``), or None.

    The rows are drawn with ``seed`` (the run's), so every rank of a data-parallel run and every
    resumed run scores the same ones."""
    task = ops.task
    if task.kind != "classification" or not ops.train_data:
        return None
    n = len(ops.train_data)
    rows = np.sort(np.random.default_rng([seed, 7]).permutation(n)[:SAMPLE])
    data = [ops.train_data[i] for i in rows]
    value = ops.evaluate(data)["metric"]
    floor, word = majority_baseline(task, [e.target for e in data])
    if value > floor:
        return None
    return (f"the final prompt's {task.metric} on {len(data)} training rows, {value:.4f}, is no better than always"
            f" answering {word!r} ({floor:.4f})")


def split_initial(tensors: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """A checkpoint's tensors as (the others, the starting prompt's by parameter name, or None)."""
    initial = {k.removesuffix(SUFFIX): v for k, v in tensors.items() if k.endswith(SUFFIX)}
    return {k: v for k, v in tensors.items() if not k.endswith(SUFFIX)}, initial or None
