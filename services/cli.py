"""`tandem` command line: generate | models | serve."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from services.common.cli_args import add_dataclass_args, dataclass_from_args


# `--seed` is the sampling seed of the requests, as users expect; the engine's
# own seed (dummy weights, unseeded sampling) keeps its default.
_ENGINE_SKIP = ("seed",)


def _engine_config(args):
    from services.engine.config import EngineConfig
    return dataclass_from_args(EngineConfig, args, _ENGINE_SKIP)


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    from services.engine.config import EngineConfig
    add_dataclass_args(p, EngineConfig, _ENGINE_SKIP)


def cmd_generate(args: argparse.Namespace) -> int:
    from services.engine.engine import Engine
    from services.engine.sampling_params import SamplingParams
    texts = args.prompt or args.chat
    if not texts:
        print("error: give --prompt TEXT or --chat TEXT", file=sys.stderr)
        return 2
    engine = Engine(_engine_config(args))
    params = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                            seed=args.seed_sampling, ignore_eos=args.ignore_eos)
    t0 = time.perf_counter()
    results = engine.generate(texts, params, chat=bool(args.chat))
    dt = time.perf_counter() - t0
    for r in results:
        if args.json:
            print(json.dumps({"text": r.text, "output_ids": r.output_ids, "prompt_ids": r.prompt_ids}))
        else:
            print(r.text)
    if not args.json:
        n = sum(len(r.output_ids) for r in results)
        print(f"[{n} tokens in {dt:.2f} s, {n / dt:.1f} tok/s]", file=sys.stderr)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from services.engine.loader import list_models
    for name, desc, cached in list_models():
        where = cached or ("random weights, nothing to cache (--load-format dummy)" if "dummy" in desc
                           else "(not yet: converted on first use)")
        print(f"{name:24s} {desc}\n{'':24s} cached: {where}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from services.common.grpc_utils import run
    from services.worker.server import WorkerConfig, serve
    wcfg = dataclass_from_args(WorkerConfig, args)
    ecfg = _engine_config(args)
    run(lambda: serve(wcfg, ecfg))
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    from services.common.grpc_utils import run
    from services.gateway.config import GatewayConfig
    from services.gateway.server import serve
    cfg = dataclass_from_args(GatewayConfig, args)
    if not cfg.worker:
        print("error: give at least one --worker HOST:PORT", file=sys.stderr)
        return 2
    run(lambda: serve(cfg))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from services import launcher
    from services.common.cli_args import dataclass_to_argv
    from services.gateway.config import GatewayConfig
    scfg = dataclass_from_args(launcher.ServeConfig, args)
    gcfg = dataclass_from_args(GatewayConfig, args, _GATEWAY_SKIP)
    ecfg = _engine_config(args)
    return launcher.run(scfg, dataclass_to_argv(gcfg, ("host", "port", "grpc_port", "worker")),
                        dataclass_to_argv(ecfg), args.host, args.port, args.grpc_port, args.log_level)


_GATEWAY_SKIP = ("worker",)
_COMMANDS = ("generate", "worker", "gateway", "serve", "models")
_ENGINE_CMDS = ("generate", "worker", "serve")


def build_parser(cmd: str | None = None) -> argparse.ArgumentParser:
    """Engine flags are added only to the command being run (the gateway never imports torch)."""
    from services.gateway.config import GatewayConfig
    parser = argparse.ArgumentParser(prog="tandem", description="Tandem LLM serving")
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="cmd", required=True)

    def engine_args(p):
        if cmd is None or cmd == p.prog.split()[-1]:
            _add_engine_args(p)

    p = sub.add_parser("generate", help="generate text offline with the engine")
    engine_args(p)
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    p.add_argument("--chat", action="append", help="a user message, rendered with the chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", dest="seed_sampling", type=int, default=None,
                   help="sampling seed (the same seed gives the same tokens)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--json", action="store_true", help="one JSON line per prompt")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("worker", help="serve one engine as a prefill, decode or collocated worker (gRPC)")
    engine_args(p)
    if cmd is None or cmd == "worker":
        from services.worker.server import WorkerConfig
        add_dataclass_args(p, WorkerConfig)
    p.set_defaults(fn=cmd_worker)

    p = sub.add_parser("gateway", help="serve the public API (gRPC + REST) in front of workers")
    add_dataclass_args(p, GatewayConfig)
    p.set_defaults(fn=cmd_gateway)

    p = sub.add_parser("serve", help="gateway + prefill and decode workers on this machine (default model)")
    engine_args(p)
    add_dataclass_args(p, GatewayConfig, _GATEWAY_SKIP)
    from services.launcher import ServeConfig
    add_dataclass_args(p, ServeConfig)
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("models", help="list known model names and where each is cached")
    p.set_defaults(fn=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cmd = next((a for a in argv if not a.startswith("-") and a in _COMMANDS), None)
    args = build_parser(cmd).parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.cmd in _ENGINE_CMDS:
        from services.engine.loader import ModelLoadError
    else:
        ModelLoadError = OSError
    try:
        return args.fn(args)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
