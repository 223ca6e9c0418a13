"""controller/agent_records.py: an agent's execution summary read one way for the collector and
the read side: names from tags, the end honouring truncated_seq, events cut to a line count."""

from __future__ import annotations

from typing import Any

from controller.agent_records import fit, has_ended, last_seq, line_count, of_run

RUN = "r0000000100000000000a"


def summary(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"id": "e1", "state": "exited", "next_seq": 10,
                            "truncated_seq": None, "no_log": False,
                            "tags": {"run": RUN, "host": "web1", "task": "t1"}}
    return {**base, **fields}


def test_names_come_from_tags_and_other_runs_are_not_the_runs() -> None:
    found = of_run(RUN, "node1", summary())
    assert found is not None
    assert (found.host, found.node, found.execution_id, found.task_id) \
        == ("web1", "node1", "e1", "t1")
    bare = of_run(RUN, "node1", summary(tags={"run": RUN}))
    assert bare is not None and (bare.host, bare.task_id) == ("node1", None)
    assert of_run(RUN, "node1", summary(tags={"run": "r" + "0" * 20})) is None
    assert of_run(RUN, "node1", summary(tags=None)) is None
    assert of_run(RUN, "node1", summary(id=None)) is None


def test_a_truncated_execution_ends_at_its_truncation() -> None:
    """Cut at 4 (its spool was full), its next_seq counts on to 10: every line it kept is
    read at 4."""
    cut = summary(truncated_seq=4)
    assert last_seq(cut) == 4 and has_ended(cut, 4) and not has_ended(cut, 3)
    assert of_run(RUN, "n", cut).readable_seq == 4  # type: ignore[union-attr]
    assert has_ended(summary(), 4, truncated_seq=4)  # an output page says it apart
    assert not has_ended(summary(), 9) and has_ended(summary(), 10)
    assert not has_ended(summary(state="running", truncated_seq=4), 4)
    assert not has_ended(summary(next_seq=None), 100)


def test_fit_cuts_to_a_line_count() -> None:
    events = [{"seq": 0, "lines": ["a", "b", "c"], "stream": "stdout"},
              {"seq": 3, "lines": ["d", "e"], "stream": "stderr"}]
    assert fit(events, 10) == events
    cut = fit(events, 4)
    assert line_count(cut) == 4 and cut[1] == {"seq": 3, "lines": ["d"], "stream": "stderr"}
    assert fit(events, 2) == [{"seq": 0, "lines": ["a", "b"], "stream": "stdout"}]
    assert fit(events, 0) == []
