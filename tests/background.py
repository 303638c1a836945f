"""Jobs that start in the background as a test session starts, so that the second core works too.

Most of the suite runs one thread in one process: on a two-core machine one core would sit idle. A few
fixtures are long and self-contained: they run train.py, study.py or nvcc in processes of their own, then
their tests read what came out. `@background` turns such a function into a session fixture, and
conftest.py starts every one that a selected test uses when collection ends: one job at a time, in a thread
that only waits on processes. The tests that read a job's result move to the end of the session, in the order
the jobs run, so the first core runs every other test meanwhile. A test whose job nobody has started yet
runs it itself, at once, and one whose job runs elsewhere makes the jobs nobody has started meanwhile; so a
job runs once, whoever runs it, and both cores work to the end.
"""
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

JOBS = {}  # fixture name -> Job, for every job of the test modules collected
LIVE = set()  # the processes the jobs run now: killed when the session ends
STATE = {"folder": None, "stopping": False, "worker": None, "queue": []}  # queue: the jobs in order


class Job:
    """A fixture's value, made once by make(folder): in the background thread, or by the first test to ask."""

    def __init__(self, make):
        self.make, self.name = make, make.__name__
        self.started, self.done = threading.Lock(), threading.Event()
        self.value, self.error = None, None

    def run(self):
        """Make the value here, unless another thread has started to -> whether this call made it."""
        if not self.started.acquire(blocking=False):
            return False
        try:
            folder = session_folder() / self.name
            folder.mkdir()
            self.value = self.make(folder)
        except BaseException as e:  # handed to the test that asks, as its own failure
            self.error = e
        finally:
            self.done.set()
        return True

    def result(self):
        """The value: made here if nobody has started it; while another thread makes it, this one makes the
        jobs that nobody has started yet, so that both cores work until the end."""
        while not self.run() and not self.done.is_set():
            if not any(job.run() for job in STATE["queue"]):
                break
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.value


def background(make):
    """make(folder) -> a session fixture of make's name whose value it makes, started in the background as
    the session starts. make may only run processes (run() below): it runs beside the tests."""
    assert make.__name__ not in JOBS, f"two background jobs named {make.__name__}"
    job = JOBS[make.__name__] = Job(make)

    @pytest.fixture(scope="session", name=make.__name__)
    def fixture():
        return job.result()
    fixture.__doc__ = make.__doc__
    return fixture


def run(cmd, timeout, **kw):
    """subprocess.run(cmd, capture_output=True, text=True) in a process group of its own, which the end of
    the session kills (a study's or torchrun's children too) -> the finished process."""
    if STATE["stopping"]:
        raise RuntimeError("the test session has ended")
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)
    LIVE.add(proc)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:  # a timeout, or Ctrl-C while a test waits: the job's processes go too
        kill(proc)
        proc.communicate()
        raise
    finally:
        LIVE.discard(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def kill(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # gone already
        pass


def session_folder():
    if STATE["folder"] is None:
        STATE["folder"] = Path(tempfile.mkdtemp(prefix="nanocit-background-"))
    return STATE["folder"]


def jobs_of(item):
    return [name for name in item.fixturenames if name in JOBS]


def reorder(items):
    """Move the tests that read a job's result to the end, grouped by job in the order the jobs run (pytest's:
    the slowest job, the compile of attention.cu, is in the first test file, so it starts first); the rest
    keep their order and run first, beside the jobs."""
    order = list(dict.fromkeys(name for item in items for name in jobs_of(item)))

    def group(item):  # -1 for a test that reads no job: those keep their place at the front
        return max((order.index(name) for name in jobs_of(item)), default=-1)
    items.sort(key=group)  # stable: within a group, pytest's own order


def start(items):
    """Start, in one background thread, every job that these (reordered) tests use, in the order they read
    them."""
    STATE["queue"] = [JOBS[name] for name in dict.fromkeys(name for item in items for name in jobs_of(item))]
    if STATE["queue"]:
        session_folder()  # made here, before two threads could both make one
        STATE["worker"] = threading.Thread(target=work, args=(STATE["queue"],), name="background",
                                           daemon=True)
        STATE["worker"].start()


def work(jobs):
    for job in jobs:
        job.run()


def stop():
    """Kill what still runs (a session stopped early: -x, Ctrl-C) and remove the jobs' folder."""
    STATE["stopping"] = True
    for proc in list(LIVE):
        kill(proc)
    if STATE["worker"] is not None:
        STATE["worker"].join(timeout=60)
    if STATE["folder"] is not None:
        shutil.rmtree(STATE["folder"], ignore_errors=True)
