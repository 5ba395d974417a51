import sys
from pathlib import Path

# tests/naive.py is imported as `naive` by the unit tests.
sys.path.insert(0, str(Path(__file__).parent))

# `make test` runs two pytest workers, each taking a whole file at a time in this order
# (pytest-xdist, --dist loadfile --no-loadscope-reorder). The longest files go first, so
# that the two workers finish together instead of one of them starting the longest file
# last (xdist's default order, by test count, put the bench smoke test there); the short
# ones, and then the unit tests, fill in behind them.
LONGEST_FIRST = ["test_bench_smoke.py", "test_storage_faults.py", "test_cluster_shapes.py", "test_job_submit.py",
                 "test_refresh.py", "test_crash_resume.py", "test_changed_inputs.py", "test_embed_stage.py"]


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the other files, and the tests within a file, keep their order
