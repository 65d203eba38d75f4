"""The worker plan of the suite (support/workers.py) stays true to the files it names."""

from __future__ import annotations

import re
from pathlib import Path

from support.workers import LONGEST_FIRST, SHARED_FIXTURE, work_unit

INTEGRATION = Path(__file__).resolve().parents[1] / "integration"


def test_every_named_file_exists():
    names = {p.name for p in INTEGRATION.glob("test_*.py")}
    assert set(LONGEST_FIRST) <= names
    assert set(SHARED_FIXTURE) <= names


def test_every_file_that_reads_the_shared_run_goes_to_one_worker():
    readers = {p.name for p in INTEGRATION.glob("test_*.py")
               if re.search(r"def test_\w+\([^)]*\be2e_run\b", p.read_text())}
    assert readers == set(SHARED_FIXTURE)
    assert len({work_unit(f"tests/integration/{name}::test_x") for name in readers}) == 1


def test_other_files_are_their_own_unit():
    nodeid = "tests/integration/test_demo.py::test_demo_table"
    assert work_unit(nodeid) == "tests/integration/test_demo.py"
