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
    p.add_argument("model_dirs", metavar="OUT_DIR", nargs="+",
                   help="a folder made by `shardtune build` (with --scaling: several, or their bench JSON files)")
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--gen-len", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", metavar="FILE", help="also write the result(s) as JSON")
    p.add_argument("--allreduce", choices=["nccl"],
                   help="run a fused-all-reduce build through NCCL instead (to compare the two on the same weights)")
    p.add_argument("--host-argmax", action="store_true",
                   help="copy each step's logits to the host and take the argmax there (builds pick greedy "
                        "tokens on the GPU where they can): to compare the two")
    p.add_argument("--read-every", type=int, metavar="N",
                   help="greedy tokens picked on the GPU are read N steps at a time (default 8; 1: after every "
                        "step; sharded builds made before the LM head was split read every step)")
    p.add_argument("--scaling", action="store_true",
                   help="bench each build (or read its JSON) and compare tok/s across GPU counts")
    p.add_argument("--plot", metavar="PNG", help="with --scaling: draw tok/s against GPUs (needs matplotlib)")
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


def _bench_one(path: str, args) -> dict:
    from .engine import load

    model = load(path, allreduce=args.allreduce)
    result = model.bench(prompt_len=args.prompt_len, gen_len=args.gen_len, repeat=args.repeat,
                         host_argmax=args.host_argmax, read_every=args.read_every)
    model.close()
    result["command"] = " ".join(["shardtune", *sys.argv[1:]]) if sys.argv else ""
    print(f"{result['model']} {result['quant']} x{result['shards']}"
          f"{' (' + result['allreduce'] + ')' if result.get('allreduce') else ''} on {result['device']}: "
          f"{result['decode_tok_s']:.1f} tok/s decode ({result['roofline_fraction']:.0%} of the roofline at "
          f"{result['copy_gbps']:.0f} GB/s), prefill {result['prompt_len']} "
          f"tokens in {result['prefill_ms']:.1f} ms ({result.get('prefill', 'token by token')}), "
          f"{result['gpu_memory_bytes'] / 2**30:.2f} GiB; greedy: {result['greedy']}", flush=True)
    return result


def run_bench(args) -> int:
    from ..errors import UserError

    if not args.scaling:
        if len(args.model_dirs) > 1:
            raise UserError("several model folders need --scaling")
        result = _bench_one(args.model_dirs[0], args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        return 0
    results = []
    for path in args.model_dirs:
        if path.endswith(".json"):
            try:
                loaded = json.load(open(path))
            except (OSError, json.JSONDecodeError) as e:
                raise UserError(f"{path}: not a bench result ({e})") from None
            results += loaded if isinstance(loaded, list) else [loaded]
        else:
            results.append(_bench_one(path, args))
    print(scaling_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.plot:
        plot_scaling(results, args.plot)
    return 0


def _series(results: list[dict]) -> dict:
    """{(model, quant): [(gpus, tok/s), ...] by GPU count}"""
    out: dict = {}
    for r in results:
        out.setdefault((r["model"], r["quant"]), []).append((r["shards"], r["decode_tok_s"]))
    return {k: sorted(v) for k, v in sorted(out.items())}


def scaling_table(results: list[dict]) -> str:
    rows = ["model           quant     GPUs   tok/s  vs fewest  rises"]
    for (model, quant), points in _series(results).items():
        base = points[0][1]
        for i, (gpus, tok_s) in enumerate(points):
            rises = "" if i == 0 else ("yes" if tok_s > points[i - 1][1] else "NO")
            rows.append(f"{model:<15} {quant:<9} {gpus:>4} {tok_s:>7.1f} {tok_s / base:>9.2f}x  {rises}")
    return "\n".join(rows)


def plot_scaling(results: list[dict], png: str) -> None:
    from ..errors import UserError

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib (pip install 'shardtune[plot]')") from None
    fig, ax = plt.subplots(figsize=(6, 4))
    for (model, quant), points in _series(results).items():
        gpus, tok_s = zip(*points)
        ax.plot(gpus, tok_s, marker="o", label=f"{model} {quant}")
    devices = sorted({r["device"].split(" x ")[-1] for r in results})
    ax.set(xlabel="GPUs (tensor-parallel shards)", ylabel="decode tok/s (batch 1)",
           title=f"shardtune decode scaling, {', '.join(devices)}")
    ax.set_xticks(sorted({r["shards"] for r in results}))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"plot: {png}")
