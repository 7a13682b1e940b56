"""The data item of a checkpoint: one iterator state for every host; older per-host states still read."""

import logging

import orbax.checkpoint as ocp

from jaxpost.train import Checkpointer, abstract_with_shardings, init_state, make_optimizer
from test_train_fixtures import init_params


def _state():
    return init_state(init_params(), make_optimizer("adamw", learning_rate=1e-3))


def test_one_data_state_restores_without_warning(tmp_path, caplog):
    state = _state()
    ck = Checkpointer(tmp_path, save_every=1, async_save=False)
    ck.save(1, state, data_state={"grain": 3, "stats": {}})
    assert ck.data_states(1) == [{"grain": 3, "stats": {}}]
    with caplog.at_level(logging.WARNING, logger="jaxpost"):
        restored = ck.restore(1, abstract_with_shardings(state))
    ck.close()
    assert restored.data_state == {"grain": 3, "stats": {}} and restored.data_states == [restored.data_state]
    assert not caplog.records


def test_older_checkpoint_with_per_process_states_restores_process_zero(tmp_path, caplog):
    # Written when each host read rows[h::N]: ``process_states`` holds every host's own position.
    state = _state()
    ck = Checkpointer(tmp_path, save_every=1, async_save=False)
    for step, states in ((1, [{"p": 0}]), (2, [{"p": 0}, {"p": 1}])):
        ck._manager.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({"state": states[0], "process_states": states}),
            config=ocp.args.JsonSave({"gin": ""})))
    ck.wait_until_finished()
    abstract = abstract_with_shardings(state)
    with caplog.at_level(logging.WARNING, logger="jaxpost"):
        one = ck.restore(1, abstract)
        assert not caplog.records  # one process: its position is a position in all rows
        two = ck.restore(2, abstract)
    ck.close()
    assert one.data_state == {"p": 0} and two.data_state == {"p": 0} and two.data_states == [{"p": 0}, {"p": 1}]
    assert len(caplog.records) == 1 and "order differs" in caplog.records[0].getMessage()
