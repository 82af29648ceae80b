"""megasft train: ``megasft train --nproc N --config X.yaml [section.key=value ...]`` on one node, or
under a launcher ``torchrun --nproc-per-node N -m megasft.train --config X.yaml ...``.

Reads and validates the config before any process group exists, builds the parallel state,
model, optimizer and data, writes the resolved config to the run directory, trains, and (with
checkpoint.export_hf) writes the final weights as a Hugging Face directory. With --nproc, the
checks run once in this process and then torchrun's agent starts the ranks here
(megasft.launch): a mistake is one line and no process is spawned.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megasft.config import Config, ConfigError
from megasft.layout import Layout
from megasft.parallel_state import ParallelState, destroy
from megasft.tensor_parallel.spec import spec_of


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="megasft train", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("--config", help="YAML config (sections model/parallel/data/optim/train/checkpoint); "
                    "without it the defaults plus the overrides")
    ap.add_argument("--nproc", type=int, default=None,
                    help="launch this many local ranks (torchrun's agent in this process, one-line errors); "
                         "under torchrun the world size comes from WORLD_SIZE")
    ap.add_argument("--print-config", action="store_true",
                    help="print the resolved, validated config and the derived plan (layout, rows per step, "
                         "steps per epoch, memory estimate) for --nproc / WORLD_SIZE ranks, and exit")
    ap.add_argument("--gpu", default="h100-80gb",
                    help="GPU type of --print-config's memory estimate (a key of megasft.planner.GPUS)")
    ap.add_argument("--profile", action="store_true",
                    help="trace a few steps with torch.profiler into <run_dir>/profile (train.profile=true)")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=100")
    args = ap.parse_args(argv)
    if args.profile:
        args.overrides.append("train.profile=true")
    return args


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


def launched() -> bool:
    """This process is a rank started by torchrun (or another launcher setting WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ


def world_size(args) -> int:
    """--nproc, else WORLD_SIZE (set by torchrun), else 1."""
    env = int(os.environ.get("WORLD_SIZE", "1"))
    if args.nproc is not None and launched() and args.nproc != env:
        raise ConfigError(f"--nproc {args.nproc} but this rank was launched with WORLD_SIZE={env}; "
                          "drop --nproc under torchrun (it sets the world size)")
    return args.nproc if args.nproc is not None else env


def child_argv(argv) -> list[str]:
    """The arguments each launched rank gets: these, without --nproc."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            out.append(item)
    return out


def describe_start(cfg: Config, ps: ParallelState, trainer) -> str:
    n_params = sum(p.numel() for p in trainer.params if p.requires_grad)   # not a router's bias (state)
    layout = trainer.layout
    shards = layout.dp * layout.cp if cfg.parallel.distributed_optimizer else 1
    # Under expert parallelism the routed experts' state is sharded over the dp*cp/ep ranks holding them.
    n_experts = sum(p.numel() for p in trainer.params if spec_of(p).experts is not None) if ps.ep > 1 else 0
    expected = 12 * ((n_params - n_experts) / shards + n_experts / max(1, shards // ps.ep))
    replicas = "DP" if ps.cp == 1 else "DP*CP"
    per = replicas if ps.cp == 1 else f"({replicas})"
    formula = f"12*N/{per}" if not n_experts else f"12*(N_dense/{per} + N_experts/({replicas}/EP))"
    measured = trainer.optimizer.state_bytes()
    return "\n".join([
        f"megasft: world {ps.world_size} = tp {ps.tp}{f' x cp {ps.cp} ({layout.cp_comm})' if ps.cp > 1 else ''} "
        f"x pp {ps.pp} x dp {ps.dp}{f' (ep {ps.ep})' if ps.ep > 1 else ''} on {ps.device}"
        f"{' (sequence parallel)' if layout.sequence_parallel else ''}, "
        f"precision {cfg.train.precision}"
        f"{f' + FP8 GEMMs ({cfg.train.fp8})' if cfg.train.fp8 != 'off' else ''}",
        f"model: {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, vocab {cfg.model.vocab_size} "
        f"(padded {cfg.model.padded_vocab_size(ps.tp)}); {n_params:,} parameters on rank 0",
        trainer.optimizer.describe(),
        f"optimizer state on rank 0: measured {measured:,} bytes vs {formula} = {expected:,.0f} "
        f"(ratio {measured / expected:.4f})",
        f"data: {cfg.data.rows_per_step()} rows x {cfg.data.seq_len} tokens per step, "
        f"{cfg.data.micro_batch_size} rows per micro-batch, {layout.micro_batches} micro-batches per rank",
    ])


EXIT_STARTUP, EXIT_CHECKPOINT, EXIT_DIVERGED, EXIT_HUNG = 2, 3, 4, 5
REPORT_GRACE_S = 2.0   # see report()


def report(message: str, code: int, rank: Optional[int] = None) -> int:
    """Print ``megasft.train: <message>`` once for the job — on rank 0 (from RANK when no group
    exists yet), every rank reaching the same error — and return the exit code."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(f"megasft.train: {message}", file=sys.stderr, flush=True)
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # The launcher stops every rank once one exits; the others wait a moment so that rank 0,
        # which reaches the same error at the same time, exits first with its line printed.
        time.sleep(REPORT_GRACE_S)
    return code


def long_sequence_warning(cfg: Config) -> Optional[str]:
    """A warning when training rows are longer than the model's position range (RoPE is then
    trained on positions the model has not seen); None otherwise. Only a training run has rows,
    so megasft.train prints it, not validate() (converters validate a default data section)."""
    m, d = cfg.model, cfg.data
    if d.seq_len <= m.max_position_embeddings:
        return None
    scaling = m.rope_scaling or {}
    if scaling:
        context = (f"rope_scaling ({scaling.get('rope_type', scaling.get('type'))}, factor "
                   f"{scaling.get('factor')}, original_max_position_embeddings "
                   f"{scaling.get('original_max_position_embeddings')}) was calibrated for "
                   f"{m.max_position_embeddings} positions")
    else:
        context = "no model.rope_scaling is set, so RoPE extrapolates past the pre-trained length"
    return (f"data.seq_len={d.seq_len} exceeds model.max_position_embeddings={m.max_position_embeddings}: "
            f"{context}; lower data.seq_len, or raise model.max_position_embeddings together with a "
            "matching rope_scaling")


def launch_hint(args, err: ConfigError) -> str:
    """A pointer to --nproc when a single, unlaunched process cannot hold the layout."""
    if args.nproc is None and not launched() and "world" in str(err):
        return "; to start the ranks here, pass --nproc N (megasft train --nproc N --config ...)"
    return ""


def check_inputs(cfg: Config) -> None:
    """The start-up failures each rank can see on its own filesystem, before any process group:
    missing datasets, a missing tokenizer, a missing init_from_hf directory, a `latest` naming
    no checkpoint, a previous run in the run folder."""
    from megasft.checkpoint.files import check_resume_target
    from megasft.training.run_dir import check_run_dir
    from megasft.data.indexed import META

    from megasft.config_sources import source_paths

    d = cfg.data
    if d.train_path is None and not d.sources:
        raise StartupError("no training data: data.train_path is not set; point it at a directory "
                           "written by megasft preprocess (or list data.sources)")
    for key, path in (("data.train_path", d.train_path), ("data.eval_path", d.eval_path), *source_paths(d)):
        if path is not None and not (Path(path) / META).is_file():
            raise StartupError(f"no indexed dataset at {path} ({key}; {Path(path) / META} is missing); "
                               f"write one with megasft preprocess --output {path}")
    tokenizer = d.tokenizer
    if tokenizer is not None and not Path(tokenizer).exists():   # else read only at the export, after training
        raise StartupError(f"no tokenizer at {tokenizer} (data.tokenizer; the Hugging Face export at the end "
                           "copies it); point it at the .model / tokenizer.json file or its directory, or set "
                           "data.tokenizer=null")
    hf = cfg.model.init_from_hf
    if hf is not None and not (Path(hf) / "config.json").is_file():
        raise StartupError(f"no Hugging Face model at {hf} (model.init_from_hf; no config.json there); "
                           "point it at a directory written by save_pretrained")
    check_resume_target(cfg)   # CheckpointError for a missing checkpoint or a garbage `latest`
    check_run_dir(cfg)         # ConfigError: a previous run in train.run_dir, neither resumed nor overwritten


class StartupError(RuntimeError):
    """An input the run needs is missing; the message says what, where, and how to fix it."""


def main(argv=None) -> int:
    args = parse_args(argv)
    from megasft.checkpoint.sharded import Checkpointer, CheckpointError, CheckpointMismatch
    from megasft.data.indexed import DatasetError

    try:
        cfg = Config.load(args.config, args.overrides).validate()
        world = world_size(args)
        layout = Layout.resolve(cfg, world)
    except ConfigError as err:
        return report(f"configuration error: {err}{launch_hint(args, err)}", EXIT_STARTUP)
    if args.print_config:
        from megasft.training.startup_plan import print_config
        try:
            print(print_config(cfg, layout, args.gpu), flush=True)
        except ConfigError as err:
            return report(f"configuration error: {err}", EXIT_STARTUP)
        return 0
    if args.config is None and cfg.data.train_path is None and not cfg.data.sources:
        return report("nothing to train: no --config given and neither data.train_path nor data.sources is set; "
                      "pass --config FILE (e.g. examples/configs/tiny_chat.yaml) or data.train_path=DIR",
                      EXIT_STARTUP)
    try:
        check_inputs(cfg)
    except (StartupError, CheckpointError, DatasetError, ConfigError) as err:
        return report(str(err), EXIT_STARTUP)
    if args.nproc is not None and not launched():   # the parent: every check above passed, now spawn
        from megasft.launch import launch_local
        return launch_local(args.nproc, child_argv(argv))
    warning = long_sequence_warning(cfg)
    if warning:
        report(f"warning: {warning}", 0)
    from megasft.data.loader import build_loaders
    from megasft.optim.distributed_optimizer import TooManySkippedSteps
    from megasft.training.loop import NonFiniteWeights, StopSignal, Trainer
    from megasft.training.metrics import MetricsWriter
    from megasft.training.progress import wrap
    from megasft.training.run_dir import REWOUND, archive_previous_run, resumes_this_run, rewind_metrics

    stop = StopSignal().install()   # before the (possibly long) model build and weight loading
    stop_with_launcher()
    ps = ParallelState.from_env(layout.tp, layout.pp, timeout_s=cfg.parallel.timeout_s, cp=layout.cp,
                                ep=layout.ep)
    archived = archive_previous_run(cfg) if ps.rank == 0 else None   # train.overwrite=true
    if ps.world_size > 1:
        dist.barrier(group=ps.world_group)   # no rank reads the run folder before it is moved
    torch.manual_seed(cfg.train.seed)
    run_dir = Path(cfg.train.run_dir)
    try:   # before any step: bad data or a bad checkpoint fails here, naming the file and what differs
        train_loader, eval_loader = build_loaders(cfg.data, cfg.train.seed, ps.dp_rank, ps.dp,
                                                  cfg.model.vocab_size, epochs=cfg.train.epochs,
                                                  steps=cfg.train.steps, doc_multiple=layout.doc_multiple)
        if train_loader.total_steps is not None:   # train.epochs: the schedule's length is the data's
            cfg.train.steps = train_loader.total_steps
        trainer = Trainer(cfg, ps, stop=stop, layout=layout)
        checkpointer = Checkpointer(cfg, ps)
        resumed = checkpointer.resume(trainer, train_loader)
    except DatasetError as err:
        destroy(ps)
        return report(str(err), EXIT_STARTUP, ps.rank)
    except (CheckpointError, CheckpointMismatch) as err:
        destroy(ps)
        return report(f"checkpoint error: {err}", EXIT_CHECKPOINT, ps.rank)
    writer = None
    if ps.rank == 0:
        if archived is not None:
            print(f"megasft: train.overwrite: moved the previous run to {archived}", flush=True)
        rewound = rewind_metrics(run_dir, trainer.step) if resumes_this_run(cfg) else 0
        cfg.save(run_dir / "config.yaml")
        print(wrap(describe_start(cfg, ps, trainer)), flush=True)   # 100 columns (megasft.training.progress)
        print(wrap(train_loader.describe_plan()), flush=True)
        if resumed is not None:
            print(f"megasft: resumed from {resumed} at step {trainer.step}", flush=True)
        if rewound:
            print(f"megasft: {rewound} metrics records of steps after {trainer.step} (run again now) moved to "
                  f"{run_dir / REWOUND}", flush=True)
        writer = MetricsWriter(run_dir, cfg.train.steps, cfg.train.progress_bar)
    try:
        trainer.fit(train_loader, eval_loader, writer, checkpointer=checkpointer)
    except (TooManySkippedSteps, NonFiniteWeights) as err:   # every rank raises it at the same step
        destroy(ps)
        return report(f"training stopped: {err}", EXIT_DIVERGED, ps.rank)
    except RuntimeError as err:
        if not collective_failed(err):
            raise
        message, reporter = ps.diagnose_hang(err, cfg.parallel.timeout_s)
        report(message, EXIT_HUNG, 0 if reporter else 1)
        os._exit(EXIT_HUNG)   # the group is broken: no destroy(), no atexit work that could wait on it
    if writer is not None:
        writer.progress.clear()   # the lines below start on a clean terminal line
    checkpointer.close()
    exported = None
    if cfg.checkpoint.export_hf and trainer.step >= cfg.train.steps:
        exported = export_final(cfg, ps, run_dir / "hf")
    if writer is not None:
        writer.close()
        print("\n".join(run_summary(cfg, trainer, writer, exported)), flush=True)
    destroy(ps)
    return 0


def run_summary(cfg: Config, trainer, writer, exported: Optional[Path]) -> list[str]:
    """The end-of-run lines (megasft.training.progress.summary): wall time, steps, tokens, best
    eval, the final checkpoint, the export, the metrics file."""
    from megasft.checkpoint.files import step_name
    from megasft.training.progress import summary

    checkpoint = cfg.checkpoint.root(cfg.train.run_dir) / step_name(trainer.step)
    lines = summary(writer.progress, cfg.train.steps, trainer.best_eval, writer.path,
                    checkpoint if checkpoint.is_dir() else None, exported, writer.last_train)
    if trainer.step < cfg.train.steps:
        lines[0] += " (a stop signal; resume with checkpoint.load=auto)"
    return lines


def collective_failed(err: RuntimeError) -> bool:
    """A collective that timed out (parallel.timeout_s) or lost its peer. gloo raises a plain
    RuntimeError ("... Timed out waiting 5000ms for recv operation to complete"), NCCL a DistError."""
    text = str(err)
    return isinstance(err, dist.DistError) or any(
        marker in text for marker in ("Timed out waiting", "Connection closed by peer", "Connection reset by peer"))


def stop_with_launcher() -> None:
    """Under torchrun, get SIGTERM (a stop at the next step boundary) if the launcher dies. A bare
    torchrun does not forward SIGUSR1 — it dies of it — and its ranks would train on as orphans;
    launch with ``torchrun --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1`` to have
    USR1 forwarded as a stop request instead. Linux only (prctl PR_SET_PDEATHSIG)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))   # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:   # the launcher died before prctl: nobody will send the signal
        os.kill(os.getpid(), signal.SIGTERM)


def export_final(cfg: Config, ps: ParallelState, out: Path) -> Path:
    """Convert the final checkpoint (saved by the checkpointer at the end of fit) into a Hugging
    Face directory on rank 0 — the same streaming path as `megasft convert`."""
    from megasft.checkpoint.convert import megasft_to_hf
    from megasft.checkpoint.files import checkpoint_root

    if ps.world_size > 1:
        dist.barrier(group=ps.world_group)
    if ps.rank == 0:
        megasft_to_hf(checkpoint_root(cfg), out)   # dtype of the model the run started from; the run's tokenizer
        print(f"megasft: wrote Hugging Face weights to {out}", flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
