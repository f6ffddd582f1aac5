"""`gradients_rolled_back`: the audit's count of gradients lost with dead learners, from
the events log alone (the whole audit runs in tests/test_chaos.py)."""

from metalearn.training.audit import gradients_rolled_back


def _restart(dead, seen, restored_received):
    return {"event": "learner_restart", "dead_generation": dead,
            "dead_received_seen": seen, "restored_counters": {"received": restored_received}}


def test_a_restart_rolls_back_what_the_dead_learner_received_after_its_checkpoint():
    events = [{"event": "session_start", "learner_counters": {"received": 0}},
              _restart("a", 595, 220),
              {"event": "session_end", "generation": "b", "received_seen": {"a": 595}}]
    assert gradients_rolled_back(events) == 375


def test_replies_handled_after_the_restart_event_count():
    # Two more replies of the dead learner "a" were handled after the event was written.
    events = [{"event": "session_start"}, _restart("a", 100, 40),
              {"event": "session_end", "generation": "b", "received_seen": {"a": 102}}]
    assert gradients_rolled_back(events) == 62


def test_a_learner_that_died_at_exit_rolls_back_to_the_checkpoint_the_resume_restored():
    # Session 0's learner "a" received 350 gradients, the last checkpoint held 282, and it
    # was killed just before the interrupt: the resume restores 282.
    events = [{"event": "session_start", "learner_counters": {"received": 0}},
              {"event": "session_end", "generation": "a", "received_seen": {"a": 350},
               "learner_died_at_exit": True, "learner_counters": {}},
              _restart("x", 0, 282),  # a restart while the next session started
              {"event": "session_start", "learner_counters": {"received": 282}},
              {"event": "session_end", "generation": "c", "received_seen": {"c": 300},
               "learner_died_at_exit": False}]
    assert gradients_rolled_back(events) == 68


def test_a_clean_exit_rolls_back_nothing_and_old_logs_still_read():
    events = [{"event": "session_start"},
              {"event": "session_end", "generation": "a", "received_seen": {"a": 350}},
              {"event": "session_start", "learner_counters": {"received": 350}},
              _restart("b", 380, 360)]  # no session_end: the driver was killed
    assert gradients_rolled_back(events) == 20
