"""Readers of a published run survive a republish while they render: an open RunStore holds its version
(a shared flock), so the publisher keeps it until the reader closes, instead of deleting it under the
reader (which gave DuckDB I/O errors). A hold has a maximum age (MAX_HOLD_SECONDS after the republish):
past it the version is reclaimed, and its reader gets VersionReclaimed (reopen) rather than an I/O error.
Unit tier (no model)."""

from __future__ import annotations

import datetime
import os
import shutil
import threading

import duckdb
import numpy as np
import pandas as pd
import pytest

from analysis.store import RunStore, RunWriter, run_status
from analysis.store.layout import _utc_now
from analysis.store.publish import (
    MAX_HOLD_SECONDS,
    VersionReclaimed,
    collect_versions,
    hold_version,
    release_version,
    superseded_at,
)
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


# ---------------------------------------------------------------- the maximum age of a hold (injected clock)

LATER = datetime.timedelta(seconds=MAX_HOLD_SECONDS + 60)
SOONER = datetime.timedelta(seconds=MAX_HOLD_SECONDS - 60)


def collect_at(root, keep: str, after: datetime.timedelta) -> list[str]:
    """Collect the run's old versions as if ``after`` had passed since the newest publish."""
    return collect_versions("demo", root / "runs" / ".versions", keep=keep, now=_utc_now() + after)


def test_a_stuck_reader_keeps_its_version_only_for_the_maximum_age(tmp_path):
    publish(tmp_path, 3)
    stuck = RunStore("demo", tmp_path)  # never closed: a stuck page, or a store left in a cache
    assert len(stuck.table("examples")) == 3
    publish(tmp_path, 4)
    current = os.readlink(tmp_path / "runs" / "demo").rsplit("/", 1)[-1]
    assert collect_at(tmp_path, current, SOONER) == [stuck.dir.name]  # within the age: still held
    assert stuck.dir.is_dir() and not stuck.reclaimed()
    assert collect_at(tmp_path, current, LATER) == []  # past it: reclaimed although held
    assert versions(tmp_path) == [current]
    assert stuck.reclaimed()
    with pytest.raises(VersionReclaimed, match="reclaimed after being held more than 30 minutes; reload"):
        stuck.table("predictions")  # a clear message, not DuckDB's I/O error
    with pytest.raises(VersionReclaimed):
        stuck.examples()
    with pytest.raises(VersionReclaimed):
        stuck.read_json("manifest")
    stuck.close()
    with RunStore("demo", tmp_path) as fresh:  # reopening reads the current version
        assert fresh.dir.name == current and len(fresh.table("examples")) == 4


def test_the_age_counts_from_the_republish_not_from_the_version_s_own_publish(tmp_path):
    """A version that was current for long and superseded a moment ago is not reclaimable yet."""
    publish(tmp_path, 2)
    names = ["demo-20250101T000000000000Z-00000001", "demo-20250101T020000000000Z-00000002"]
    assert superseded_at(names[0], names) == datetime.datetime(2025, 1, 1, 2, tzinfo=datetime.UTC)
    assert superseded_at(names[1], names) is None  # the newest is never superseded
    store = RunStore("demo", tmp_path)
    publish(tmp_path, 3)
    current = os.readlink(tmp_path / "runs" / "demo").rsplit("/", 1)[-1]
    assert collect_at(tmp_path, current, datetime.timedelta(0)) == [store.dir.name]
    store.close()


def test_a_reclaim_in_the_middle_of_a_read_is_the_clear_message(tmp_path, monkeypatch):
    """The collector deletes the version between the reader's check and DuckDB opening the file."""
    publish(tmp_path, 3)
    store = RunStore("demo", tmp_path)
    publish(tmp_path, 4)
    current = os.readlink(tmp_path / "runs" / "demo").rsplit("/", 1)[-1]
    calls = []  # the check before the read passes (the version is reclaimed right after it)
    real = RunStore.reclaimed
    monkeypatch.setattr(store, "reclaimed", lambda: bool(calls.append(1) or len(calls) > 1) and real(store))
    collect_at(tmp_path, current, LATER)
    with pytest.raises(VersionReclaimed) as info:
        store.table("predictions")
    assert isinstance(info.value.__cause__, (duckdb.IOException, FileNotFoundError))  # what a page saw before
    store.close()


def test_readers_racing_reclaims_see_whole_versions_or_the_clear_message(tmp_path):
    """Reader threads keep stores open across republishes while each publish is followed by a reclaim of
    every held version: a read returns one whole version or raises VersionReclaimed, nothing else."""
    publish(tmp_path, 2)
    errors: list[BaseException] = []
    reclaimed = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            store = RunStore("demo", tmp_path)
            try:
                for _ in range(20):
                    n = len(store.table("examples"))
                    scores = store.table("predictions")["score"].to_numpy()
                    assert len(scores) == n and np.all(scores == n)
            except VersionReclaimed:
                reclaimed.append(1)
            except BaseException as exc:  # noqa: BLE001 - every other failure is collected and reported
                errors.append(exc)
                return
            finally:
                store.close()

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for n in range(3, 11):
        publish(tmp_path, n)
        collect_at(tmp_path, os.readlink(tmp_path / "runs" / "demo").rsplit("/", 1)[-1], LATER)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert len(versions(tmp_path)) == 1
