"""Speculative decoding's parts that need no model: the n-gram proposer (prompt lookup). Plain Python."""

from __future__ import annotations

from stagecoach.coordinator.speculative import NgramIndex, NgramProposer


def reader(tokens: list[int]):
    return lambda start, end: tokens[start:end]


def test_the_longest_suffix_seen_before_proposes_what_followed_its_latest_occurrence():
    tokens = [1, 2, 3, 4, 5, 9, 9, 1, 2, 3]
    p = NgramProposer(num_tokens=4, min_match=1, max_match=3)
    assert p.propose(0, reader(tokens), len(tokens), 8) == [4, 5, 9, 9]  # "1 2 3" at 0
    tokens.append(4)
    assert p.propose(0, reader(tokens), len(tokens), 8) == [5, 9, 9, 1]  # "2 3 4" at 1
    tokens += [7, 7, 7]
    # "7 7 7" never occurred before; "7 7" ends at 13 (its latest occurrence with a token after it): [7]
    assert p.propose(0, reader(tokens), len(tokens), 8) == [7]
    assert p.propose(0, reader(tokens), len(tokens), 0) == []  # max_tokens 0: nothing to propose
    assert p.propose(1, reader([6, 8, 5]), 3, 8) == []  # no suffix seen before
    assert p.propose(2, reader([1, 2, 1, 2]), 4, 1) == [1]  # capped by max_tokens


def test_min_match_is_the_shortest_suffix_looked_up():
    tokens = [5, 1, 6, 2, 7, 1]
    assert NgramProposer(3, 1, 3).propose(0, reader(tokens), 6, 3) == [6, 2, 7]
    assert NgramProposer(3, 2, 3).propose(0, reader(tokens), 6, 3) == []  # "7 1" never occurred before


def test_the_index_reads_only_new_tokens_and_a_window_before_them():
    tokens = list(range(100)) + list(range(50))
    reads = []

    def tokens_of(start, end):
        reads.append(end - start)
        return tokens[start:end]

    index = NgramIndex(2, 4)
    assert index.propose(tokens_of, len(tokens), 5) == [50, 51, 52, 53, 54]
    reads.clear()
    tokens.append(50)
    assert index.propose(tokens_of, len(tokens), 5) == [51, 52, 53, 54, 55]
    assert max(reads) <= 4 + 2 + 5  # a step reads the new token, max_match before it, the suffix and the proposal
