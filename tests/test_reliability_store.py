"""Readers of a published run survive a republish while they render: an open RunStore holds its version
(a shared flock), so the publisher keeps it until the reader closes, instead of deleting it under the
reader (which gave DuckDB I/O errors). Unit tier (no model)."""

from __future__ import annotations

import shutil
import threading

import duckdb
import numpy as np
import pandas as pd
import pytest

from analysis.store import RunStore, RunWriter, run_status
from analysis.store.publish import collect_versions, hold_version, release_version
from tests.reliability_helpers import python

REPUBLISH = """
import sys
import pandas as pd
from analysis.store import RunWriter
n = int(sys.argv[2])
with RunWriter("demo", root=sys.argv[1]) as w:
    w.write_table("examples", pd.DataFrame({"example_index": range(n), "text": [f"v{n}"] * n}))
    w.write_table("predictions", pd.DataFrame({"example_index": range(n), "score": [float(n)] * n}))
"""


def publish(root, n: int) -> None:
    with RunWriter("demo", root=root) as w:
        w.write_table("examples", pd.DataFrame({"example_index": range(n), "text": [f"v{n}"] * n}))
        w.write_table("predictions", pd.DataFrame({"example_index": range(n), "score": [float(n)] * n}))


def versions(root) -> list[str]:
    return sorted(p.name for p in (root / "runs" / ".versions").iterdir())


def test_the_fault_a_version_deleted_under_an_open_reader_is_an_io_error(tmp_path):
    """What readers got before: the superseded version was deleted right after a publish."""
    publish(tmp_path, 3)
    store = RunStore("demo", tmp_path)
    assert len(store.table("examples")) == 3
    shutil.rmtree(store.dir)
    with pytest.raises((duckdb.IOException, FileNotFoundError)):  # DuckDB's, or pyarrow's reading the schema
        store.table("predictions")


def test_a_republish_in_another_process_while_a_reader_renders(tmp_path):
    publish(tmp_path, 3)
    store = RunStore("demo", tmp_path)
    first = store.table("examples")  # the page has started rendering
    proc = python(REPUBLISH, [tmp_path, 5])
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    assert not store.is_current() and len(versions(tmp_path)) == 2
    pd.testing.assert_frame_equal(store.table("examples"), first)  # the rest of the page: same version
    assert store.table("predictions")["score"].tolist() == [3.0] * 3
    with RunStore("demo", tmp_path) as fresh:  # the next render opens the new one
        assert len(fresh.table("examples")) == 5
    store.close()  # the last reader of the old version is gone
    assert collect_versions("demo", tmp_path / "runs" / ".versions", keep=fresh.dir.name) == []
    assert versions(tmp_path) == [fresh.dir.name]
    assert run_status("demo", tmp_path).state not in ("missing", "partial")


def test_readers_and_publishers_at_once_never_fail(tmp_path):
    """Three reader threads open, query and close stores while six publishes swap the run under them."""
    publish(tmp_path, 2)
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            try:
                with RunStore("demo", tmp_path) as store:
                    n = len(store.table("examples"))
                    scores = store.table("predictions")["score"].to_numpy()
                    assert len(scores) == n and np.all(scores == n)  # one version throughout
            except BaseException as exc:  # noqa: BLE001 - every failure is collected and reported
                errors.append(exc)
                return

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for n in range(3, 9):
        publish(tmp_path, n)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    publish(tmp_path, 9)  # no reader left: only the current version stays
    assert len(versions(tmp_path)) == 1


def test_a_held_version_is_kept_and_a_collected_one_is_not_held(tmp_path):
    publish(tmp_path, 2)
    with RunStore("demo", tmp_path) as store:
        old = store.dir
        hold = hold_version(old)  # a second reader of the same version
        store.close()
        publish(tmp_path, 3)
        assert old.is_dir()  # still held by the second reader
        release_version(hold)
    publish(tmp_path, 4)
    assert not old.exists()
    assert hold_version(old) is None  # gone: a reader resolves the link again
