"""The `gptgen` command: argument parsing and printing only; the work lives in the modules."""

from __future__ import annotations

import argparse
import codecs
import contextlib
import dataclasses
import difflib
import json
import logging
import os
import sys
from pathlib import Path

from gptgen.config import (
    BUNDLED_MODELS,
    DEVICE_HELP,
    DTYPES,
    LENGTH_BUDGET,
    LOSS_WINDOW,
    PRESETS,
    GptgenError,
    TrainConfig,
)
from gptgen.signals import ctrl_c_raises_interrupted, sigint_held

_BUDGET = (*LENGTH_BUDGET, "target_loss")
# what --resume may change (--data: the same text, moved)
_RESUMABLE = (*_BUDGET, "device", "sample_tokens", "sample_prompt", "data")
_RESUMABLE_FLAGS = ", ".join(f"--{name.replace('_', '-')}" for name in _RESUMABLE[:-1]) + f" and --{_RESUMABLE[-1]}"
_DEFAULT_STEPS = 2000
MODEL_HELP = ("model: a .safetensors file (float or int8), a run's folder (its model.safetensors), a bundled "
              "model's name (shakespeare-mini-int8) or a Hub id (owner/name; gpt2 is OpenAI's, converted once)")


def _rank(variable: str) -> int:
    """This process's RANK (in the job) or LOCAL_RANK (on its machine) under torchrun; 0 alone."""
    return int(os.environ.get(variable, 0))


def _command(sub, name: str, text: str, description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand whose one line of help in `gptgen --help` also heads its own --help."""
    # No abbreviated flags: a script's `--max` would stop working the day a second --max-... flag arrives.
    p = sub.add_parser(name, help=text, description=description or text[0].upper() + text[1:] + ".",
                       allow_abbrev=False)
    p.set_defaults(subparser=p)  # so that a flag it does not know is reported with its usage, not gptgen's
    return p


def _train_parser(sub) -> None:
    p = _command(sub, "train", "train a GPT on a text file (or resume a run)",
                 "Train a GPT on a UTF-8 text file. Under torchrun it trains with DDP.")
    p.add_argument("--data", help="UTF-8 text file to train on")
    p.add_argument("--out", help="run directory: model.safetensors, metrics.jsonl, loss.png, training state")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help=f"continue a run; only {_RESUMABLE_FLAGS} may change (a new --steps, --minutes or "
                        "--epochs replaces all three saved ones; --data: the same text, moved)")
    p.add_argument("--preset", help=f"model size: {', '.join(PRESETS)} (default {TrainConfig.preset})")
    p.add_argument("--steps", type=int, help=f"stop after this many optimizer steps (default: {_DEFAULT_STEPS} when "
                   "neither --minutes nor --epochs is given)")
    p.add_argument("--minutes", type=float, help="stop after this much training time (a resumed run counts "
                   "its earlier time too)")
    for field in dataclasses.fields(TrainConfig):
        if field.name in ("data", "out", "preset", "steps", "minutes"):
            continue
        flag, kind = f"--{field.name.replace('_', '-')}", str(field.type).split(" ")[0]
        text = field.metadata["help"].replace("%", "%%")  # argparse formats help with %
        if field.default is not None and "default" not in text:
            text += f" (default: {field.default})"
        if kind == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        else:
            p.add_argument(flag, type={"int": int, "float": float, "str": str}[kind], help=text)


def _eval_parser(sub) -> None:
    p = _command(sub, "eval", "score a model on the whole val split of a text file")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--data", required=True, help="UTF-8 text file; its last --val-fraction is scored")
    p.add_argument("--val-fraction", type=float, help="the last part of the text that is scored (default: the part "
                   "held out when the model was trained, as its file records it; else 0.1)")
    p.add_argument("--block-size", type=_positive_int,
                   help="window length (default: the block the model was trained with)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="windows per batch (default: 8)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _quantize_parser(sub) -> None:
    p = _command(sub, "quantize", "int8 weights: a smaller file and faster CPU generation")
    p.add_argument("input", help="float model: a .safetensors file, a run's folder (its model.safetensors) or a Hub id "
                   "(owner/name; gpt2 is OpenAI's, converted once)")
    p.add_argument("output", help="int8 model .safetensors to write")


def _generate_parser(sub) -> None:
    from gptgen.generate import MAX_NEW_TOKENS, Sampling

    p = _command(sub, "generate", "continue a prompt, streaming the text to stdout")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("prompt", nargs="?", default="", help="text to continue (empty: start from <|endoftext|>)")
    p.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a UTF-8 file instead (- = stdin)")
    d = Sampling()
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                   help=f"1 to {MAX_NEW_TOKENS} (default: {d.max_new_tokens})")
    p.add_argument("--temperature", type=float, default=d.temperature, help=f"0 = greedy (default: {d.temperature})")
    p.add_argument("--top-k", type=int, default=d.top_k, help=f"0 = off (default: {d.top_k})")
    p.add_argument("--top-p", type=float, default=d.top_p, help=f"1 = off (default: {d.top_p})")
    p.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty,
                   help=f"1 = off (default: {d.repetition_penalty})")
    p.add_argument("--stop", action="append", default=[],
                   help="end the text before this string (repeatable; \\n stands for a line break, as on the page)")
    p.add_argument("--seed", type=int, help="same seed, same text")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="a float model's weights: auto = bfloat16 on CUDA, float32 elsewhere (int8 stays int8)")
    p.add_argument("--compile", action="store_true",
                   help="on CUDA, decode through a compiled step with CUDA graphs (compiling takes tens of seconds)")
    p.add_argument("--json", action="store_true", help="print one JSON object with text, token counts, timings")


def _export_parser(sub) -> None:
    p = _command(sub, "export", "write the model for another runtime (llama.cpp's GGUF, transformers)")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("out", help="output: a new .gguf file, or a new (or empty) directory for --format hf")
    p.add_argument("--format", choices=["gguf", "hf"], default="gguf",
                   help="gguf: one llama.cpp file; hf: a transformers directory (default: gguf)")
    p.add_argument("--type", choices=["f16", "q8_0"], help="GGUF weight type (default: f16)")


def _import_parser(sub) -> None:
    p = _command(sub, "import", "a transformers GPT-2 directory as a gptgen model file")
    p.add_argument("source", help="directory with config.json and .safetensors weights, or a Hub id (gpt2 too)")
    p.add_argument("out", help="gptgen model .safetensors to write (must not exist)")


def _hub_parsers(sub) -> None:
    p = _command(sub, "push", "upload a model (with a generated card) to the Hub, or the app as a Space")
    p.add_argument("model", nargs="?", help=f"{MODEL_HELP} (for --space default: the bundled model)")
    p.add_argument("repo_id", help="owner/name on the Hugging Face Hub")
    p.add_argument("--space", action="store_true", help="create/update a Gradio Space serving the model")
    p.add_argument("--private", action="store_true",
                   help="create the repo as private (an existing public one is refused)")
    p = _command(sub, "pull", "download a model from the Hub into the Hugging Face cache; prints its path")
    p.add_argument("repo_id", help="owner/name on the Hugging Face Hub, or gpt2 (OpenAI's, converted once)")
    p.add_argument("--revision", help="branch, tag or commit (default: main)")


def _data_parser(sub) -> None:
    from gptgen.data import DATASETS

    p = _command(sub, "data", "download a known text corpus (checked by sha256)")
    p.add_argument("name", choices=sorted(DATASETS),
                   help="the corpus; shakespeare is tiny shakespeare (1.1 MB), written as OUT/tinyshakespeare.txt")
    p.add_argument("--out", default="data", help="folder to write it to (default: data)")


def _whole_number(what: str, low: int, high: int | None = None):
    """An argparse type: a whole number from low to high, else "must be WHAT"."""
    def parse(text: str) -> int:
        if not text.strip().isdigit() or not low <= int(text) <= (high or int(text)):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return int(text)
    return parse


_positive_int = _whole_number("a whole number of at least 1", 1)
_port = _whole_number("a port number from 0 to 65535", 0, 65535)


def _serve_parser(sub) -> None:
    from gptgen.engine import BATCH_ROWS

    p = _command(sub, "serve", "the web page and its API, on the bundled model or yours")
    p.add_argument("--model", help="model to show first: a name in --models, a .safetensors file, a run's "
                   "folder, a bundled model's name or a Hub id")
    p.add_argument("--models", default=str(BUNDLED_MODELS), help="folder whose models, and its run folders' "
                   "(runs/my/model-int8.safetensors is my-int8), the page offers (default: the bundled ones)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only; "
                   "0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=_port, default=7860,
                   help="port to listen on (default: 7860; 0: any free one, printed)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--max-batch", type=_positive_int, default=BATCH_ROWS,
                   help=f"requests decoded together per model (default {BATCH_ROWS}); each holds a KV cache "
                   "of the model's context")
    p.add_argument("--threads", type=_positive_int, help="torch threads of the engine process (default: all "
                   "cores but one, which the web server keeps)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptgen", description="Train, evaluate and run GPT-2 models on your text.",
                                allow_abbrev=False)
    from gptgen import __version__

    p.add_argument("--version", action="version", version=f"gptgen {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _eval_parser(sub)
    _quantize_parser(sub)
    _generate_parser(sub)
    _export_parser(sub)
    _import_parser(sub)
    _serve_parser(sub)
    _data_parser(sub)
    _hub_parsers(sub)
    return p


def cmd_train(args: argparse.Namespace) -> int:
    from gptgen.device import keep_freed_memory
    from gptgen.train import resume_config, train

    given = {k: v for k, v in vars(args).items() if k not in ("command", "subparser", "resume") and v is not None}
    if args.resume:
        extra = sorted(set(given) - set(_RESUMABLE))
        if extra:
            raise GptgenError(f"with --resume only {_RESUMABLE_FLAGS} may be given, not "
                              f"{', '.join('--' + e.replace('_', '-') for e in extra)}")
        cfg = resume_config(args.resume, **given)
        limits = [f"--{k.replace('_', '-')} {getattr(cfg, k)}" for k in _BUDGET if getattr(cfg, k) is not None]
        if _rank("RANK") == 0:
            print(f"resuming {args.resume} with {' '.join(limits)}", file=sys.stderr)
    else:
        for required in ("data", "out"):
            if required not in given:
                raise GptgenError(f"--{required} is required (or --resume RUN_DIR to continue a run)")
        if "init" in given and "preset" in given:
            raise GptgenError("give --preset or --init, not both: --init takes the model's size from its config")
        if not set(LENGTH_BUDGET) & set(given):
            given["steps"] = _DEFAULT_STEPS
        cfg = TrainConfig(**given)
    keep_freed_memory()  # this process only trains: reusing freed memory made CPU steps 1.25-1.4x faster
    summary = train(cfg, resume=bool(args.resume))
    if _rank("RANK") != 0:  # under torchrun, rank 0 speaks for all
        return 0
    print(json.dumps(summary, indent=1))
    if summary["interrupted"]:
        print(f"interrupted at step {summary['steps']}; continue with: gptgen train --resume {cfg.out}",
              file=sys.stderr)
        return 130
    stopped_by = summary.get("stopped_by")
    if cfg.target_loss is not None and stopped_by != "target_loss":
        last = summary["last_window_loss"] or float("nan")
        window = min(LOSS_WINDOW, summary["steps"])
        print(f"the --{stopped_by} budget ran out at step {summary['steps']} before the train loss reached "
              f"{cfg.target_loss}; the mean of the last {window} steps was {last:.4f}. "
              f"Continue with: gptgen train --resume {cfg.out} --steps N", file=sys.stderr)
    elif stopped_by == "minutes" and cfg.steps is not None:
        print(f"the --minutes budget ran out at step {summary['steps']} of {cfg.steps}; continue with: gptgen "
              f"train --resume {cfg.out} --steps {cfg.steps}", file=sys.stderr)
    elif stopped_by == "minutes" and cfg.epochs is not None:
        print(f"the --minutes budget ran out at epoch {summary['epochs']:g} of {cfg.epochs:g} (step "
              f"{summary['steps']}); continue with: gptgen train --resume {cfg.out} --epochs {cfg.epochs:g}",
              file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from gptgen.checkpoint import load_model, training_info
    from gptgen.config import ConfigError
    from gptgen.data import load_corpus, read_text
    from gptgen.device import keep_freed_memory, pick_device
    from gptgen.evaluate import evaluate_corpus, held_out, trained_share
    from gptgen.hub import resolve

    if args.val_fraction is not None and not 0 < args.val_fraction < 1:
        raise ConfigError(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    read_text(args.data)  # a missing, empty or undecodable text is refused before the model's download and load
    device = pick_device(args.device)
    model, metadata = load_model(resolve(args.model), device)
    info = training_info(metadata)
    trained_block = info.get("recipe", {}).get("block_size")
    block = args.block_size or (trained_block if isinstance(trained_block, int) else None) or model.config.block_size
    if not 1 <= block <= model.config.block_size:
        raise ConfigError(f"--block-size must be between 1 and the model's context ({model.config.block_size})")
    fraction = args.val_fraction or held_out(info) or 0.1
    corpus = load_corpus(args.data, fraction, progress=True)
    if trained := trained_share(info, corpus, fraction):
        hint = f"; --val-fraction {fraction - trained:g} scores only the part it did not" if fraction > trained else ""
        logging.getLogger("gptgen").warning(f"warning: the model trained on {trained:.1%} of the text (of the last "
                                            f"{fraction:.1%}, scored here): the loss is lower than on text it never "
                                            f"saw{hint}")
    keep_freed_memory()  # as training does: `gptgen eval` of the bundled model on the reference corpus 15 -> 5.7 s
    result, unseen = evaluate_corpus(model, corpus, block_size=block, batch_size=args.batch_size, device=device,
                                     progress=True)
    report = {"model": args.model, "data": args.data, "block_size": block, "val_fraction": fraction,
              "trained_on_scored_text": trained, **result.as_dict(), **unseen}
    if args.json:
        print(json.dumps(report))
    else:
        n_unseen = unseen["unseen_val_tokens"]
        print(f"val loss    {result.nats_per_token:.4f} nats/token  (perplexity {result.perplexity:.2f})\n"
              f"            {result.nats_per_char:.4f} nats/char\n"
              f"scored      {result.tokens:,} tokens, {result.chars:,} chars (windows of {block}, each token once)\n"
              f"unseen      {n_unseen:,} of them ({n_unseen / result.tokens:.1%}) never occur in the train split: "
              f"{unseen['unseen_nats_per_char']:.4f} of the nats/char ("
              f"{unseen['unseen_floor_nats_per_char']:.4f} for a model trained on that split alone that spreads its "
              "probability evenly over the kinds it lacks)")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from gptgen.checkpoint import ModelFileError, load_model_file, new_file, save_model, training_info
    from gptgen.hub import resolve
    from gptgen.quantize import quantize_state_dict

    new_file(args.output, ".safetensors")
    source = resolve(args.input)
    config, tensors, metadata = load_model_file(source)
    if metadata.get("quantization", "none") != "none":
        raise ModelFileError(f"{args.input!r} is already quantized ({metadata['quantization']})")
    save_model(args.output, quantize_state_dict(tensors), config, quantization="int8",
               training=training_info(metadata), new=True)
    before, after = source.stat().st_size, Path(args.output).stat().st_size
    print(f"wrote {args.output}: {after / 2**20:.1f} MiB ({after / before:.3f} of {before / 2**20:.1f} MiB)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import gptgen
    from gptgen.generate import Sampling, check_prompt, line_breaks

    if sys.stdout is None:  # `>&-`
        raise GptgenError("standard output is closed: there is nowhere to write the text")
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                    stop=tuple(line_breaks(s) for s in args.stop), seed=args.seed)

    try:
        Sampling(**sampling)
    except ValueError as e:  # "top_k must be ..." names the parameter; here its flag: "--top-k must be ..."
        name, rest = str(e).split(" ", 1)
        raise GptgenError(f"--{name.replace('_', '-')} {rest}" if name in sampling else str(e)) from None
    prompt = _read_prompt(args)
    check_prompt(prompt)  # before the model loads
    model = gptgen.load(args.model, device=args.device, dtype=args.dtype, compile=args.compile)
    if args.compile and getattr(model.model, "compiled_decoder", None) is None:
        print("gptgen: --compile acts on CUDA only; decoding as usual", file=sys.stderr)
    pieces = []
    for piece in model.stream(prompt, **sampling):
        pieces.append(piece)
        if not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    stats = model.last
    if args.json:
        print(json.dumps({"text": "".join(pieces), **dataclasses.asdict(stats), "tokens_per_s": stats.tokens_per_s}))
    else:
        sys.stdout.write("\n")
    return 0


def _read_prompt(args: argparse.Namespace) -> str:
    """The prompt argument, or --prompt-file's text (a prompt too long for a command line, or piped in)."""
    if args.prompt_file is None:
        return args.prompt
    if args.prompt:
        raise GptgenError("give the prompt as an argument or with --prompt-file, not both")
    from gptgen.data import decode_text
    from gptgen.generate import MAX_PROMPT_CHARS

    # bytes: more of them always hold more characters than the limit (UTF-32 takes 4 a character, and 4 to mark it),
    # so an endless pipe or a multi-GB file is refused after this much, not read whole first
    limit = 4 * MAX_PROMPT_CHARS + 4
    if args.prompt_file == "-" and sys.stdin is None:  # `<&-`
        raise GptgenError("--prompt-file -: standard input is closed")
    try:
        with open(args.prompt_file, "rb") if args.prompt_file != "-" else contextlib.nullcontext(sys.stdin.buffer) as f:
            raw = f.read(limit + 1)
    except OSError as e:
        raise GptgenError(f"cannot read --prompt-file {args.prompt_file!r}: {e.strerror or e}") from None
    if len(raw) > limit:
        raise GptgenError(f"--prompt-file {args.prompt_file!r} holds more than {MAX_PROMPT_CHARS:,} characters, the "
                          "limit of a prompt (a model reads only its context's worth of the end anyway)")
    return decode_text(raw, f"--prompt-file {args.prompt_file!r}")  # as training reads its text


def _text_stdout() -> None:
    """stdout that takes any text: where its encoding cannot (Windows' cp1252 when redirected, a latin-1 locale),
    generated CJK or emoji ended `generate` mid-text with a traceback, and a file name in them the other commands
    after their work. Into a file or pipe it writes UTF-8; on a terminal it shows '?' for what the terminal
    cannot. A file name's bytes that are not UTF-8 (Linux keeps them as surrogates) go out as they came in."""
    out = sys.stdout
    if not hasattr(out, "reconfigure"):
        return
    if codecs.lookup(out.encoding or "ascii").name == "utf-8" or not out.isatty():
        out.reconfigure(encoding="utf-8", errors="surrogateescape")
    else:
        out.reconfigure(errors="replace")


def cmd_export(args: argparse.Namespace) -> int:
    from gptgen.checkpoint import new_file
    from gptgen.hub import resolve
    from gptgen.interop import export_gguf, export_hf, refuse_taken_dir

    if args.format == "hf":
        if args.type is not None:
            raise GptgenError("--type is for --format gguf; a transformers export keeps the model's float weights")
        refuse_taken_dir(args.out)  # before a Hub model's download (the export checks again)
        export_hf(resolve(args.model), args.out)
        print(f"wrote {args.out} (transformers GPT-2 directory)")
    else:
        new_file(args.out, ".gguf")  # before a Hub model's download (the export checks again)
        export_gguf(resolve(args.model), args.out, args.type or "f16")
        print(f"wrote {args.out} (GGUF {args.type or 'f16'})")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from gptgen.interop import import_hf

    import_hf(args.source, args.out)
    print(f"wrote {args.out}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from gptgen.data import download

    print(download(args.name, args.out))
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from gptgen import hub

    model = hub.resolve(args.model) if args.model else None
    if args.space:
        model = model or BUNDLED_MODELS / "shakespeare-mini-int8.safetensors"
        print(hub.push_space(model, args.repo_id, private=args.private))
    elif model is None:
        raise GptgenError("give the model file to push: gptgen push MODEL REPO_ID")
    else:
        print(hub.push(model, args.repo_id, private=args.private))
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from gptgen.hub import pull

    print(pull(args.repo_id, args.revision))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from gptgen.serve import serve

    serve(args.models, args.model, host=args.host, port=args.port, device=args.device, max_batch=args.max_batch,
          threads=args.threads)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("gptgen").setLevel(logging.INFO)  # gptgen's progress; other libraries' warnings only
    logging.getLogger("huggingface_hub").propagate = False  # it prints its warnings itself: once, not twice
    try:
        with ctrl_c_raises_interrupted():  # not a KeyboardInterrupt: see Interrupted
            # Every command imports torch (the parser, for generate's defaults). A Ctrl-C that landed in torch's C
            # initialisation was swallowed (the command ran on to its end), became an ImportError or killed the process
            # (measured: 0.2-0.3 s after start, about one Ctrl-C in three there); held, it acts once torch has loaded.
            with sigint_held():
                import torch  # noqa: F401
            args, unknown = parser().parse_known_args(argv)
            if unknown:
                flags = [o for action in args.subparser._actions for o in action.option_strings]
                near = difflib.get_close_matches(unknown[0], flags, n=1, cutoff=0.7)  # 0.6 offered --out for --bogus
                args.subparser.error(f"unrecognized arguments: {' '.join(unknown)}"
                                     f"{f' (did you mean {near[0]}?)' if near else ''}")
            _text_stdout()
            commands = {"train": cmd_train, "eval": cmd_eval, "quantize": cmd_quantize, "generate": cmd_generate,
                        "export": cmd_export, "import": cmd_import, "serve": cmd_serve,
                        "push": cmd_push, "pull": cmd_pull,
                        "data": cmd_data}
            return commands[args.command](args)
    except GptgenError as e:  # bad input: under torchrun every process of a machine finds the same, one says it
        if _rank("LOCAL_RANK") == 0:
            print(f"gptgen: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what was streamed stays on screen; training saves in its own handler
        print("\ngptgen: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (`gptgen generate ... | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141
    except OSError as e:  # a file that could not be read or written (no such folder, read-only, a full disk)
        if e.filename is None:
            raise
        if _rank("LOCAL_RANK") == 0:
            print(f"gptgen: error: {str(e.filename)!r}: {e.strerror or e}", file=sys.stderr)
        return 2
