"""`lnscope remove-ln SRC OUT`: FakeLN fine-tuning of a GPT-2 checkpoint directory."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "remove-ln",
        help="fine-tune a GPT-2 checkpoint until it has no LayerNorm (FakeLN); export the LN-free twin",
        description=(
            "Fine-tune the GPT2LMHeadModel in SRC (a save_pretrained directory with its tokenizer) on "
            "--train-text, switching every LayerNorm to FakeLN on a schedule (ln_2, ln_1 Q/K, ln_1 V block "
            "by block, then ln_f). Writes OUT/ln_free (released LN-free format), with --control also "
            "OUT/control (same data and steps, LN kept), OUT/training_log.json and OUT/report.html. "
            "Schedule options left out follow the depth-scaled default (see analysis/remove_ln/schedule.py)."
        ),
    )
    p.add_argument("src", type=Path, metavar="SRC", help="source checkpoint directory (GPT-2, with tokenizer)")
    p.add_argument("out", type=Path, metavar="OUT", help="output directory")
    data = p.add_argument_group("data")
    data.add_argument("--train-text", type=Path, metavar="FILE", required=True,
                      help="plain text; documents separated by blank lines or <|endoftext|>")
    data.add_argument("--context", type=int, help="tokens per sequence (default: the model's n_positions)")
    data.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch (default 8)")
    data.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default 1)")
    data.add_argument("--no-bos", action="store_true", help="do not start every sequence with <|endoftext|>")
    sched = p.add_argument_group("schedule (steps)")
    sched.add_argument("--total-steps", type=int, help="default 3 x ln_f step")
    sched.add_argument("--start-step", type=int, help="first removal (default round(20 s))")
    sched.add_argument("--gap-ln2", type=int, help="steps between ln_2 removals (default round(2 s))")
    sched.add_argument("--gap-ln1qk", type=int, help="steps between ln_1 Q/K removals (default round(2 s))")
    sched.add_argument("--gap-ln1v", type=int, help="steps between ln_1 V removals (default round(3 s))")
    sched.add_argument("--ln-f-step", type=int, help="ln_f removal (default start + n_layer (gaps sum))")
    sched.add_argument("--schedule-scale", type=float, metavar="S",
                       help="scale s of the GPT-2-small schedule (default: fit --total-steps, else max(1, 12/n_layer))")
    opt = p.add_argument_group("optimiser")
    opt.add_argument("--lr", type=float, default=6e-4, help="peak learning rate (default 6e-4)")
    opt.add_argument("--min-lr", type=float, default=3e-4, help="final cosine learning rate (default 3e-4)")
    opt.add_argument("--warmup", type=int, help="warmup steps (default 5%% of total)")
    opt.add_argument("--weight-decay", type=float, default=0.01)
    opt.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm, 0 = off (default 1.0)")
    opt.add_argument("--aux-weight", type=float, default=0.1, help="aux std loss weight, LN-free run (default 0.1)")
    opt.add_argument("--control-aux-weight", type=float, default=0.0, help="aux loss weight of the control (default 0)")
    fake = p.add_argument_group("FakeLN")
    fake.add_argument("--sigma-momentum", type=float, default=0.9)
    fake.add_argument("--sigma-exclude-bos", action="store_true", help="leave position 0 out of sigma_avg")
    fake.add_argument("--sigma-exclude-eot", action="store_true", help="leave <|endoftext|> out of sigma_avg")
    run = p.add_argument_group("run")
    run.add_argument("--control", action="store_true", help="also train the LN-kept control (OUT/control)")
    run.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", help="cuda, mps or cpu (default: $LNSCOPE_DEVICE or the best available)")
    run.add_argument("--no-bf16", action="store_true", help="no bf16 autocast on CUDA")
    run.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints, 0 = final only")
    run.add_argument("--keep-checkpoints", type=int, default=2)
    run.add_argument("--stop-at-step", type=int, help="stop (and checkpoint) at this step; continue with --resume")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=handler)


def config_from_args(args: argparse.Namespace):
    from .train import RemoveLNConfig

    return RemoveLNConfig(
        total_steps=args.total_steps,
        start_step=args.start_step,
        gap_ln2=args.gap_ln2,
        gap_ln1qk=args.gap_ln1qk,
        gap_ln1v=args.gap_ln1v,
        ln_f_step=args.ln_f_step,
        schedule_scale=args.schedule_scale,
        context=args.context,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        bos_each_sequence=not args.no_bos,
        lr=args.lr,
        min_lr=args.min_lr,
        warmup_steps=args.warmup,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        aux_weight=args.aux_weight,
        control_aux_weight=args.control_aux_weight,
        sigma_momentum=args.sigma_momentum,
        sigma_exclude_bos=args.sigma_exclude_bos,
        sigma_exclude_eot=args.sigma_exclude_eot,
        seed=args.seed,
        device=args.device,
        bf16=False if args.no_bf16 else None,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        stop_at_step=args.stop_at_step,
    )


def handler(args: argparse.Namespace) -> int:
    from .train import remove_layernorm

    result = remove_layernorm(
        args.src, args.out, config_from_args(args), train_text=args.train_text,
        control=args.control, progress=not args.no_progress, resume=args.resume,
    )
    s = result.schedule
    print(f"remove-ln: {args.src} -> {result.out_dir} in {result.wall_seconds:.1f} s")
    print(f"schedule: start {s.start_step}, gaps {s.gap_ln2}/{s.gap_ln1qk}/{s.gap_ln1v}, "
          f"ln_f {s.ln_f_step}, total {s.total_steps}; {result.tokens_per_step} tokens/step")
    for role, loss in result.final_loss.items():
        print(f"{role:<8} final loss {loss:.4f} (mean of last 10 steps)")
    if not result.completed:
        print("stopped early; continue with --resume")
        return 0
    if result.ln_free_dir:
        print(f"LN-free checkpoint: {result.ln_free_dir}")
    if result.control_dir:
        print(f"control checkpoint: {result.control_dir}")
    print(f"log: {result.log_path}  report: {result.report_path}")
    return 0
