"""Context parallelism: one packed row split along the sequence over the ``cp`` ranks of a CP group.

sharding.py      which tokens of a row each CP rank holds (2*cp load-balanced chunks of every document),
                 and the split of a micro-batch (labels shifted on the full row first)
attention.py     attention across the split, by parallel.cp_comm:
  ring.py        K/V blocks around the CP ring, online-softmax merge, dK/dV travelling home
  ulysses.py     all-to-all (Ulysses) from sequence to head sharding and back
  allgather.py   every rank gathers the whole rows' K/V
block_kernel.py  the ring's per-block attention with log-sum-exp (torch math; a flash kernel fits it)
volume.py        bytes each rank sends per attention call (the planner's and the ledger's number)
"""
