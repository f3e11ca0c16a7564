"""Parsing the block lists that users type into the nodes.

Lists come back as ranges, never expanded here: a range such as 1-100000000 is checked
against the model before any index is made, so no input can allocate without bound.
"""
import re

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def parse_index_list(text):
    """"0-3,7" -> [(0, 3), (7, 7)]: inclusive ranges. Raises ValueError naming the bad part."""
    ranges = []
    for part in (p.strip() for p in text.split(",")):
        match = _RANGE.match(part)
        if not match:
            raise ValueError(f"'{part}' is not an index or a range like 3-5")
        first, last = int(match[1]), int(match[2] if match[2] is not None else match[1])
        if last < first:
            raise ValueError(f"range '{part}' runs backwards; write {last}-{first}")
        ranges.append((first, last))
    return ranges


def parse_stage_blocks(text, stages):
    """"input:4,5 output:3-5" -> [("input", 4, 4), ("input", 5, 5), ("output", 3, 5)].

    Groups are separated by spaces or semicolons; each names one of stages.
    """
    chosen = []
    for group in re.split(r"[\s;]+", text.strip()):
        if not group:
            continue
        stage, sep, numbers = group.partition(":")
        stage = stage.strip().lower()
        if not sep or stage not in stages:
            raise ValueError(f"'{group}' should look like {stages[0]}:4,5 with one of {', '.join(stages)} before the colon")
        try:
            chosen += [(stage, first, last) for first, last in parse_index_list(numbers)]
        except ValueError as e:
            raise ValueError(f"in '{group}': {e}") from None
    if not chosen:
        raise ValueError("the list names no block")
    return chosen


def describe_range(first, last):
    return str(first) if first == last else f"{first}-{last}"
