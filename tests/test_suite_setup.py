"""The test suite's own machinery: tests that share what they start run on one pytest-xdist worker."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

GROUPED = '''
import os

import pytest


@pytest.fixture(scope="module")
def started():
    with open("starts.log", "a") as log:  # one line per start of the shared fixture
        log.write(os.environ["PYTEST_XDIST_WORKER"] + "\\n")


@pytest.mark.xdist_group("shared")
def test_one(started):
    pass


@pytest.mark.xdist_group("shared")
def test_two(started):
    pass


@pytest.mark.parametrize("i", range(6))
def test_filler(i):
    pass
'''


def test_an_xdist_group_runs_on_one_worker_and_starts_its_fixture_once(tmp_path):
    """`make test` runs `pytest -n 2 --dist loadgroup`; tests marked with one xdist_group must land
    on one worker (pytest 9.2 ignores how pytest-xdist 3.8 tags them; conftest re-tags them)."""
    (tmp_path / "test_grouped.py").write_text(GROUPED)
    (tmp_path / "conftest.py").write_text("from tests.conftest import pytest_collection_modifyitems  # noqa: F401\n")
    ran = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadgroup",
                          "--rootdir", str(tmp_path), str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    assert len((tmp_path / "starts.log").read_text().split()) == 1
