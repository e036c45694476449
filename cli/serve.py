"""``blockrag serve``: an OpenAI-compatible server over cached passage blocks (imports the server only when run)."""

from __future__ import annotations

import argparse

from blockrag.engine import DEFAULT_MODEL, PREFILL_MODES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_argument_group("passages and blocks")
    where.add_argument("--index", metavar="DIR", help="a blockrag index: its passages are found in prompts and its "
                       "LLM is served (its own block store unless --store is given)")
    where.add_argument("--store", metavar="URL", help="block store folder or redis:// URL (default: the index's, "
                       "else $BLOCKRAG_HOME/kv); without --index its blocks are the passages found in prompts")
    where.add_argument("--scan-interval", type=float, default=10.0, metavar="S",
                       help="seconds between scans of the store for passages other replicas stored (0: at start-up "
                       "only; not with --index alone)")
    parser.add_argument("--model", help=f"the LLM: bundled alias, folder or GGUF file (default {DEFAULT_MODEL}, or "
                        "the index's)")
    parser.add_argument("--served-model-name", metavar="NAME", help="the model id clients send (default: --model, "
                        "or the index's model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--mode", choices=PREFILL_MODES, default="block", help="requests' default prefill mode")
    parser.add_argument("--max-tokens", type=int, default=256, help="max_tokens of requests that leave it out")
    parser.add_argument("--max-active", type=int, default=4, help="generations the engine interleaves")
    parser.add_argument("--max-queue", type=int, default=64, help="requests that may wait; more get 503")
    parser.add_argument("--gate-fraction", type=float, default=0.0, metavar="F",
                        help="fraction of block-mode requests whose first token is checked against full attention "
                        "after the answer is sent (in /metrics; default off)")
    parser.add_argument("--gate-seed", type=int, help="seed of the gate's sampling")
    parser.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))


def run(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from blockrag.engine import BlockEngine, blockrag_home
    from blockrag.integrations.runner import node_passages
    from blockrag.kvstore import open_store

    from blockrag.server.app import BlockragServer, ServerSettings

    logging.basicConfig(level=args.log_level.upper())
    passages = []
    if args.index:
        from blockrag.retriever import Index, load_engine

        index = Index.open(args.index, kv_store=open_store(args.store) if args.store else None)
        engine = load_engine(index, args.model)
        passages = node_passages(index)
        name = args.served_model_name or args.model or index.config.model
    else:
        engine = BlockEngine.from_pretrained(args.model or DEFAULT_MODEL,
                                             store=open_store(args.store or blockrag_home() / "kv"))
        name = args.served_model_name or args.model or DEFAULT_MODEL
    settings = ServerSettings(name, default_max_tokens=args.max_tokens, default_mode=args.mode,
                              max_active=args.max_active, max_queue=args.max_queue, gate_fraction=args.gate_fraction,
                              gate_seed=args.gate_seed, scan_interval_s=args.scan_interval)
    server = BlockragServer(engine, settings, passages=passages, scan_store=not args.index or bool(args.store))
    uvicorn.run(server.app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
