"""`shardtune generate` and `shardtune bench`: thin layers over shardtune.load()."""
from __future__ import annotations

import argparse
import json
import sys


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", metavar="OUT_DIR", help="a folder made by `shardtune build`")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text, tokenized with the checkpoint's tokenizer.json")
    src.add_argument("--prompt-ids", help="token ids, comma-separated (e.g. 1,2,3)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="always the most likely token (the default)")
    mode.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--print-ids", action="store_true", help="print token ids instead of text")
    p.set_defaults(func=run_generate)


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", metavar="OUT_DIR", help="a folder made by `shardtune build`")
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--gen-len", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    p.set_defaults(func=run_bench)


def _ids(text: str) -> list[int]:
    from ..errors import UserError

    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise UserError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None


def run_generate(args) -> int:
    from ..errors import UserError
    from .engine import load

    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    if not 0 < args.top_p <= 1 or args.temperature < 0:
        raise UserError("--top-p must be in (0, 1] and --temperature at least 0")
    model = load(args.model_dir, seed=args.seed)
    prompt = args.prompt if args.prompt is not None else _ids(args.prompt_ids)
    text_mode = not args.print_ids and model.tokenizer is not None
    shown, ids = "", []

    def on_token(tok: int) -> None:
        nonlocal shown
        ids.append(tok)
        if text_mode:   # decode the whole tail: a token alone may be half a character
            text = model.decode_text(ids)
            sys.stdout.write(text[len(shown):])
            shown = text
        else:
            sys.stdout.write(f"{tok}\n")
        sys.stdout.flush()

    model.generate(prompt, max_new_tokens=args.max_new_tokens, on_token=on_token,
                   temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    if text_mode:
        sys.stdout.write("\n")
    return 0


def run_bench(args) -> int:
    from .engine import load

    result = load(args.model_dir).bench(prompt_len=args.prompt_len, gen_len=args.gen_len, repeat=args.repeat)
    result["command"] = " ".join(["shardtune", *sys.argv[1:]]) if sys.argv else ""
    print(f"{result['model']} {result['quant']} x{result['shards']} on {result['device']}: "
          f"{result['decode_tok_s']:.1f} tok/s decode ({result['roofline_fraction']:.0%} of the roofline at "
          f"{result['copy_gbps']:.0f} GB/s), prefill {result['prompt_len']} "
          f"tokens in {result['prefill_ms']:.1f} ms, {result['gpu_memory_bytes'] / 2**30:.2f} GiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0
