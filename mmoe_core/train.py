"""Training CLI: ``python -m mmoe_core.train --family FAMILY --data DIR --out CKPT_DIR [options]``.

Every family plugs in through its mmoe_core.registry entry (trainer=...): ``--family`` offers the
registered trainable families. ``--model-config NAME`` starts from a named model config
(``mmoe_core/families/<family>/model_configs/NAME.json``, see mmoe_core.factory; it also gives the
family when ``--family`` is left out). Family-specific options pass through ``--opt key=value``
(repeatable; the value is read as JSON when it parses, else as a string), e.g. ``--opt encoder=tiny-32
--opt text_hidden=32`` for MMoE, on top of the named config. Progress goes to stderr; the last line on
stdout names the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys

from mmoe_core import factory
from mmoe_core.allocator import keep_freed_memory
from mmoe_core.checkpoint import check_replaceable
from mmoe_core.errors import ConfigError, UserError, cli_entry
from mmoe_core.training import TrainOptions, check_options, get_trainer, train, trainer_families


def parse_opt(items: list[str]) -> dict:
    """``["a=1", "b=tiny-32", "c={\\"x\\": 2}"]`` -> {"a": 1, "b": "tiny-32", "c": {"x": 2}}."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--opt expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    d = TrainOptions()
    p = argparse.ArgumentParser(
        prog="python -m mmoe_core.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--family", choices=trainer_families(), help="model family (default: the --model-config's)")
    p.add_argument("--model-config", help="named model config to start from (list: --list-model-configs)")
    p.add_argument("--list-model-configs", action="store_true", help="print the named model configs and exit")
    p.add_argument("--data", help="dataset folder (required to train)")
    p.add_argument("--out", help="checkpoint directory to write (required to train)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--steps", type=int, default=None, help="stop after N steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument(
        "--router-lr-mult", type=float, default=d.router_lr_mult, help="learning-rate multiplier for router weights"
    )
    p.add_argument("--lr-schedule", choices=("constant", "linear", "cosine"), default=d.lr_schedule)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--gate", choices=("topk_softmax", "mmoe_reference"), default=d.gate)
    p.add_argument("--experts", type=int, default=d.experts)
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--balance", type=float, default=d.balance, help="switch balance loss weight")
    p.add_argument("--z-loss", type=float, default=d.z_loss, help="router z-loss weight")
    p.add_argument("--two-stage", action="store_true", help="entropy two-stage routing regulariser")
    p.add_argument("--two-stage-weight", type=float, default=d.two_stage_weight)
    p.add_argument("--trigger-entropy", type=float, default=d.trigger_entropy)
    p.add_argument("--trigger-step", type=int, default=None)
    p.add_argument("--snapshot-every", type=int, default=d.snapshot_every)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--threads", type=int, default=d.threads, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--dme", action="store_true", help="description-aware mention enhancement (MMoE)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="family-specific option")
    return p


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    family_options = parse_opt(args.opt)
    if args.model_config:
        family_options = {factory.MODEL_CONFIG_OPTION: args.model_config, **family_options}
    return TrainOptions(
        family=args.family,
        data_dir=args.data,
        out_dir=args.out,
        epochs=args.epochs,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        router_lr_mult=args.router_lr_mult,
        lr_schedule=args.lr_schedule,
        warmup_steps=args.warmup_steps,
        grad_clip=args.grad_clip,
        gate=args.gate,
        experts=args.experts,
        top_k=args.top_k,
        balance=args.balance,
        z_loss=args.z_loss,
        two_stage=args.two_stage,
        two_stage_weight=args.two_stage_weight,
        trigger_entropy=args.trigger_entropy,
        trigger_step=args.trigger_step,
        snapshot_every=args.snapshot_every,
        log_every=args.log_every,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
        dme=args.dme,
        progress=not args.no_progress,
        family_options=family_options,
    )


def resolve_family(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """--family, else the family of --model-config; they must agree when both are given."""
    named = None
    if args.model_config:
        try:
            named = factory.get_model_config(args.model_config)["family"]
        except factory.FactoryError as exc:
            parser.error(str(exc))
    family = args.family or named
    if family is None:
        parser.error("give --family or --model-config")
    if named is not None and named != family:
        parser.error(f"--model-config {args.model_config} is a {named!r} config, not {family!r}")
    return family


def build_trainer(family: str, options: TrainOptions):
    """The family's trainer for ``options`` (it reads the data); a bad option or dataset is a UserError."""
    try:
        return get_trainer(family)(options)
    except UserError:
        raise
    except (ValueError, FileNotFoundError) as exc:  # an option a trainer's own parsing refused
        raise ConfigError(f"the {family} trainer refused the options or data ({options.data_dir}): {exc}") from exc


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()
    if args.list_model_configs:
        for name in factory.list_model_configs(args.family):
            print(f"{name}  ({factory.get_model_config(name)['family']})")
        return 0
    args.family = resolve_family(args, parser)
    if not args.data or not args.out:
        parser.error("--data and --out are required to train")
    options = options_from_args(args)
    check_options(options)
    check_replaceable(args.out)
    trainer = build_trainer(args.family, options)
    result = train(trainer, options)
    trigger = "" if result.trigger_step is None else f", two-stage switched at step {result.trigger_step}"
    print(
        f"trained {args.family}: {result.steps} steps, {result.epochs} epochs in {result.seconds:.1f} s, "
        f"final loss {result.final_loss:.4f}{trigger}",
        file=sys.stderr,
    )
    print(f"checkpoint: {result.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
