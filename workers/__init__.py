"""Worker processes as CPUs: worker runtime, keg manager service, launcher, workloads.

Installed as ``shmalloc.workers`` (the folder sits at the top of the repository).
"""
