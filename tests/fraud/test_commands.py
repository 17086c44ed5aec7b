"""The `slimserve fraud` commands, parsed by the main CLI's parser, against a real tiny gRPC
server: the score file in CSV and JSONL with every row's provenance or reason, exit codes,
explanations, the report command, and the TLS flags reaching the client.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import jsonschema
import pytest

from slimserve.cli import build_parser
from slimserve.clients import Client, Unavailable
from slimserve.fraud import COLUMNS, PROMPT_FORMAT, read_transactions, write_transactions
from slimserve.fraud.audit import DECISION_REJECTED
from slimserve.fraud.scorer import (
    DECISION_FRAUD,
    DECISION_LEGIT,
    OUTPUT_COLUMNS,
    VERDICT_SCHEMA,
    ScoreOptions,
    score_rows,
)
from slimserve.fraud.simulate import simulate
from tests.helpers import ServerThread, publish_tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_cli(argv: list[str]) -> int:
    """Parse a `fraud` command with the main CLI's parser and run it (errors propagate)."""
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


def test_score_command_writes_the_output_file_and_explains_flagged_rows(
    fraud_server: ServerThread, payments: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    small = tmp_path / "three.jsonl"
    write_transactions(small, read_transactions(payments).rows[:3])
    out = tmp_path / "scores.csv"

    code = run_cli(
        [
            *("fraud", "score", str(small), "--model", "tiny@1", "--target", fraud_server.target),
            *("--out", str(out), "--threshold", "0", "--explain", "--explain-tokens", "200"),
        ]
    )

    assert code == 0
    lines = out.read_text().splitlines()
    assert lines[0] == ",".join(OUTPUT_COLUMNS) and len(lines) == 4
    captured = capsys.readouterr()
    for line in lines[1:]:  # one JSON verdict per flagged row, valid against its schema
        tx = line.split(",")[0]
        assert f"[{tx} score " in captured.out
        verdict = captured.out.split(f"[{tx} score ")[1].split("] ", 1)[1].splitlines()[0]
        assert verdict.endswith("}"), verdict
        jsonschema.validate(json.loads(verdict), VERDICT_SCHEMA)
    assert "scored 3 rows (3 flagged), rejected 0 lines" in captured.err


def test_score_command_exits_1_when_lines_were_rejected(
    fraud_server: ServerThread, payments: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run_cli(
        [
            *("fraud", "score", str(payments), "--model", "tiny", "--target", fraud_server.target),
            *("--out", str(tmp_path / "out.csv"), "--concurrency", "4"),
        ]
    )

    assert code == 1
    assert "rejected 3 lines" in capsys.readouterr().err


def test_score_command_writes_jsonl_with_every_row_and_its_provenance(
    fraud_server: ServerThread, payments: Path, tmp_path: Path
) -> None:
    out = tmp_path / "scores.jsonl"
    code = run_cli(
        [
            *(
                "fraud",
                "score",
                str(payments),
                "--model",
                "tiny-b",
                "--target",
                fraud_server.target,
            ),
            *("--out", str(out), "--threshold", "0.3"),
        ]
    )

    assert code == 1  # three lines were rejected
    records = [json.loads(line) for line in out.read_text().splitlines()]
    valid = read_transactions(payments).rows
    assert len(records) == len(valid) + 3
    assert all(tuple(r) == OUTPUT_COLUMNS for r in records)
    with Client(fraud_server.target) as client:
        info = client.model_info("tiny-b")
        expected, _ = score_rows(client, valid, ScoreOptions(model="tiny-b"))
    scored = records[: len(valid)]
    assert [r["score"] for r in scored] == pytest.approx([e.score for e in expected], rel=1e-4)
    for r in scored:
        assert r["decision"] == (DECISION_FRAUD if r["score"] >= 0.3 else DECISION_LEGIT)
        assert (r["model_version"], r["model_digest"]) == (info.ref, info.digest)
        assert (r["threshold"], r["prompt_format"], r["reason"]) == (0.3, PROMPT_FORMAT, "")
    for r in records[len(valid) :]:
        assert r["decision"] == DECISION_REJECTED and r["score"] is None
        assert r["reason"].startswith("line ") and r["threshold"] == 0.3


@pytest.fixture(scope="module")
def tls_server(
    fraud_server: ServerThread, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerThread, dict[str, Path]]]:
    """``tiny`` behind mutual TLS: a server certificate for 127.0.0.1 and a client CA."""
    from slimserve.server.config import TlsConfig
    from tests.server.test_security import _write_pki

    pki = _write_pki(tmp_path_factory.mktemp("pki"))
    tls = TlsConfig(cert=pki["server.pem"], key=pki["server.key"], client_ca=pki["client-ca.pem"])
    server = ServerThread(replace(fraud_server.config, models=("tiny",), tls=tls)).start()
    yield server, pki
    server.stop()


def test_score_and_report_commands_pass_the_tls_flags_to_the_client(
    tls_server: tuple[ServerThread, dict[str, Path]], payments: Path, tmp_path: Path
) -> None:
    server, pki = tls_server
    small = tmp_path / "three.csv"
    write_transactions(small, read_transactions(payments).rows[:3])
    score = ["fraud", "score", str(small), "--model", "tiny", "--target", server.target]
    tls = ["--tls-ca", str(pki["ca.pem"])]
    mtls = [*tls, "--tls-cert", str(pki["client.pem"]), "--tls-key", str(pki["client.key"])]

    assert run_cli([*score, "--out", str(tmp_path / "out.csv"), *mtls]) == 0
    assert len((tmp_path / "out.csv").read_text().splitlines()) == 4
    with pytest.raises(Unavailable):  # the same call without TLS never gets through
        run_cli([*score, "--out", str(tmp_path / "plain.csv")])
    with pytest.raises(Unavailable):  # TLS, but no client certificate
        run_cli([*score, "--out", str(tmp_path / "half.csv"), *tls])

    report = [
        *("fraud", "report", str(payments), "--models", "tiny", "--target", "unused:1"),
        *("--route", f"tiny={server.target}", "--out", str(tmp_path / "report")),
        *("--limit", "30", "--throughput-rows", "4", "--concurrency", "2"),
    ]
    assert run_cli([*report, *mtls]) == 0
    assert (tmp_path / "report" / "report.md").is_file()


def test_report_command_prints_the_table(
    fraud_server: ServerThread, payments: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report"
    code = run_cli(
        [
            *("fraud", "report", str(payments), "--models", "tiny", "--target", "unused:1"),
            *("--route", f"tiny={fraud_server.target}", "--out", str(out), "--limit", "60"),
            *("--throughput-rows", "8", "--concurrency", "2"),
        ]
    )

    assert code == 0
    printed = capsys.readouterr().out
    assert "| tiny (tiny@1) | 60 |" in printed
    assert (out / "report.md").is_file() and (out / "report.png").is_file()


def test_simulate_command_writes_a_reproducible_file(tmp_path: Path) -> None:
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    for path in (first, second):
        argv = ["fraud", "simulate", "--out", str(path), "--customers", "8", "--days", "3"]
        assert run_cli([*argv, "--seed", "5"]) == 0

    assert first.read_bytes() == second.read_bytes()
    header = first.read_text().splitlines()[0]
    assert tuple(header.split(",")) == COLUMNS
    assert len(read_transactions(first).rows) > 10


def test_train_command_fine_tunes_and_publishes_a_version(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from slimserve.registry.store import Registry

    registry = tmp_path / "registry"
    publish_tiny(registry, "tiny")
    data = tmp_path / "train.csv"
    write_transactions(data, simulate(60, 7, seed=3))

    code = run_cli(
        [
            *("fraud", "train", "--data", str(data), "--from", "tiny", "--name", "fs"),
            *("--registry", str(registry), "--steps", "2", "--batch-size", "2"),
            *("--warmup-steps", "1", "--log-every", "1", "--train-layers", "1"),
            # The tiny tokenizer spells " yes" in several tokens: the labels loss needs one.
            *("--loss", "vocab", "--max-seq-len", "160", "--eval-frauds", "3"),
            *("--eval-legit", "6"),
        ]
    )

    assert code == 0
    captured = capsys.readouterr()
    assert "step 2/2  loss " in captured.err and " nan" not in captured.err
    assert "published fs@1 " in captured.out
    assert Registry(registry).versions("fs") == [1]
