"""`slimserve bench serve`: memory of a real process tree, the targets, the output check,
the defaults, and a race of real worker processes on the tiny model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from slimserve.bench import serve as bench
from slimserve.cli import build_parser
from slimserve.engine.machine import CpuInfo

#: A child that makes 60 MB resident, then forks: the grandchild shares those pages.
FORKING_CHILD = """
import os, sys, time
buf = b"x" * 60_000_000
if os.fork() == 0:
    print("ready", flush=True)
time.sleep(120)
"""


@pytest.fixture
def forked_tree() -> Iterator[int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", FORKING_CHILD],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own group: the grandchild ends with it below
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield proc.pid
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def test_pss_counts_pages_shared_after_fork_once_where_rss_counts_them_twice(
    forked_tree: int,
) -> None:
    with bench.PeakMemory(forked_tree, interval_s=0.01) as mem:
        pass
    assert len(bench._tree(forked_tree)) == 2
    assert mem.rss_mb >= 120  # 60 MB in each of the two processes
    assert 60 <= mem.pss_mb <= mem.rss_mb - 50  # the shared 60 MB once
    assert bench.tree_hwm_mb(forked_tree) >= mem.rss_mb - 1


def _sample(system: str, c: int, tok_s: float, pss: float = 400.0, **kw: object) -> bench.Sample:
    tokens = 32 * c
    return bench.Sample(
        system=system,
        concurrency=c,
        repeat=0,
        ttft_ms=[10.0] * c,
        itl_ms=[5.0] * (tokens - c),
        e2e_ms=[100.0] * c,
        tokens=tokens,
        wall_s=tokens / tok_s,
        peak_rss_mb=pss * 1.5,
        peak_pss_mb=pss,
        **kw,  # type: ignore[arg-type]
    )


def _bench(systems: list[str], samples: list[bench.Sample]) -> bench.Bench:
    return bench.Bench(
        registry=Path("unused"),
        model="m@production",
        threads=2,
        new_tokens=32,
        concurrency=[1, 16],
        repeats=1,
        systems=systems,
        gguf=None,
        max_batch=16,
        samples=samples,
    )


def test_targets_ratio_each_system_against_its_baseline_and_mark_pass_or_miss() -> None:
    systems = ["slimserve", "slimserve_draft", "engine", "llama_cpp", "llama_cpp_q8"]
    b = _bench(
        systems,
        [
            _sample("slimserve", 1, 60.0, pss=900.0),
            _sample("slimserve_draft", 1, 140.0, pss=1100.0),
            _sample("engine", 1, 98.0),
            _sample("engine", 16, 290.0),
            _sample("llama_cpp", 1, 105.0),  # Q4_1 faster at 1 ...
            _sample("llama_cpp", 16, 200.0),
            _sample("llama_cpp_q8", 1, 100.0),
            _sample("llama_cpp_q8", 16, 300.0),  # ... Q8_0 faster at 16
        ],
    )
    rows = bench.summarise(b)
    best = bench.best_llamacpp(rows)
    assert (best[1]["system"], best[16]["system"]) == ("llama_cpp", "llama_cpp_q8")
    marked = {(r["system"], r["concurrency"]) for r in rows if r.get("best_llamacpp")}
    assert marked == {("llama_cpp", 1), ("llama_cpp_q8", 16)}
    got = {t.label.split(",")[0]: t for t in bench.targets(rows)}
    in_proc = got["engine in-process vs llama.cpp's own loop on the same Q8_0 weights"]
    assert in_proc.value == pytest.approx(0.98) and in_proc.passed  # vs Q8_0, not the best
    batched = got["engine in-process vs llama.cpp batched decode on the same Q8_0 weights"]
    assert batched.value == pytest.approx(290 / 300) and not batched.passed
    assert batched.line().endswith("(target >= 1x) MISS")
    draft = got["slimserve over gRPC with a draft vs best llama.cpp plain decode"]
    assert draft.value == pytest.approx(140 / 105) and draft.passed
    assert got["peak PSS of slimserve's serving processes"].passed
    pss = got["peak PSS of slimserve_draft's serving processes"]
    assert not pss.passed and pss.line().endswith("1100 MB (target <= 1000 MB) MISS")
    table = bench.markdown(rows)
    assert "| llama_cpp (best llama.cpp) | 1 |" in table and "judged on PSS" in table


def test_a_target_whose_systems_did_not_run_prints_no_line() -> None:
    b = _bench(
        ["slimserve_draft", "engine", "llama_cpp_q8"],
        [
            bench.Sample("slimserve_draft", 1, 0, error="did not start: exited with 2"),
            _sample("engine", 1, 90.0),
            _sample("llama_cpp_q8", 1, 100.0),
        ],
    )
    rows = bench.summarise(b)
    labels = [t.label for t in bench.targets(rows)]
    assert len(labels) == 1 and labels[0].startswith("engine in-process vs llama.cpp's own")
    assert "| slimserve_draft | 1 | error: did not start: exited with 2 |" in bench.markdown(rows)


def test_outputs_identical_compares_token_ids_per_prompt_at_concurrency_1() -> None:
    def out(*ids: list[int]) -> dict[str, dict[str, object]]:
        return {f"p{i}": {"token_ids": t, "text": ""} for i, t in enumerate(ids)}

    samples = [
        _sample("slimserve", 1, 50.0, outputs=out([1, 2, 3], [4, 5])),
        _sample("slimserve_draft", 1, 50.0, outputs=out([1, 2, 3], [4, 6], [7])),
    ]
    cmp = bench.same_outputs(samples, "slimserve_draft", "slimserve")
    assert cmp == {
        "system": "slimserve_draft",
        "reference": "slimserve",
        "identical": 1,
        "prompts": 2,
    }
    assert bench.identical_line(cmp).startswith("outputs identical: no (1 of 2 prompts")
    same = bench.same_outputs(samples[:1] * 2, "slimserve", "slimserve")
    assert same is not None and bench.identical_line(same).startswith("outputs identical: yes")
    assert bench.same_outputs(samples[:1], "slimserve_draft", "slimserve") is None


def test_cpu_flags_name_what_is_there_and_what_is_not() -> None:
    epyc = CpuInfo("AMD EPYC", frozenset({"avx2", "avx512f", "avx512_bf16", "sse2"}))
    assert bench.cpu_flags(epyc) == "avx2 avx512f avx512_bf16 (absent: amx_*)"
    spr = CpuInfo("Xeon", frozenset({"avx2", "avx512f", "amx_tile", "amx_int8", "amx_bf16"}))
    assert bench.cpu_flags(spr) == "avx2 avx512f amx_bf16 amx_int8 amx_tile (absent: avx512_bf16)"


def test_bench_serve_defaults_race_production_against_llamacpp() -> None:
    args = build_parser().parse_args(["bench", "serve"])
    assert args.model == "smollm2-135m-instruct@production"
    assert args.threads == os.cpu_count()
    assert args.systems == ["slimserve", "slimserve_draft", "engine", "llama_cpp", "llama_cpp_q8"]
    assert (args.concurrency, args.repeats) == ([1, 16], 3)
    assert (args.draft, args.draft_tokens) == ("ngram", 4)
    args = build_parser().parse_args(["bench", "serve", "--systems", "engine,hf_generate"])
    assert args.systems == ["engine", "hf_generate"]


def test_an_unknown_system_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["bench", "serve", "--systems", "engine,vllm"])
    assert exc.value.code == 2
    assert "unknown system vllm" in capsys.readouterr().err


@pytest.mark.slow
def test_a_race_of_real_workers_records_outputs_memory_and_a_failed_start(
    tiny_registry: Path,
) -> None:
    b = bench.Bench(
        registry=tiny_registry,
        model="tiny@1",
        threads=1,
        new_tokens=4,
        concurrency=[1, 2],
        repeats=2,
        systems=["engine", "engine_ipc", "hf_generate"],
        gguf=None,
        max_batch=2,
        backend="llama",
        hf_model="missing@1",  # hf_generate cannot start: recorded, the others still run
    )
    report = bench.run(b, score=False)
    rows = {(r["system"], r["concurrency"]): r for r in report["results"]}
    assert rows[("hf_generate", 1)]["error"].startswith("did not start: RuntimeError: exited")
    for system in ("engine", "engine_ipc"):
        for c in (1, 2):
            r = rows[(system, c)]
            assert r["repeats"] == 2 and r["tokens_per_s"] > 0
            assert 0 < r["peak_pss_mb"] <= r["peak_rss_mb"] <= r["hwm_rss_mb"] + 1
    # The engine process and its forkserver count under engine_ipc's worker.
    assert rows[("engine_ipc", 1)]["peak_rss_mb"] > rows[("engine", 1)]["peak_rss_mb"]
    seen = report["outputs"]
    assert set(seen["engine"]) == set(bench.PROMPTS[:2])  # concurrency 1, one per repeat
    assert all(len(o["token_ids"]) == 4 for o in seen["engine"].values())
    assert bench.same_outputs(b.samples, "engine_ipc", "engine") == {
        "system": "engine_ipc",
        "reference": "engine",
        "identical": 2,
        "prompts": 2,
    }


def test_rows_report_itl_mean_and_p90_and_ttft_apart_from_decode() -> None:
    sample = _sample("slimserve", 1, 100.0)
    sample.itl_ms = [1.0] * 9 + [11.0]  # one slow token in ten
    sample.ttft_ms, sample.e2e_ms = [40.0], [140.0]
    (row,) = bench.summarise(_bench(["slimserve"], [sample]))
    assert row["itl_ms_mean"] == pytest.approx(2.0)
    assert row["itl_ms_p50"] == pytest.approx(1.0) and row["itl_ms_p90"] == pytest.approx(2.0)
    assert row["decode_ms_p50"] == pytest.approx(100.0)  # first to last token
    assert "| ITL mean ms | ITL p50 ms | ITL p90 ms |" in bench.markdown([row])


def test_served_runs_are_set_beside_in_process_and_without_the_threadpool() -> None:
    b = _bench(
        ["slimserve", "slimserve_nopool", "engine", "engine_nopool"],
        [
            _sample("slimserve", 1, 95.0),
            _sample("slimserve_nopool", 1, 80.0),
            _sample("engine", 1, 100.0),
            _sample("engine_nopool", 1, 90.0),
        ],
    )
    lines = bench.side_by_side(bench.summarise(b))
    assert lines[0].startswith("slimserve vs engine, c=1: tok/s 0.950x (95.0 vs 100.0)")
    assert any(ln.startswith("slimserve vs slimserve_nopool, c=1: tok/s 1.188x") for ln in lines)
    assert any(ln.startswith("engine vs engine_nopool, c=1: tok/s 1.111x") for ln in lines)
    assert not any("llama_server" in ln for ln in lines)  # it did not run


def test_mixed_gaps_count_from_the_burst_and_name_the_worst() -> None:
    from slimserve.bench import mixed

    # Tokens every 10 ms, a 500 ms stall after the burst at t=1.0 s, then 10 ms again.
    times = [i * 0.01 for i in range(101)] + [1.5 + i * 0.01 for i in range(50)]
    gaps = mixed._gaps(times, arrive=1.0, end=1.8)
    assert gaps["p50_before_ms"] == pytest.approx(10.0)
    assert gaps["max_gap_ms"] == pytest.approx(500.0)
    run = {
        "streams": [gaps],
        "long": [{"tokens": 1302, "echo": True, "ttft_ms": 900.0}],
        "score_labels": 32,
        "score_ms": 300.0,
    }
    lines = mixed.report_lines({"served": "m@1", "runs": [run]})
    assert "1302 tokens, echo+logprobs" in lines[1] and "32-label Score 300 ms" in lines[1]
    assert lines[-1].endswith("largest inter-token gap of a running stream: 500 ms")
    assert mixed.max_seq_len(1300) == 2048
    assert mixed.report_lines({"error": "did not start: x"}) == ["mixed: error: did not start: x"]
    # Beside the baseline (prompts fed whole): the gap and TTFT targets, judged per prompt.
    base = {**run, "streams": [{**gaps, "max_gap_ms": 4000.0}]}
    base["long"] = [{"tokens": 1302, "echo": True, "ttft_ms": 600.0}]
    lines = mixed.report_lines({"served": "m@1", "runs": [run], "whole": {"runs": [base]}})
    assert lines[-2] == (
        "largest inter-token gap: 500 ms (baseline 4000 ms) (target <= 300 ms) MISS"
    )
    assert lines[-1] == (
        "long prompts' TTFT against the baseline: 1.50x (900 vs 600 ms, echo); worst 1.50x "
        "(target <= 1.3x) MISS"
    )
    lines = mixed.report_lines({"served": "m@1", "runs": [run], "whole": {"error": "x"}})
    assert lines[-1] == "mixed baseline (serve --max-step-ms 1000000): error: x"


def test_llama_server_is_skipped_with_a_line_where_it_cannot_be_had(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from slimserve.cli.bench import _llama_server

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing built for this CPU here
    monkeypatch.setenv("PATH", str(tmp_path))  # and no llama-server on PATH
    args = build_parser().parse_args(
        ["bench", "serve", "--systems", "engine,llama_server", "--no-build-llama-server"]
    )
    assert args.systems == ["engine", "llama_server"]
    assert _llama_server(args, tmp_path) is None
    err = capsys.readouterr().err
    assert err.startswith("llama_server: not on PATH and not built for this CPU")
    assert err.rstrip().endswith("; skipped")


def test_decode_threads_reach_slimserve_and_the_in_process_engine(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # `bench serve --decode-threads N` gives both sides of the served/in-process ratio the
    # same one-token threads; the no-pool systems keep theirs (all threads, no pool).
    # Mutation: passing it to the server only (or neither) fails here.
    cmds: dict[str, list[str]] = {}

    def record(self: Any, cmd: list[str], *, pipes: bool) -> None:
        cmds["server" if "slimserve.cli" in cmd else cmd[3]] = cmd  # no process starts

    monkeypatch.setattr(bench._Process, "__init__", record)
    monkeypatch.setattr(bench._Worker, "_read", lambda self: {})
    monkeypatch.setattr(bench._Server, "_wait_ready", lambda self, timeout_s: "")
    b = bench.Bench(
        registry=tmp_path, model="m@1", threads=2, new_tokens=8, concurrency=[1], repeats=1,
        systems=["slimserve", "engine"], gguf=None, max_batch=2, decode_threads=1,
    )  # fmt: skip
    bench._Server(b, "slimserve")
    bench._Worker("engine", b)
    bench._Worker("engine_nopool", b)
    for system in ("server", "engine"):
        assert cmds[system][cmds[system].index("--decode-threads") + 1] == "1", cmds[system]
    assert "--decode-threads" not in cmds["engine_nopool"]
    parsed = build_parser().parse_args(["bench", "serve", "--decode-threads", "1"])
    assert parsed.decode_threads == 1
