"""Context parallelism: one packed row split along the sequence over the ``cp`` ranks of a CP group.

sharding.py  which tokens of a row each CP rank holds (2*cp load-balanced chunks of every document)
"""
