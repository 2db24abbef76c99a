from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import start_swapd, tagged_processes, wait_until  # noqa: E402

# the browser and open_page fixtures of the web UI tests (playwright is imported only when they are used)
pytest_plugins = ["browser_util"]


@pytest.fixture
def swapd(tmp_path):
    """Start swapd processes; on teardown stop them and prove nothing leaked.

    Every backend carries the test's tag in its environment, so a process
    that outlives swapd's shutdown is found whatever it was.
    """
    started = []

    def start(models: dict, **kw):
        instance = start_swapd(tmp_path, models, **kw)
        started.append(instance)
        return instance

    yield start

    problems = []
    for instance in started:
        code = instance.terminate()
        if code not in (0, -9):
            problems.append(f"swapd exited with {code}:\n{instance.log_text()[-3000:]}")
        try:
            wait_until(lambda: not tagged_processes(instance.tag), timeout=10, message="backends to exit")
        except AssertionError:
            leaked = tagged_processes(instance.tag)
            for proc in leaked:
                proc.kill()
            problems.append(f"leaked processes after shutdown: {[p.pid for p in leaked]}")
    if problems:
        pytest.fail("\n".join(problems))
