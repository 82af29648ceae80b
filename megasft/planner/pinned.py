"""The planner works on *pinned* configs: ``parallel.dp`` set from the cluster's world size, so a
Plan's config runs as printed and every planner function can recover the run's Layout from the
config alone."""
from __future__ import annotations

import copy

from megasft.config import Config, ConfigError
from megasft.layout import Layout


def pin(cfg: Config, world_size: int) -> Config:
    """A validated copy of cfg with parallel.dp resolved for world_size (raises ConfigError)."""
    new = copy.deepcopy(cfg).validate()
    new.parallel.dp = Layout.resolve(new, world_size).dp
    return new


def layout_of(cfg: Config) -> Layout:
    """The Layout of a pinned config."""
    p = cfg.parallel
    if p.dp is None:
        raise ConfigError("the planner needs parallel.dp; plan(cfg, cluster) pins it from the cluster size "
                          "(megasft.planner.pinned.pin)")
    return Layout.resolve(cfg, p.tp * p.pp * p.dp)
