"""report.md's parts that read only report.json's dictionaries."""

from __future__ import annotations

from pyprune.compile.report import _marginal_lines, _teacher_line


def move(phase, kind, setting, accuracy, size, verified=False, accepted=False):
    return {"phase": phase, "kind": kind, "setting": setting, "accuracy": accuracy, "bytes": size,
            "verified": verified, "accepted": accepted, "rate": None, "levels": str(setting)}


def table_rows(lines):
    return [line for line in lines if line.startswith("| trade") or line.startswith("| swap")]


def test_rows_the_search_answered_from_memory_are_marked_again():
    moves = [move("trade", "a+1", (1, 0), 0.90, 2048),
             move("trade", "b+1", (0, 1), 0.91, 3072, verified=True, accepted=True),
             move("trade", "a+1", (1, 1), 0.88, 1024),
             move("swap", "b-1,a+1", (1, 0), 0.90, 2048),  # the first row's screen, asked again
             move("swap", "a-1,b+2", (0, 1), 0.91, 3072, verified=True),  # the accepted measurement, again
             move("trade", "b+1", (0, 1), 0.92, 3072, verified=True)]  # measured again (more effort): new
    lines = _marginal_lines({"stages": [], "moves": moves})
    rows = table_rows(lines)
    assert [row.split(" | ")[5] for row in rows] == ["screen", "yes", "screen", "screen (again)", "yes (again)", "yes"]
    assert "- (again): 2 rows repeat an earlier row's result from the search's memory; they took no time" in lines
    assert not any("(again)" in line for line in _marginal_lines({"stages": [], "moves": moves[:3]}))


def test_the_teacher_line_counts_batches_and_is_absent_without_distillation():
    assert _teacher_line({"computed": 1200, "reused": 3400}) == [
        "- distillation: the teacher's outputs computed for 1,200 batches, remembered for 3,400 more "
        "(every fine-tune replays the same seeded batches)"]
    assert _teacher_line({"computed": 0, "reused": 0}) == [] and _teacher_line(None) == []
