"""The PyTorch backend (HF transformers): framework work only, in the files ``lrpt/backends/mlx`` mirrors.

Its public names are those of :class:`lrpt.backends.Backend`, gathered by
:func:`lrpt.backends.populate` from ``ops``, ``prompts``, ``model``, ``decode`` and ``step``, plus the
core's scoring and training entry points (which find the backend from the model).
"""

from .. import populate

NAME = "torch"
populate(globals())
