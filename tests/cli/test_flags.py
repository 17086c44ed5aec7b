"""Every flag is checked before any call: a bad value is one error line naming the flag,
exit code 2 and no traceback; token files and variables that hold no token refuse to start."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from pathlib import Path

import pytest

from slimserve.cli import build_parser, serve_config
from slimserve.clients import Client
from tests.cli.test_cli import run_cli
from tests.helpers import ServerThread

USER = "user-token-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef"
SPARE = "spare-token-0123456789abcdef"
NOWHERE = ["--target", "127.0.0.1:9"]  # nothing listens: a call would fail differently


def _refused(out: object, *needles: str) -> None:
    assert out.returncode == 2, (out.stdout, out.stderr)  # type: ignore[attr-defined]
    err: str = out.stderr  # type: ignore[attr-defined]
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    for needle in needles:
        assert needle in last, err


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["generate", "hi", "--max-new-tokens", "-1"], ["--max-new-tokens", "1..2147483647"]),
        (["generate", "hi", "--max-new-tokens", "many"], ["--max-new-tokens", "'many'"]),
        (["generate", "hi", "--top-p", "0"], ["--top-p", "(0, 1]"]),
        (["generate", "hi", "--top-p", "1.5"], ["--top-p", "(0, 1]"]),
        (["generate", "hi", "--temperature", "-1"], ["--temperature", ">= 0"]),
        (["generate", "hi", "--temperature", "nan"], ["--temperature", ">= 0"]),
        (["generate", "hi", "--top-k", "-2"], ["--top-k", "0.."]),
        (["generate", "hi", "--seed", "-1"], ["--seed", "0.."]),
        (["models", "--timeout", "0"], ["--timeout", "> 0"]),
        (["health", "--wait", "-5"], ["--wait", ">= 0"]),
        (["generate", "hi", "--tls-cert", "c.pem"], ["--tls-cert and --tls-key go together"]),
        (["serve", "--model", "m", "--port", "-1"], ["--port", "0..65535"]),
        (["serve", "--model", "m", "--port", "70000"], ["--port", "0..65535"]),
        (["serve", "--model", "m", "--threads", "-1"], ["--threads", "0.."]),
        (["serve", "--model", "m", "--max-batch", "0"], ["--max-batch", "1.."]),
        (["serve", "--model", "m", "--grace", "-1"], ["--grace", ">= 0"]),
        (["serve", "--model", "m", "--metrics-port", "65536"], ["--metrics-port", "0..65535"]),
        (["serve", "--model", "m", "--max-top-n", "-1"], ["--max-top-n", "0.."]),
        (["serve", "--model", "m", "--tls-key", "k.pem"], ["--tls-cert and --tls-key"]),
        (["bench", "serve", "--concurrency", "1,x"], ["--concurrency", "comma-separated"]),
        (["eval", "m", "--max-chunks", "0"], ["--max-chunks", "1.."]),
    ],
)
def test_a_bad_flag_is_one_line_and_exit_2(argv: list[str], needles: list[str]) -> None:
    target = NOWHERE if argv[0] in ("generate", "models", "health") else []
    _refused(run_cli(*argv, *target), *needles)


def _serve(tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> object:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SLIMSERVE_")}
    return run_cli(
        "serve", "--model", "tiny", "--registry", str(tmp_path), "--port", "0", *extra,
        env={**environ, **(env or {})},
    )  # fmt: skip


def test_auth_cannot_switch_itself_off(tmp_path: Path) -> None:
    blank = tmp_path / "tokens"
    blank.write_text("# rotated weekly\n\n   \n")
    _refused(_serve(tmp_path, "--auth-token-file", str(blank)), "holds no token")
    _refused(_serve(tmp_path, "--admin-token-file", str(blank)), "--admin-token-file")
    _refused(_serve(tmp_path, env={"SLIMSERVE_AUTH_TOKEN": "  "}), "$SLIMSERVE_AUTH_TOKEN")
    _refused(_serve(tmp_path, env={"SLIMSERVE_ADMIN_TOKEN": ""}), "holds no token")
    missing = tmp_path / "missing"
    _refused(_serve(tmp_path, "--auth-token-file", str(missing)), "cannot read")
    short = tmp_path / "short"
    short.write_text("alice:short\n")
    _refused(_serve(tmp_path, "--auth-token-file", str(short)), "at least 16 characters")
    bad = tmp_path / "bad"
    bad.write_text(f"{USER}\nalice bob {SPARE}\n")
    out = _serve(tmp_path, "--auth-token-file", str(bad))
    _refused(out, "line 2", "LABEL TOKEN")
    assert SPARE not in out.stderr  # type: ignore[attr-defined]


def test_tokens_on_a_public_host_need_tls_or_the_flag(tmp_path: Path) -> None:
    env = {"SLIMSERVE_AUTH_TOKEN": USER}
    out = _serve(tmp_path, "--host", "0.0.0.0", env=env)
    _refused(out, "--allow-insecure-tokens", "--tls-cert")
    args = build_parser().parse_args(
        ["serve", "--model", "tiny", "--registry", str(tmp_path), "--host", "0.0.0.0",
         "--allow-insecure-tokens", "--auth-token-file", str(_file(tmp_path, USER))]
    )  # fmt: skip
    config = serve_config(args)
    assert config.allow_insecure_tokens and config.plaintext_tokens
    _refused(
        _serve(tmp_path, "--allow-model-control", env={"SLIMSERVE_ADMIN_TOKEN": ADMIN}),
        "drop --allow-model-control",
    )


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "token-file"
    path.write_text(text)
    return path


def test_token_file_labels_reach_the_access_log(
    tiny_registry: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    users = _file(tmp_path, f"# label:token, label token, or a bare token\nalice:{USER}\n"
                            f"bob {SPARE}\n\n{'c' * 20}\n")  # fmt: skip
    args = build_parser().parse_args(
        ["serve", "--model", "tiny", "--registry", str(tiny_registry), "--port", "0",
         "--device", "cpu", "--backend", "llama", "--max-batch", "2", "--max-seq-len", "64",
         "--auth-token-file", str(users), "--allow-model-control"]
    )  # fmt: skip
    config = serve_config(args)
    assert dict(config.auth.labels) == {USER: "alice", SPARE: "bob", "c" * 20: "user-3"}
    caplog.set_level(logging.INFO, logger="slimserve")
    server = ServerThread(dataclasses.replace(config, grace_s=1.0)).start()
    try:
        for token, who in ((USER, "alice"), (SPARE, "bob"), ("c" * 20, "user-3")):
            with Client(server.target, token=token, retries=0, timeout=30) as c:
                assert c.generate("hello", max_new_tokens=1).model == "tiny@1", who
        # --allow-model-control with user tokens: any valid user token controls models.
        with Client(server.target, token=SPARE, retries=0, timeout=30) as c:
            assert c.load_model("tiny@1").ref == "tiny@1"
    finally:
        server.stop()
    seen = [
        (r.method, r.principal)  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "slimserve.server.interceptors"
    ]
    assert seen == [
        ("Generate", "alice"),
        ("Generate", "bob"),
        ("Generate", "user-3"),
        ("LoadModel", "bob"),
    ]
    for token in (USER, SPARE):
        assert token not in caplog.text


def test_validators_accept_the_edges() -> None:
    args = build_parser().parse_args(
        ["generate", "hi", "--max-new-tokens", "1", "--top-p", "1", "--temperature", "0",
         "--seed", str(2**64 - 1), "--timeout", "0.5"]
    )  # fmt: skip
    assert (args.max_new_tokens, args.top_p, args.temperature) == (1, 1.0, 0.0)
    assert args.seed == 2**64 - 1 and args.timeout == 0.5
    serve = build_parser().parse_args(["serve", "--model", "m", "--port", "0", "--threads", "0"])
    assert serve.port == 0 and serve.threads == 0
    bench = build_parser().parse_args(["bench", "serve", "--concurrency", "1,4"])
    assert bench.concurrency == [1, 4]


#: Each `serve` flag, a value unlike its default, and where in the `ServerConfig` it lands.
SERVE_FLAGS: tuple[tuple[str, str | None, str, object], ...] = (
    ("--device", "cpu", "model.load.device", "cpu"),
    ("--dtype", "bfloat16", "model.load.dtype", "bfloat16"),
    ("--backend", "llamacpp", "model.load.backend", "llamacpp"),
    ("--gguf-type", "q4_1", "model.load.gguf_type", "q4_1"),
    ("--decode-threads", "3", "model.load.decode_threads", 3),
    ("--no-ggml-threadpool", None, "model.load.ggml_threadpool", False),
    ("--max-batch", "3", "model.cache.max_batch", 3),
    ("--max-seq-len", "96", "model.cache.max_seq_len", 96),
    ("--kv-cache-mb", "48", "model.cache.kv_cache_mb", 48),
    ("--kv-layout", "unified", "model.cache.kv_layout", "unified"),
    ("--max-queue", "5", "model.engine.max_queue", 5),
    ("--score-step-tokens", "300", "model.engine.score_step_tokens", 300),
    ("--max-score-tokens", "900", "model.engine.max_score_tokens", 900),
    ("--draft", "ngram", "model.draft.source", "ngram"),
    ("--draft-tokens", "2", "model.draft.tokens", 2),
    ("--draft-policy", "always", "model.draft.policy", "always"),
    ("--host", "127.0.0.2", "host", "127.0.0.2"),
    ("--port", "50999", "port", 50999),
    ("--threads", "2", "threads", 2),
    ("--grace", "3.5", "grace_s", 3.5),
    ("--metrics-port", "9101", "metrics_port", 9101),
    ("--http-port", "8123", "http_port", 8123),
    ("--max-new-tokens-limit", "512", "limits.max_new_tokens", 512),
    ("--default-max-new-tokens", "7", "limits.default_max_new_tokens", 7),
    ("--max-prompt-tokens", "333", "limits.max_prompt_tokens", 333),
    ("--max-stop-sequences", "2", "limits.max_stop_sequences", 2),
    ("--max-stop-sequence-chars", "9", "limits.max_stop_sequence_chars", 9),
    ("--max-top-n", "4", "limits.max_top_n", 4),
    ("--max-labels", "6", "limits.max_labels", 6),
    ("--max-n", "3", "limits.max_n", 3),
    ("--max-message-bytes", "65536", "limits.max_message_bytes", 65536),
    ("--max-concurrent-streams", "8", "connections.max_concurrent_streams", 8),
    ("--max-connection-age", "120", "connections.max_connection_age_s", 120.0),
    ("--max-connection-age-grace", "5", "connections.max_connection_age_grace_s", 5.0),
    ("--keepalive-time", "30", "connections.keepalive_time_s", 30.0),
    ("--keepalive-timeout", "7", "connections.keepalive_timeout_s", 7.0),
    ("--min-client-ping-interval", "4", "connections.min_client_ping_interval_s", 4.0),
    ("--allow-model-control", None, "allow_model_control", True),
    ("--max-step-ms", "40", "model.engine.max_step_ms", 40.0),
    ("--no-prefix-cache", None, "model.engine.prefix_cache", False),
    ("--engine-step-timeout", "30", "model.restart.step_timeout_s", 30.0),
    ("--crash-verdict-ttl", "600", "model.restart.crash_verdict_ttl_s", 600.0),
    ("--metrics-host", "0.0.0.0", "metrics_host", "0.0.0.0"),
    ("--http-allowed-hosts", "api.example", "http.allowed_hosts", ("api.example",)),
    ("--http-cors-origins", "https://app.example", "http.cors_origins", ("https://app.example",)),
    ("--http-header-timeout", "3", "http.header_timeout_s", 3.0),
    ("--http-body-timeout", "9", "http.body_timeout_s", 9.0),
    ("--http-idle-timeout", "2", "http.idle_timeout_s", 2.0),
    ("--http-max-connections", "17", "http.max_connections", 17),
)


def _at(config: object, path: str) -> object:
    for part in path.split("."):
        config = getattr(config, part)
    return config


@pytest.mark.parametrize(("flag", "value", "path", "expected"), SERVE_FLAGS)
def test_each_serve_flag_reaches_the_config(
    tmp_path: Path, flag: str, value: str | None, path: str, expected: object
) -> None:
    base = ["serve", "--model", "tiny", "--registry", str(tmp_path)]
    default = serve_config(build_parser().parse_args(base))
    given = serve_config(build_parser().parse_args([*base, flag, *([value] if value else [])]))
    assert _at(default, path) != expected  # the value given is not the default
    assert _at(given, path) == expected


def test_every_serve_flag_is_checked_above() -> None:
    """A new `serve` flag needs a row in `SERVE_FLAGS` (or a test of its own below)."""
    (serve,) = (
        a.choices["serve"]  # type: ignore[index]
        for a in build_parser()._actions
        if isinstance(a, argparse._SubParsersAction)
    )
    flags = {s for a in serve._actions for s in a.option_strings if s.startswith("--")}
    own_tests = {
        "--help", "--model", "--registry",  # every call names them
        # auth and TLS: test_security.py::test_serve_flags_and_environment_build_auth_and_tls
        "--auth-token-file", "--admin-token-file", "--allow-insecure-tokens",
        "--tls-cert", "--tls-key", "--tls-client-ca",
        # test_metrics_access.py::test_a_metrics_token_is_required_when_set
        "--metrics-token-file",
        # tests/registry/test_version_dir.py (serve --model-dir [--name])
        "--model-dir", "--name",
        # Ray Serve: tests/scale/test_flags.py::test_serve_options_follow_the_scaling_settings
        "--ray", "--replicas", "--autoscale", "--replica-cpus", "--max-ongoing-requests",
        "--max-queued-requests",
    }  # fmt: skip
    assert flags - own_tests == {row[0] for row in SERVE_FLAGS}
