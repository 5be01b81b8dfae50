"""`observe-r1 serve`: every `ServerConfig` field is a command-line option of the same name."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import typing
from pathlib import Path

from observe_r1.command import Command
from observe_r1_serve.config import ServerConfig, check_vllm_options, read_api_key

API_KEY_ENV = "OBSERVE_R1_API_KEY"
_SECRET_FIELDS = {"api_key"}  # never on the command line, where `ps` shows it


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(ServerConfig)
    for f in dataclasses.fields(ServerConfig):
        if f.name in _SECRET_FIELDS:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if f.name == "model":
            parser.add_argument(
                flag, type=Path, required=True, help="a Hugging Face model folder, or a Hub id (owner/name)"
            )
        elif kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        elif typing.get_origin(kind) is typing.Literal:
            parser.add_argument(
                flag, choices=typing.get_args(kind), default=f.default, help=f"default: {f.default}"
            )
        elif typing.get_origin(kind) is tuple:
            parser.add_argument(
                flag,
                nargs="*",
                default=f.default,
                help=f"space-separated; default: {' '.join(f.default) or 'none'}",
            )
        else:
            base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
            parser.add_argument(flag, type=base, default=f.default, help=f"default: {f.default}")
    parser.add_argument("--api-key-file", type=Path, help=f"file holding the API key (or set ${API_KEY_ENV})")
    parser.add_argument("--log-level", default="info")


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    values = {
        f.name: tuple(value) if isinstance(value := getattr(args, f.name), list) else value
        for f in dataclasses.fields(ServerConfig)
        if f.name not in _SECRET_FIELDS
    }
    return ServerConfig(**values, api_key=read_api_key(os.environ.get(API_KEY_ENV), args.api_key_file))


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from observe_r1_serve.app import build_engine, create_app
    from observe_r1_serve.hub import resolve_model

    config = config_from_args(args)
    resolve_model(config)  # a Hub id is downloaded here, before the server answers
    check_vllm_options(config)  # before a model loads, whichever engine will
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # A model that fails to load ends the process (exit 1), so an orchestrator restarts it.
    servers: list[uvicorn.Server] = []
    app = create_app(config, build_engine, on_load_failure=lambda: setattr(servers[0], "should_exit", True))
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level=args.log_level,
            timeout_graceful_shutdown=int(config.shutdown_timeout_s),
        )
    )
    servers.append(server)
    server.run()
    return 1 if app.state.server["load_error"] else 0


SERVE = Command(
    help="OpenAI-compatible chat-completions server with parsed fields",
    add_arguments=add_server_arguments,
    run=run,
)
