"""The planner works on *pinned* configs: ``parallel.dp`` set from the cluster's world size, so a
Plan's config runs as printed and every planner function can recover the run's Layout from the
config alone."""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Optional

from megasft.config import Config, ConfigError
from megasft.layout import Layout

# id(config) -> (config, its Layout) while a `resolved_once` block runs, else None. Planning one
# layout asks for its Layout some fifty times per pipeline stage; the search plans thousands.
_RESOLVED: Optional[dict[int, tuple[Config, Layout]]] = None


def pin(cfg: Config, world_size: int) -> Config:
    """A validated copy of cfg with parallel.dp resolved for world_size (raises ConfigError)."""
    return pin_in_place(copy.deepcopy(cfg), world_size)


def pin_in_place(cfg: Config, world_size: int) -> Config:
    """:func:`pin` without the copy, for a config the caller owns (the search builds thousands)."""
    cfg.validate()
    cfg.parallel.dp = Layout.resolve(cfg, world_size).dp
    return cfg


@contextlib.contextmanager
def resolved_once() -> Iterator[None]:
    """Inside this block configs are not modified, so layout_of resolves each one once. The cache
    holds the configs themselves, so an id is never reused while it lives; it ends with the
    outermost block."""
    global _RESOLVED
    outermost = _RESOLVED is None
    if outermost:
        _RESOLVED = {}
    try:
        yield
    finally:
        if outermost:
            _RESOLVED = None


def layout_of(cfg: Config) -> Layout:
    """The Layout of a pinned config."""
    if _RESOLVED is not None and id(cfg) in _RESOLVED:
        return _RESOLVED[id(cfg)][1]
    p = cfg.parallel
    if p.dp is None:
        raise ConfigError("the planner needs parallel.dp; plan(cfg, cluster) pins it from the cluster size "
                          "(megasft.planner.pinned.pin)")
    layout = Layout.resolve(cfg, p.tp * p.cp * p.pp * p.dp)
    if _RESOLVED is not None:
        _RESOLVED[id(cfg)] = (cfg, layout)
    return layout


def rank_layer_ids(cfg: Config, pp_rank: int) -> list[int]:
    """Global ids of the decoder layers in pipeline rank ``pp_rank``'s chunks of a pinned config."""
    return [i for chunk in layout_of(cfg).rank_chunks(pp_rank) for i in chunk]
