import concurrent.futures as cf

from pocketlm.rl.config import RLConfig
from pocketlm.rl.rollout import Group, Sample
from pocketlm.rl.scheduler import Scheduler


class FakeBackend:
    """Jobs finish when the test says; each records the published version it sampled with."""

    def __init__(self, spread=lambda item: 1.0):
        self.version, self.jobs, self.spread = 0, [], spread

    def publish(self, state, version):
        self.version = version

    def submit(self, w, items, seed):
        f = cf.Future()
        f.items, f.version = items, self.version
        self.jobs.append(f)
        return f

    def finish_all(self):
        for f in self.jobs:
            if not f.done():
                f.set_result([_group(it, f.version, self.spread(it)) for it in f.items])

    def wait(self, jobs):
        self.finish_all()
        return list(jobs)

    def result(self, job):
        return job.result()

    def close(self):
        pass


def _group(item, version, spread):
    samples = [Sample([1], [0.0], None, False, {"correctness": c}) for c in (0.0, spread)]
    return Group(item, [0], samples, version)


ITEMS = [{"question": str(i), "answer": "0", "i": i} for i in range(10)]
REWARD = lambda g: [s.raw["correctness"] for s in g.samples]  # noqa: E731


def test_synchronous_at_staleness_0():
    be = FakeBackend()
    sched = Scheduler(be, ITEMS, RLConfig(prompts_per_step=4, staleness=0), REWARD)
    for step in range(3):
        be.publish(None, step)
        batch = sched.next_batch(step)
        assert {g.version for g in batch} == {step}
        assert not sched.running  # nothing samples while the learner updates
    assert sched.dropped == 0 and len(be.jobs) == 3


def test_rollouts_run_ahead_within_the_bound():
    be = FakeBackend()
    sched = Scheduler(be, ITEMS, RLConfig(prompts_per_step=4, staleness=1), REWARD)
    ages = []
    for step in range(4):
        be.publish(None, step)
        batch = sched.next_batch(step)
        ages += [step - g.version for g in batch]
        assert sched.running  # the next batch is sampled while the learner updates
    assert max(ages) == 1 and sched.dropped == 0


def test_stale_groups_are_dropped_and_informative_first():
    be = FakeBackend(spread=lambda it: it["i"] / 10)  # every group's reward spread differs
    sched = Scheduler(be, ITEMS, RLConfig(prompts_per_step=2, workers=2, staleness=3), REWARD)
    be.publish(None, 0)
    for _ in range(3):  # rollouts ran ahead: six groups queued
        sched._fill()
        be.finish_all()
        sched._collect(list(sched.running))
    queued = sorted(e[3].item["i"] for e in sched.queue)
    assert len(queued) == 6
    batch = sched.next_batch(0)
    assert sorted(g.item["i"] for g in batch) == queued[-2:]  # the widest spreads are served first
    be.finish_all()
    left = len(sched.queue)
    sched._drop_stale(5)  # five versions later everything queued is too old
    assert left > 0 and sched.dropped == left and not sched.queue


def test_prompts_cycle_through_every_item():
    be = FakeBackend()
    sched = Scheduler(be, ITEMS, RLConfig(prompts_per_step=5), REWARD)
    seen = []
    for step in range(2):
        be.publish(None, step)
        seen += [g.item["i"] for g in sched.next_batch(step)]
    assert sorted(seen) == list(range(10))
