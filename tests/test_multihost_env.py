"""jaxpost.distributed.initialize: which environment starts a multi-process run, and its errors."""

from __future__ import annotations

import pytest

from jaxpost import distributed


@pytest.fixture
def env(monkeypatch):
    for k in ("JAXPOST_COORDINATOR", "JAXPOST_NUM_PROCESSES", "JAXPOST_PROCESS_ID", "JAXPOST_DISTRIBUTED"):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_no_variables_means_a_single_process(env):
    assert distributed.initialize() is False
    assert distributed.is_main_process()


@pytest.mark.parametrize("values, message", [
    ({}, "JAXPOST_NUM_PROCESSES is not"),
    ({"JAXPOST_NUM_PROCESSES": "2"}, "JAXPOST_PROCESS_ID is not"),
    ({"JAXPOST_NUM_PROCESSES": "two", "JAXPOST_PROCESS_ID": "0"}, "JAXPOST_NUM_PROCESSES must be an integer"),
    ({"JAXPOST_NUM_PROCESSES": "2", "JAXPOST_PROCESS_ID": "2"}, r"JAXPOST_PROCESS_ID=2 must be in \[0, "),
    ({"JAXPOST_NUM_PROCESSES": "0", "JAXPOST_PROCESS_ID": "0"}, "JAXPOST_PROCESS_ID=0 must be in"),
])
def test_a_coordinator_needs_a_valid_process_count_and_id(env, values, message):
    env.setenv("JAXPOST_COORDINATOR", "127.0.0.1:1")
    for k, v in values.items():
        env.setenv(k, v)
    with pytest.raises(ValueError, match=message):
        distributed.initialize()
