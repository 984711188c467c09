"""Search: greedy, beam and sampling, over the incremental model interface."""

from rosetta.decode.beam import beam_search
from rosetta.decode.common import Hypothesis, Lengths
from rosetta.decode.greedy import greedy_search
from rosetta.decode.sampling import sample

__all__ = ["Hypothesis", "Lengths", "beam_search", "greedy_search", "sample"]
