"""Pipeline parallelism: stage partition, p2p, schedules."""
