"""lrpt: low-rank soft prompts for frozen language models, on PyTorch and MLX, one format.

The core (this package, outside ``lrpt.backends``) needs only NumPy and safetensors;
frameworks load lazily through :func:`lrpt.backends.get_backend`.
"""

__version__ = "0.1.0"

from .adapter import Adapter  # noqa: E402
from .basemodel import BaseModelInfo  # noqa: E402
from .errors import (  # noqa: E402
    AdapterFormatError,
    BackendUnavailableError,
    BaseModelMismatchError,
    ConversionError,
    DataError,
    LrptError,
    SpecError,
    TrainingError,
)
from .spec import PromptSpec  # noqa: E402
from .tasks import Task  # noqa: E402

__all__ = [
    "Adapter",
    "AdapterFormatError",
    "BackendUnavailableError",
    "BaseModelInfo",
    "BaseModelMismatchError",
    "ConversionError",
    "DataError",
    "LrptError",
    "PromptSpec",
    "SpecError",
    "Task",
    "TrainingError",
    "__version__",
]
