"""`pernode` command line: generate, chat, report (and the measurement, serving and planning tools)."""
from __future__ import annotations

import argparse
import logging
import re
import sys

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20, "g": 1e9,
          "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'2GiB', '512MiB', '1e9'-free integers: sizes as people write them."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: use e.g. 2GiB, 512MiB or a byte count")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default="smollm2-135m", help="known name, a .gguf file or a Hugging Face folder")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument("--num-blocks", type=int, default=None, help="KV blocks (wins over --kv-cache-bytes)")
    g.add_argument("--kv-cache-bytes", type=parse_bytes, default=None, help="KV cache size, e.g. 2GiB")
    g.add_argument("--max-model-len", type=int, default=None, help="longest prompt + output, in tokens")
    g.add_argument("--max-num-seqs", type=int, default=256, help="most requests in one step")
    g.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget of one step")
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--num-threads", type=int, default=None, help="CPU threads for torch")


def engine_config_from_args(args):
    from pernode.config import EngineConfig

    return EngineConfig(model=args.model, device=args.device, dtype=args.dtype, block_size=args.block_size,
                        num_blocks=args.num_blocks, kv_cache_bytes=args.kv_cache_bytes,
                        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=args.max_num_batched_tokens,
                        enable_prefix_caching=not args.no_prefix_caching, num_threads=args.num_threads)


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--stop", action="append", default=[])


def sampling_params_from_args(args):
    from pernode.sampling.params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, seed=args.seed,
                          repetition_penalty=args.repetition_penalty, stop=args.stop)


def _stream(engine, request_id: str, prompt, params) -> None:
    engine.add_request(request_id, prompt, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            sys.stdout.write(out.outputs[0].delta_text)
            sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_generate(args) -> int:
    from pernode.engine.llm_engine import LLMEngine

    engine = LLMEngine(engine_config_from_args(args))
    prompt = args.prompt
    if args.chat_template:
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    _stream(engine, "generate", prompt, sampling_params_from_args(args))
    return 0


def cmd_chat(args) -> int:
    from rich.console import Console

    from pernode.engine.llm_engine import LLMEngine

    console = Console()
    engine = LLMEngine(engine_config_from_args(args))
    messages = [{"role": "system", "content": args.system}] if args.system else []
    console.print("[dim]chat with the model; an empty line or Ctrl-D ends[/dim]")
    turn = 0
    while True:
        try:
            user = console.input("[bold]you> [/bold]")
        except EOFError:
            break
        if not user.strip():
            break
        messages.append({"role": "user", "content": user})
        prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        console.print("[bold]model> [/bold]", end="")
        reply = []
        engine.add_request(f"chat-{turn}", prompt, sampling_params_from_args(args))
        while engine.has_unfinished_requests():
            for out in engine.step():
                reply.append(out.outputs[0].delta_text)
                sys.stdout.write(out.outputs[0].delta_text)
                sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
        turn += 1
    return 0


def cmd_profile(args) -> int:
    from pernode.engine.llm_engine import LLMEngine
    from pernode.measure.profile_schema import save_profile
    from pernode.measure.profiler import print_profile, run_profile
    from pernode.measure.report_html import write_report_html

    engine = LLMEngine(engine_config_from_args(args))
    profile = run_profile(engine, quick=args.quick, batch_sizes=_int_list(args.batch_sizes),
                          prompt_lens=_int_list(args.prompt_lens), context_len=args.context_len)
    if args.serve_results:
        import json

        for path in args.serve_results:
            with open(path) as f:
                profile["serve_runs"].append(json.load(f))
    save_profile(args.out, profile)
    print_profile(profile)
    if args.html:
        write_report_html(args.html, profile)
    logging.getLogger("pernode").info("profile written to %s%s", args.out, f" and {args.html}" if args.html else "")
    return 0


def _int_list(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"{text!r} is not a comma-separated list of integers") from None


def cmd_bench_serve(args) -> int:
    from pernode.measure.bench_serve import print_bench_table, run_bench_serve

    result = run_bench_serve(args)
    print_bench_table(result)
    return 0 if not result.get("failed_requests") else 1


def cmd_bench_offline(args) -> int:
    from pernode.engine.llm_engine import LLMEngine
    from pernode.llm import LLM
    from pernode.measure.bench_offline import print_results, run_bench_offline
    from pernode.models.registry import resolve_model

    engine = LLMEngine(engine_config_from_args(args))
    results = run_bench_offline(LLM.from_engine(engine), resolve_model(args.model), args)
    print_results(results)
    return 0


def cmd_plan(args) -> int:
    from pernode.fleet.plan_cli import run_plan

    return run_plan(args)


def cmd_fleet_up(args) -> int:
    from pernode.fleet.ray_fleet import run_up

    return run_up(args)


def cmd_fleet_down(args) -> int:
    from pernode.fleet.ray_fleet import run_down

    return run_down(args)


def cmd_fleet_validate(args) -> int:
    from pernode.fleet.validate import run_validate

    return run_validate(args)


def cmd_serve(args) -> int:
    from pernode.server.options import settings_from_args
    from pernode.server.serve import run_server

    return run_server(engine_config_from_args(args), settings_from_args(args), host=args.host, port=args.port,
                      log_level=args.log_level)


def cmd_report(args) -> int:
    from pernode.report import run_report

    return run_report(args)


def _alpha(text: str) -> float | str:
    """--alpha: a number (range-checked by the method, with its message) or 'auto'."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"alpha={text!r}: allowed a number in 0..1 or 'auto'") from None


def cmd_quantize(args) -> int:
    import json

    from pernode.compress import CALIBRATED, quantize_model
    from pernode.compress.checkpoint import checkpoint_bytes, load_model, save_quantized
    from pernode.compress.scheme import QuantScheme
    from pernode.evaluate.perplexity import calibration_windows

    w8a8 = args.method in ("smoothquant", "w8a8", "llm-int8")
    if w8a8 and (args.bits != 8 or args.group_size or args.asymmetric):
        raise ValueError(f"--method {args.method} runs int8 per-channel symmetric weights x int8 activations: "
                         "drop --bits/--group-size/--asymmetric")
    scheme = QuantScheme(num_bits=args.bits, group_size=args.group_size, symmetric=not args.asymmetric,
                         activations="int8-token" if w8a8 else None)
    model, source = load_model(args.model)
    calib = None
    if args.method in CALIBRATED:
        if args.calib and args.corpus:
            raise ValueError("--calib FILE (all of it calibrates) and --corpus FILE (its first 10% calibrates) "
                             "are alternatives: give one")
        calib = calibration_windows(source.tokenizer, args.calib_seq_len, args.calib_windows, args.corpus,
                                    args.calib)
    options = {"act_order": args.act_order, "damp_ratio": args.damp, "observer": args.observer, "alpha": args.alpha,
               "clip": not args.no_clip}
    report = quantize_model(model, args.method, scheme, calib, **options)
    if args.quantize_lm_head:
        from pernode.compress.lm_head import quantize_lm_head

        quantize_lm_head(model)
    save_quantized(model, source, args.out, scheme, args.method, extra={k: v for k, v in report.items()
                                                                         if k != "outliers"})
    if report.get("outliers"):
        print("LLM.int8() outlier input columns (|x| >= %.1f) per layer on the calibration text:" % report["threshold"])
        for name, st in report["outliers"].items():
            print(f"  {name:32s} mean {st['mean_outlier_columns']:6.1f}  max {st['max_outlier_columns']:4d}"
                  f"  of {st['in_features']}")
        with open(f"{args.out}/outlier_stats.json", "w") as f:
            json.dump(report["outliers"], f, indent=1)
    head = " + int8-g32 lm_head" if args.quantize_lm_head else ""
    print(f"wrote {args.out} ({checkpoint_bytes(args.out) / 1e6:.1f} MB of weights, {scheme.label()}{head}, "
          f"{args.method})")
    return 0


def cmd_eval_ppl(args) -> int:
    from pernode.compress.checkpoint import load_model
    from pernode.evaluate.perplexity import DEFAULT_SEQ_LEN, QUICK_SEQ_LEN, evaluate_perplexity

    if args.num_threads:
        import torch

        torch.set_num_threads(args.num_threads)
    seq_len = args.seq_len or (QUICK_SEQ_LEN if args.quick else DEFAULT_SEQ_LEN)
    max_windows = args.max_windows if args.max_windows is not None else (8 if args.quick else None)
    model, source = load_model(args.model, max_positions=seq_len)
    result = evaluate_perplexity(
        model, source.tokenizer, seq_len=seq_len, max_windows=max_windows, corpus=args.corpus,
        step_tokens=args.step_tokens,
        progress=lambda i, n, ppl: print(f"  window {i}/{n}: running ppl {ppl:.4f}", file=sys.stderr))
    print(f"perplexity {result.perplexity:.4f} (mean NLL {result.mean_nll:.5f} nats) over {result.num_tokens} "
          f"predictions in {result.num_windows} windows of {result.seq_len} tokens; {result.tokens_per_s:.0f} tok/s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pernode", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate a continuation of a prompt, streaming")
    p.add_argument("prompt")
    p.add_argument("--chat-template", action="store_true", help="wrap the prompt as a user turn")
    add_engine_arguments(p)
    add_sampling_arguments(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat, streaming")
    p.add_argument("--system", default=None, help="system prompt")
    add_engine_arguments(p)
    add_sampling_arguments(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("profile", help="measure the node: TPOT/throughput vs batch, TTFT vs prompt, roofline")
    p.add_argument("--quick", action="store_true", help="a sweep of a minute or two")
    p.add_argument("--out", default="profile.json")
    p.add_argument("--html", default=None, help="also write an HTML report here")
    p.add_argument("--batch-sizes", default=None, help="e.g. 1,2,4,8,16,32,64,128,256")
    p.add_argument("--prompt-lens", default=None, help="e.g. 64,128,256,512,1024,2048")
    p.add_argument("--context-len", type=int, default=None, help="context of the decode sweep, tokens")
    p.add_argument("--serve-results", nargs="*", help="bench serve JSON results to include (latency CDFs)")
    add_engine_arguments(p)
    p.set_defaults(func=cmd_profile)

    bench = sub.add_parser("bench", help="benchmarks: serve (any OpenAI server), offline (pernode vs peers)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    from pernode.measure import bench_serve

    p = bench_sub.add_parser("serve", help="load-test an OpenAI-compatible server")
    bench_serve.add_arguments(p)
    p.set_defaults(func=cmd_bench_serve)
    from pernode.measure import bench_offline

    p = bench_sub.add_parser("offline", help="one seeded workload on pernode and its peers, with ratios")
    bench_offline.add_arguments(p)
    add_engine_arguments(p)
    p.set_defaults(func=cmd_bench_offline)

    from pernode.fleet import plan_cli

    p = sub.add_parser("plan", help="replicas and cost for a workload under latency SLOs, from a profile")
    plan_cli.add_arguments(p)
    p.set_defaults(func=cmd_plan)

    from pernode.server import options as server_options

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat, metrics)")
    server_options.add_arguments(p)
    add_engine_arguments(p)
    p.set_defaults(func=cmd_serve)

    from pernode.fleet import ray_fleet, validate as fleet_validate

    p = sub.add_parser("fleet", help="engine replicas on Ray Serve behind one OpenAI route: up, down, validate")
    fleet_sub = p.add_subparsers(dest="fleet_command", required=True)
    p = fleet_sub.add_parser("up", help="deploy N replicas on Ray Serve (local Ray, or --address); Ctrl-C stops")
    server_options.add_arguments(p)
    add_engine_arguments(p)
    ray_fleet.add_fleet_arguments(p)
    p.add_argument("--detach", action="store_true", help="leave the fleet running; `pernode fleet down` stops it")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default: all)")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for every replica")
    p.set_defaults(func=cmd_fleet_up)
    p = fleet_sub.add_parser("down", help="stop a detached fleet: Serve, and the local Ray `up --detach` started")
    p.add_argument("--address", default=None, help="the Ray cluster (default: the one `up --detach` recorded)")
    p.add_argument("--app-name", default=None, help="delete only this Serve application")
    p.set_defaults(func=cmd_fleet_down)
    p = fleet_sub.add_parser("validate", help="run a plan's workload on a fleet: predicted vs measured latencies")
    fleet_validate.add_arguments(p)
    p.set_defaults(func=cmd_fleet_validate)

    p = sub.add_parser("report", help="the main job: measure the node and write an HTML report")
    p.add_argument("--quick", action="store_true", help="a run of a couple of minutes")
    p.add_argument("--out", default="pernode-report", help="output folder")
    add_engine_arguments(p)
    p.set_defaults(func=cmd_report)

    from pernode.compress import METHODS

    p = sub.add_parser("quantize", help="quantize a model and write a compressed-tensors checkpoint folder")
    p.add_argument("--model", default="smollm2-135m", help="known name, a .gguf file or a Hugging Face folder")
    p.add_argument("--method", default="rtn", help=f"one of {', '.join(METHODS)}")
    p.add_argument("--bits", type=int, default=8, choices=[4, 8])
    p.add_argument("--group-size", type=int, default=None, help="32, 64 or 128 (default: per output channel)")
    p.add_argument("--asymmetric", action="store_true", help="zero points (default symmetric)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--calib-windows", type=int, default=16, help="calibration windows (GPTQ/AWQ/SmoothQuant)")
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--corpus", default=None, help="UTF-8 text file (default: pydoc topics; first 10%% calibrates)")
    p.add_argument("--calib", default=None, metavar="FILE",
                   help="your own calibration text (UTF-8): all of it calibrates GPTQ/AWQ/SmoothQuant/LLM.int8()")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="also quantize the lm_head (untied; int8 per group of 32, GGUF Q8_0's precision); "
                        "default: it stays float")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ: columns by descending Hessian diagonal, group scales fixed up front (default on)")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ: damping, fraction of the mean Hessian diagonal")
    p.add_argument("--observer", default="hmse", choices=["minmax", "mse", "hmse"],
                   help="GPTQ group scales: minmax (the group's range), mse (range shrink minimising the group's "
                        "|w - deq(w)|^2.4), hmse (default: mse with each column weighted by its Hessian diagonal)")
    p.add_argument("--alpha", type=_alpha, default=0.5,
                   help="SmoothQuant migration strength: 0..1 (default 0.5) or 'auto' (searched per projection)")
    p.add_argument("--no-clip", action="store_true", help="AWQ: skip the clip search")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("eval", help="quality evaluations")
    eval_sub = p.add_subparsers(dest="eval_command", required=True)
    p = eval_sub.add_parser("ppl", help="perplexity on real text (pydoc topics, evaluation split)")
    p.add_argument("--model", default="smollm2-135m", help="known name, a .gguf file or an HF (quantized) folder")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default 2048, 512 with --quick)")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows (--quick: 8)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--corpus", default=None, help="UTF-8 text file instead of the pydoc topics")
    p.add_argument("--step-tokens", type=int, default=None,
                   help="feed each window N tokens per forward with its KV cache carried, as decode runs (the "
                        "int4 decode kernel quantizes x; default: one forward per window)")
    p.add_argument("--num-threads", type=int, default=None)
    p.set_defaults(func=cmd_eval_ppl)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from rich.console import Console
    from rich.logging import RichHandler

    # logs go to stderr so stdout carries only what the command produces (generated text, tables)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=Console(stderr=True), show_path=False, show_time=False)])
    if not args.verbose:  # httpx logs one INFO line per request, which buries `bench serve`'s progress
        logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return args.func(args)
    except ValueError as exc:  # user errors: one clear line, no traceback
        logging.getLogger("pernode").error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
