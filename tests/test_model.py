"""A hypothesis state machine drives two zones on one keg from two CPUs of a local
arena and compares them with a model after every step.

Zones: "lim", a primary zone with a limit whose ctor fails while the switch
``hooks_mod.model_ctor_fails`` is on; "sec", a secondary zone on lim's keg whose
init fails on every ``model_init_every``-th call (and whose fini is counted).
CPUs: the creator and a second CPU (``attach_local``); every rule picks a CPU, so
items are often freed by a CPU other than the one that allocated them.

The model is the set of live handles per zone and lim's limit.  The limit counts
items in CPU caches too (UMA's ``uz_items``), so the model cannot say when an
alloc must succeed; it says when one may fail: lim only at its limit or with the
ctor switch on, sec only when an init failed during the call.
"""

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from shmalloc import (
    M_NOWAIT,
    Arena,
    BadHandleError,
    DoubleFreeError,
    ForeignHandleError,
)
from tests import hooks_mod

pytestmark = pytest.mark.slow

SIZE = 100                  # item bytes (rsize 104): not a power of two
LIMIT0 = 5
ARENA_SIZE = 2 << 20
ZONES = ("lim", "sec")
CPUS = (0, 1)

cpus = st.sampled_from(CPUS)
zone_names = st.sampled_from(ZONES)


class AllocatorMachine(RuleBasedStateMachine):

    @initialize()
    def setup(self):
        hooks_mod.reset()
        hooks_mod.model_init_every = 5
        self.arena = Arena.create_local(size=ARENA_SIZE)
        self.cpu1 = self.arena.attach_local()
        lim = self.arena.zcreate("lim", SIZE, max_items=LIMIT0, bucket_size=2,
                                 ctor=hooks_mod.model_ctor)
        self.arena.zsecond_create("sec", lim, bucket_size=1, init=hooks_mod.model_init,
                                  fini=hooks_mod.model_fini)
        self.arenas = (self.arena, self.cpu1)
        self.zones = {(c, n): a.zone(n) for c, a in zip(CPUS, self.arenas) for n in ZONES}
        self.live = {}          # handle -> zone name
        self.limit = LIMIT0

    def teardown(self):
        if hasattr(self, "cpu1"):
            self.cpu1.close()
        if hasattr(self, "arena"):
            self.arena.destroy()
        hooks_mod.reset()

    # ------------------------------------------------------------ helpers
    def zone(self, cpu, name):
        return self.zones[cpu, name]

    def stats(self, name):
        """ZoneStats with both CPUs' counters published."""
        self.cpu1.stats()                     # publishes CPU 1's counters
        return self.arena.zone_stats(name)

    def live_of(self, name):
        return sorted(h for h, n in self.live.items() if n == name)

    def take(self, name, h):
        """Record a freshly allocated ``h`` and sign it with its handle."""
        assert h not in self.live, f"{h} handed out while live in {self.live[h]}"
        self.live[h] = name
        v = self.zone(0, name).view(h)
        v[:8] = h.to_bytes(8, "little")
        v[8:] = bytes([h % 251]) * (SIZE - 8)

    def explain_none(self, name, init_failures_before):
        """An alloc of ``name`` returned None: say it was allowed to."""
        if name == "lim":
            if hooks_mod.model_ctor_fails:
                event("lim: ctor failed")
            else:
                assert self.stats("lim").items == self.limit, "lim failed below its limit"
                event("lim: at its limit")
        else:
            assert hooks_mod.model_init_failures > init_failures_before, \
                "sec failed though no init failed"
            event("sec: init failed")

    # ------------------------------------------------------------ rules
    @rule(cpu=cpus, name=zone_names, n=st.integers(1, 4))
    def alloc(self, cpu, name, n):
        for _ in range(n):
            before = hooks_mod.model_init_failures
            h = self.zone(cpu, name).alloc(M_NOWAIT)
            if name == "lim" and hooks_mod.model_ctor_fails:
                assert h is None, "an alloc succeeded though the ctor fails"
            if h is None:
                self.explain_none(name, before)
            else:
                self.take(name, h)

    @rule(cpu=cpus, data=st.data())
    @precondition(lambda self: self.live)
    def free(self, cpu, data):
        h = data.draw(st.sampled_from(sorted(self.live)), label="handle")
        name = self.live.pop(h)
        xfree = self.stats(name).xfree
        self.zone(cpu, name).free(h)
        if self.stats(name).xfree > xfree:
            event("free by the other CPU")

    @rule(cpu=cpus, again=cpus, data=st.data())
    @precondition(lambda self: self.live)
    def free_twice(self, cpu, again, data):
        h = data.draw(st.sampled_from(sorted(self.live)), label="handle")
        name = self.live.pop(h)
        self.zone(cpu, name).free(h)
        with pytest.raises(DoubleFreeError):
            self.zone(again, name).free(h)

    @rule(cpu=cpus, name=zone_names, data=st.data(),
          kind=st.sampled_from(["random int", "inside a live item", "live in the other zone"]))
    def free_a_bad_handle(self, cpu, name, data, kind):
        if kind == "random int":            # mostly inside the arena: metadata, pages, items
            ints = st.one_of(st.integers(0, ARENA_SIZE), st.integers(-(1 << 40), 1 << 41))
            bad = data.draw(ints.filter(lambda h: h not in self.live), label="int")
            expected = None                 # any BadHandleError: a free item is a double free
        elif kind == "inside a live item":
            if not self.live:
                return
            h = data.draw(st.sampled_from(sorted(self.live)), label="handle")
            bad = h + data.draw(st.integers(1, SIZE - 1), label="offset")
            name = self.live[h]
            expected = BadHandleError
        else:
            other = self.live_of("sec" if name == "lim" else "lim")
            if not other:
                return
            bad = data.draw(st.sampled_from(other), label="handle")
            expected = ForeignHandleError
        with pytest.raises(BadHandleError) as e:
            self.zone(cpu, name).free(bad)
        assert expected is None or type(e.value) is expected, e.value
        assert repr(name) in str(e.value) and str(bad) in str(e.value)

    @rule(cpu=cpus, name=zone_names, n=st.integers(0, 6))
    def alloc_bulk(self, cpu, name, n):
        before = hooks_mod.model_init_failures
        hs = self.zone(cpu, name).alloc_bulk(n, M_NOWAIT)
        if hs is None:
            assert n > 0
            self.explain_none(name, before)
            return
        assert len(hs) == n
        for h in hs:
            self.take(name, h)

    @rule(cpu=cpus, name=zone_names, data=st.data())
    def free_bulk(self, cpu, name, data):
        mine = self.live_of(name)
        hs = data.draw(st.lists(st.sampled_from(mine), unique=True) if mine else st.just([]),
                       label="handles")
        self.zone(cpu, name).free_bulk(hs)
        for h in hs:
            del self.live[h]

    @rule(cpu=cpus, name=zone_names, data=st.data())
    @precondition(lambda self: self.live)
    def free_bulk_with_a_duplicate(self, cpu, name, data):
        mine = self.live_of(name)
        if not mine:
            return
        hs = data.draw(st.lists(st.sampled_from(mine), min_size=1, unique=True), label="handles")
        dup = data.draw(st.sampled_from(hs), label="duplicate")
        with pytest.raises(DoubleFreeError):
            self.zone(cpu, name).free_bulk(hs + [dup])

    @rule(cpu=cpus, more=st.integers(0, 2))
    def raise_the_limit(self, cpu, more):
        self.limit += more
        assert self.zone(cpu, "lim").set_max(self.limit) == self.limit

    @rule(on=st.booleans())
    def switch_the_ctor(self, on):
        hooks_mod.model_ctor_fails = on

    @rule(cpu=cpus, name=zone_names)
    def drain(self, cpu, name):
        self.zone(cpu, name).drain()

    @rule(cpu=cpus)
    def reclaim(self, cpu):
        self.arenas[cpu].reclaim()

    # ------------------------------------------------------------ invariants
    @invariant()
    def steps(self):
        self.nsteps = getattr(self, "nsteps", 0) + 1
        if self.nsteps == 40:
            event("40 steps")
        for name in ZONES:
            if self.stats(name).free_depot:
                event(f"{name}: items in the depot")

    @invariant()
    def arena_checks(self):
        self.arena.check()
        self.cpu1.check()

    @invariant()
    def used_matches_the_model(self):
        for name in ZONES:
            s = self.stats(name)
            assert s.used == len(self.live_of(name)), s
            assert s.items == s.used + s.free_cache + s.free_depot, s

    @invariant()
    def the_limit_holds(self):
        s = self.stats("lim")
        assert s.limit == self.limit
        assert s.items <= self.limit
        assert len(self.live_of("lim")) <= self.limit

    @invariant()
    def sec_items_were_inited_and_not_finied(self):
        s = self.stats("sec")
        assert hooks_mod.model_init_ok - hooks_mod.model_fini_calls == s.items

    @invariant()
    def live_items_are_disjoint_and_intact(self):
        hs = sorted(self.live)
        for lo, hi in zip(hs, hs[1:]):
            assert lo + SIZE <= hi, f"live items {lo} and {hi} overlap"
        z = self.zone(0, "lim")
        for h in hs:
            v = z.view(h)
            assert int.from_bytes(v[:8], "little") == h, f"item {h} was overwritten"
            assert bytes(v[8:]) == bytes([h % 251]) * (SIZE - 8), f"item {h} was overwritten"


AllocatorMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestAllocatorModel = AllocatorMachine.TestCase
