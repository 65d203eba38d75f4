"""How the suite is spread over pytest workers (the README runs `pytest -n 2`).

Whole files go to whichever worker is free (`--dist loadfile`, set in pyproject.toml), so a
file's module fixtures run once. Two rules on top:
- files that share an expensive session fixture go to the same worker, or each worker would
  build it (the operator's end-to-end run, `e2e_run`, is read by four files);
- the end-to-end files start first, longest first: most of the wall time is a dozen of them
  whose stage processes leave a core idle while they wait on each other, and the hundreds of
  quick tests then fill the gaps instead of one long file running alone at the end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

LONGEST_FIRST = (
    "test_quality_quick.py", "test_operator_faults.py", "test_demo.py", "test_gang_e2e.py",
    "test_controlplane_faults.py", "test_local_sites.py", "test_federated_e2e.py",
    "test_local_e2e.py", "test_chart_install.py", "test_distributed_training.py",
    "test_cluster_jobs.py", "test_controlplane.py", "test_kueue.py",
)
# file -> the shared session fixture that ties it to other files
SHARED_FIXTURE = {name: "e2e_run" for name in ("test_chart_install.py", "test_operator_e2e.py",
                                                "test_prometheus.py", "test_rbac.py")}


def work_unit(nodeid: str) -> str:
    """The unit of work a test belongs to: its file, or the fixture its file shares."""
    path = nodeid.split("::", 1)[0]
    return SHARED_FIXTURE.get(Path(path).name, path)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    if config.getvalue("dist") != "loadfile":
        return None  # another --dist asked for: xdist's own
    from xdist.scheduler import LoadFileScheduling

    config.option.loadscopereorder = False  # xdist's default puts the files with most tests first

    class SharedFixtureScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return SharedFixtureScheduling(config, log)
