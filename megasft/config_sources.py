"""``data.sources``: a dataset mixture in the run configuration, typed and checked up front.

    data:
      sources:
        - {name: chat,  path: data/chat,  weight: 0.7, eval_fraction: 0.01}
        - {name: code,  path: data/code,  weight: 0.3, eval_path: data/code_eval}
        - {name: safety, path: data/safety, epochs: 3}

Each source gives exactly one of ``weight`` (its fraction of the trained tokens of every global
batch, over the run) or ``epochs`` (passes over it). With weights only, they sum to 1 and
train.steps sets the run's length; an ``epochs`` source fixes its own trained tokens, the weight
sources share what remains (their weights sum to < 1) and the run ends when every epochs source has
been trained that many times (megasft.data.mixture derives and prints the step count).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

from megasft.errors import ConfigError

WEIGHT_SUM_TOLERANCE = 1e-6   # weights written as decimals (0.1 + 0.2 + 0.7) sum to 1 only this closely


@dataclass
class SourceConfig:
    name: str
    """Unique label of the source in the plan, the eval log and metrics.jsonl (eval_loss/<name>)."""
    path: str
    """Indexed dataset directory written by megasft preprocess."""
    weight: Optional[float] = None
    """Fraction (0, 1] of the trained tokens of the run drawn from this source."""
    epochs: Optional[int] = None
    """Passes over this source instead of a weight (each document trained exactly this many times)."""
    eval_fraction: float = 0.0
    """Fraction [0, 1) of this source's documents held out for its eval split."""
    eval_path: Optional[str] = None
    """Separate indexed dataset for this source's eval split (instead of eval_fraction)."""


SOURCE_KEYS = [f.name for f in fields(SourceConfig)]


def read_sources(raw) -> Optional[list[SourceConfig]]:
    """data.sources as read from YAML (a list of mappings, or SourceConfig already) -> typed list."""
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"data.sources must be a non-empty list of {{name, path, weight | epochs}} "
                          f"mappings, got {raw!r}")
    out = []
    for i, item in enumerate(raw):
        if isinstance(item, SourceConfig):
            out.append(item)
            continue
        where = f"data.sources[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where} must be a mapping such as {{name: chat, path: data/chat, weight: 0.5}}, "
                              f"got {item!r}")
        unknown = sorted(set(item) - set(SOURCE_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid keys: {SOURCE_KEYS}")
        for key in ("name", "path"):
            if not isinstance(item.get(key), str) or not item[key]:
                raise ConfigError(f"{where}.{key} must be a non-empty string, got {item.get(key)!r}")
        kwargs = dict(item)
        for key in ("weight", "eval_fraction"):
            if key in kwargs and kwargs[key] is not None:
                value = kwargs[key]
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ConfigError(f"{where}.{key} must be a number, got {value!r}")
                kwargs[key] = float(value)
        if kwargs.get("epochs") is not None and (isinstance(kwargs["epochs"], bool)
                                                 or not isinstance(kwargs["epochs"], int)):
            raise ConfigError(f"{where}.epochs must be an integer, got {kwargs['epochs']!r}")
        out.append(SourceConfig(**kwargs))
    return out


def check_sources(data, train) -> None:
    """The mixture's rules (no filesystem access: megasft.train checks the paths, source_paths)."""
    sources = read_sources(data.sources)
    if sources is None:
        return
    names = [s.name for s in sources]
    for s in sources:
        where = f"data.sources[{s.name}]"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", s.name):
            raise ConfigError(f"{where}: name {s.name!r} may hold only letters, digits, '_', '.', '-' "
                              "(it names metrics keys eval_loss/<name>)")
        if names.count(s.name) > 1:
            raise ConfigError(f"data.sources: the name {s.name!r} is used {names.count(s.name)} times; "
                              "give every source its own name")
        if (s.weight is None) == (s.epochs is None):
            raise ConfigError(f"{where} needs exactly one of weight (a fraction of the trained tokens) or "
                              f"epochs (passes over the source); it has "
                              f"{'both' if s.weight is not None else 'neither'}")
        if s.weight is not None and not 0 < s.weight <= 1:
            raise ConfigError(f"{where}.weight={s.weight} must be in (0, 1]")
        if s.epochs is not None and s.epochs < 1:
            raise ConfigError(f"{where}.epochs={s.epochs} must be >= 1")
        if not 0 <= s.eval_fraction < 1:
            raise ConfigError(f"{where}.eval_fraction={s.eval_fraction} must be in [0, 1)")
        if s.eval_path is not None and s.eval_fraction:
            raise ConfigError(f"{where} has both eval_path and eval_fraction; keep one")
    weights = [s.weight for s in sources if s.weight is not None]
    total = sum(weights)
    if len(weights) == len(sources) and abs(total - 1) > WEIGHT_SUM_TOLERANCE:
        listed = " + ".join(f"{w:g}" for w in weights)
        raise ConfigError(f"data.sources weights sum to {listed} = {total:.6g}, not 1; they are fractions of the "
                          f"trained tokens: scale them (e.g. divide each by {total:.6g})")
    if len(weights) < len(sources) and weights and total >= 1 - WEIGHT_SUM_TOLERANCE:
        raise ConfigError(f"data.sources weights sum to {total:.6g}, but the epochs sources need a share too: "
                          "with epochs sources present the weights must sum to less than 1")
    if data.train_path is not None:
        raise ConfigError("data.train_path and data.sources are both set; give the training data one way "
                          "(a single source is data.sources: [{name: x, path: ..., weight: 1}])")
    if data.eval_path is not None or data.eval_fraction:
        raise ConfigError("data.eval_path / data.eval_fraction do not apply to data.sources; set eval_fraction "
                          "or eval_path on each source")
    if train.epochs is not None:
        raise ConfigError("train.epochs does not apply to data.sources; give epochs on each source "
                          "(the run ends when every epochs source is done) or weights and train.steps")
    if data.epoch_tail != "fill":
        raise ConfigError(f"data.epoch_tail={data.epoch_tail} does not apply to data.sources: a source's epochs "
                          "follow one another (fill); set data.epoch_tail=fill")


def source_paths(data) -> list[tuple[str, str]]:
    """(config key, path) of every dataset the mixture reads, for the start-up existence check."""
    out = []
    for s in data.sources or []:
        out.append((f"data.sources[{s.name}].path", s.path))
        if s.eval_path is not None:
            out.append((f"data.sources[{s.name}].eval_path", s.eval_path))
    return out


def check_paths_exist(data) -> None:
    """ConfigError naming the first source whose dataset directory is missing."""
    from megasft.data.indexed import META

    for key, path in source_paths(data):
        if not (Path(path) / META).is_file():
            raise ConfigError(f"no indexed dataset at {path} ({key}; {Path(path) / META} is missing); "
                              f"write one with megasft preprocess --output {path}")
