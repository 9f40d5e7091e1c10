"""How learner ranks and CPU engines use a node's cores: a rank's threads are the node's cores shared
among its ranks, not Ray's CPU reservation; a lone rank skips ZeRO's partitioning; an engine runs
the threads it is given, not Ray's OMP_NUM_THREADS."""

from __future__ import annotations

import os

from dynalign.engine import engine_threads
from dynalign.learner import rank_threads
from dynalign.plan import zero_stage_for


def test_the_node_cores_are_shared_evenly_among_its_ranks():
    assert rank_threads(0, ranks_on_node=1, cores=2) == 2  # one rank on a 2-core machine: both cores
    assert rank_threads(0, ranks_on_node=2, cores=2) == 1
    assert rank_threads(0, ranks_on_node=3, cores=8) == 2
    assert rank_threads(0, ranks_on_node=4, cores=2) == 1  # oversubscribed: never zero


def test_a_configured_count_wins_and_the_default_reads_this_process_cores():
    assert rank_threads(3, ranks_on_node=2, cores=2) == 3
    assert rank_threads(0, ranks_on_node=1) == len(os.sched_getaffinity(0))


def test_one_rank_runs_zero_1_and_2_as_stage_0_and_more_ranks_keep_their_stage():
    assert [zero_stage_for(stage, world_size=1) for stage in (0, 1, 2, 3)] == [0, 0, 0, 3]
    assert [zero_stage_for(stage, world_size=2) for stage in (0, 1, 2, 3)] == [0, 1, 2, 3]


def test_an_engine_runs_the_threads_it_is_given_but_never_more_than_its_cores():
    cores = len(os.sched_getaffinity(0))
    assert engine_threads(1) == 1
    assert engine_threads(cores) == cores
    assert engine_threads(cores + 5) == cores
