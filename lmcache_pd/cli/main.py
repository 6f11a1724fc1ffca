"""The ``lmcache-pd`` command."""

from __future__ import annotations

import argparse
import logging
import sys

from lmcache_pd.errors import ConfigError, TransportUnavailable


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmcache-pd", description="Disaggregated prefill/decode for vLLM.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def config_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", help="deployment YAML (default: $LMCACHE_PD_CONFIG)")
        sp.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, e.g. --set pool.size_mib=512 (repeatable)")

    sp = sub.add_parser("launch", help="start one instance of the deployment")
    sp.add_argument("--role", required=True, choices=["prefill", "decode", "proxy", "cache-server"])
    sp.add_argument("--instance", help="instance name (default: the first of its role)")
    config_args(sp)

    sp = sub.add_parser("check-config", help="validate a config and print it resolved")
    config_args(sp)

    sp = sub.add_parser("demo", help="run a local 1 prefill + 1 decode + proxy demo on a tiny model")
    sp.add_argument("--workdir", default=".lmcache-pd-demo", help="where the model, config and logs go")
    sp.add_argument("--max-tokens", type=int, default=24)

    sp = sub.add_parser("secret", help="write a new random shared secret to FILE (mode 600), for auth.secret_file")
    sp.add_argument("file")

    sp = sub.add_parser("token", help="print the bearer token of the HTTP control APIs (needs the secret)")
    config_args(sp)

    sp = sub.add_parser("server", help="run this node's cache daemon (docs/cache_server.md), or print its status")
    sp.add_argument("--socket", required=True, help="its Unix socket (the server tier's options.socket)")
    sp.add_argument("--size-mib", type=int, default=4096, help="shared memory it holds chunks in")
    sp.add_argument("--slab-mib", type=int, default=64, help="slab size (at least one chunk)")
    sp.add_argument("--eviction", choices=["lru", "fifo"], default="lru", help="which chunk goes when full")
    sp.add_argument("--chunk-tokens", type=int, help="the one chunk size it serves (engines' cache.chunk_tokens)")
    sp.add_argument("--http-port", type=int, help="serve /metrics and /cache/* on this port")
    sp.add_argument("--host", default="127.0.0.1", help="the address --http-port binds (loopback)")
    sp.add_argument("--status", action="store_true", help="print a running daemon's occupancy and clients")

    sp = sub.add_parser("tiny-model", help="generate the tiny random-weight test model")
    sp.add_argument("out", nargs="?", default="tiny-model")
    return p


def head_mapping(cfg) -> list[str]:
    """Which prefill rank sends which KV heads to which decode rank (heads.py), as YAML comments;
    the model's head count from its ``config.json``."""
    import json
    from pathlib import Path

    from lmcache_pd.heads import describe

    pairs = sorted({(p.tp_size, d.tp_size) for p in cfg.prefill for d in cfg.decode})
    try:
        model = json.loads((Path(cfg.model.path) / "config.json").read_text())
        model = model.get("text_config", model)
        heads = int(model.get("num_key_value_heads") or model["num_attention_heads"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return [f"# KV head mapping: not known here ({cfg.model.path}/config.json: {e})"]
    out = []
    for p, d in pairs:  # (a mapping that cannot work raises ConfigError, naming the field)
        out += [f"# KV head mapping: {heads} KV heads, prefill TP {p} -> decode TP {d}",
                *(f"#   {x}" for x in describe(heads, p, d))]
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # A line per backend request (the proxy's HTTP client at INFO) is noise, and costs the request path.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        if args.cmd in ("launch", "check-config"):
            from lmcache_pd.config import load_config

            cfg = load_config(args.config, overrides=args.set)
            if args.cmd == "check-config":
                import yaml

                from lmcache_pd.config import redact

                print(redact(yaml.safe_dump(cfg.to_dict(), sort_keys=False)))  # URL passwords: ***
                print("\n".join(head_mapping(cfg)))
                return 0
            if args.role == "cache-server":
                from lmcache_pd.cli import cache_server

                return cache_server.launch(cfg)
            if args.role == "proxy":  # (its own module: the proxy's path never imports torch)
                from lmcache_pd.cli import launch_proxy

                return launch_proxy.launch(cfg, lambda: load_config(args.config, overrides=args.set))
            from lmcache_pd.cli.launch import launch

            return launch(cfg, args.role, args.instance)
        if args.cmd == "secret":
            import os
            import secrets

            fd = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never overwrite a secret
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
            print(f"wrote a new secret to {args.file}: set auth.secret_file to it on every instance and the proxy")
            return 0
        if args.cmd == "token":
            from lmcache_pd.config import keyring, load_config

            keys = keyring(load_config(args.config, overrides=args.set))
            if not keys.authenticated:
                raise ConfigError("no shared secret is configured (auth.secret_file or LMCACHE_PD_SECRET): the "
                                  "HTTP APIs need no token then, and bind loopback only", field="auth.secret_file")
            print(keys.api_token)
            return 0
        if args.cmd == "demo":
            from lmcache_pd.cli.demo import run_demo

            return run_demo(args.workdir, max_tokens=args.max_tokens)
        if args.cmd == "server":
            import msgspec

            from lmcache_pd.cli.cache_server import serve, status
            from lmcache_pd.config import CacheServerConfig

            if args.status:
                return status(args.socket)
            try:
                cs = msgspec.convert({"socket": args.socket, "size_mib": args.size_mib, "slab_mib": args.slab_mib,
                                      "eviction": args.eviction, "host": args.host, "http_port": args.http_port,
                                      "chunk_tokens": args.chunk_tokens},
                                     CacheServerConfig)
            except msgspec.ValidationError as e:
                raise ConfigError(str(e), field="lmcache-pd server") from None
            return serve(cs, prefix="--")
        if args.cmd == "tiny-model":
            from lmcache_pd.cli.tinymodel import build_tiny_model

            print(build_tiny_model(args.out))
            return 0
    except (ConfigError, TransportUnavailable) as e:
        print(f"lmcache-pd: error: {e}", file=sys.stderr)
        return 2
    except FileExistsError as e:
        print(f"lmcache-pd: error: {e.filename} exists; a secret is never overwritten", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
