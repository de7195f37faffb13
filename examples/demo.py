"""`make demo`: make a fresh LoPT-1 adapter, save it in format v1, and inspect it.

This is the foundation's demo; it grows into the end-to-end train/eval/convert demo.
"""

import subprocess
import sys
from pathlib import Path

from lrpt import Adapter, BaseModelInfo, PromptSpec

out = Path("demo_out/lopt1-fresh")
spec = PromptSpec("lopt1", n_tokens=20, rank=5)
adapter = Adapter.create(spec, dim=576, seed=0, base_model=BaseModelInfo(hidden_size=576))
adapter.save(out)
print(f"saved a fresh {spec.method} adapter ({adapter.param_count:,} trainable parameters) to {out}\n")
sys.exit(subprocess.call([sys.executable, "-m", "lrpt.cli", "inspect", str(out)]))
