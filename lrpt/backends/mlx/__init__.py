"""The MLX backend (mlx-lm): framework work only, mirroring ``lrpt/backends/torch`` file by file.

Names: :class:`lrpt.backends.Backend`'s, collected by :func:`lrpt.backends.populate`.
"""

from .. import populate

NAME = "mlx"
populate(globals())
