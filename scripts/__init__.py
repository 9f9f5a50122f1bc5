"""Runnable entry points behind the ``shmalloc`` console script.

Installed as ``shmalloc.scripts`` (the folder sits at the top of the repository).
"""
