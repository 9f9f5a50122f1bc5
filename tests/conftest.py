"""Fixtures for every test: unique arena names, and a check that no OS object leaks."""

import os
import re
import uuid

import pytest

from shmalloc import admin
from shmalloc.ipc import naming

# Arenas of other test sessions running at the same time ("t<pid>_..."), left alone.
_TEST_ARENA = re.compile(r"t(\d+)_")


def _is_other_session(name):
    """True if ``name`` belongs to an arena made by another test process, or held
    by live processes other than this one (a `shmalloc launch` running beside the
    tests): those are not this test's leaks."""
    arena = naming.arena_of(name) or ""
    match = _TEST_ARENA.match(arena)
    if match is not None:
        return int(match.group(1)) != os.getpid()
    return bool(set(admin.holders(arena)) - {os.getpid()})


@pytest.fixture
def arena_name():
    """A fresh arena name: "t", this process's pid, "_", 8 random hex digits."""
    return f"t{os.getpid()}_{uuid.uuid4().hex[:8]}"


@pytest.fixture(autouse=True)
def no_leaks():
    """Fail a test that leaves shmalloc OS objects behind, after removing them."""
    before = set(naming.list_objects())
    yield
    leaked = sorted(
        (kind, name) for kind, name in set(naming.list_objects()) - before
        if not _is_other_session(name)
    )
    for kind, name in leaked:
        naming.remove_object(kind, name)
    if leaked:
        pytest.fail("test left OS objects behind: "
                    + ", ".join(f"{kind} {name}" for kind, name in leaked))
