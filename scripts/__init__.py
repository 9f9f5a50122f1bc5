"""Runnable entry points behind the ``shmalloc`` console script.

Installed as ``shmalloc.scripts`` (the folder sits at the top of the repository). Each
command module offers ``add_arguments(parser)`` and ``run(args) -> exit status``; ``cli``
assembles them, and ``python -m shmalloc.scripts.<command>`` goes through ``cli`` too.
"""

from shmalloc.workers import positive_int, positive_seconds  # noqa: F401  (the argparse types)
