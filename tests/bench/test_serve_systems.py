"""`slimserve bench serve` run for real on the tiny model: the systems every PASS/MISS line
is judged on (slimserve, slimserve_draft, engine, llama_cpp, llama_cpp_q8), and a system
that cannot start. One race, through the command's own handler, is shared by the module;
each test reads what it printed, the JSON report it wrote and the samples behind it.

The llama.cpp systems get a GGUF exported from the tiny model (float32); the command
re-encodes it to Q8_0 for llama_cpp_q8 as it does the shipped file. Without
llama-cpp-python the command leaves them out (as it does for a user), and their tests skip.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from slimserve.bench import serve as bench
from slimserve.engine.backends import llamacpp

#: ~35 s on 2 vCPUs (two servers, three workers): the slow tier.
pytestmark = pytest.mark.slow

NEW_TOKENS = 8
CONCURRENCY = (1, 2)
SERVED = ("slimserve", "slimserve_draft")
LLAMA = ("llama_cpp", "llama_cpp_q8")
JUDGED = (*SERVED, "engine", *LLAMA)
NO_LLAMACPP = "llama-cpp-python is not installed: bench serve leaves the llama_cpp systems out"


@dataclass
class Race:
    """What one `bench serve` run left: its Bench (with every sample), the report as
    written to --json, the lines printed, and each server's model info right after start."""

    bench: bench.Bench
    report: dict[str, Any]
    printed: list[str]
    info: dict[str, Any]
    gguf: Path | None

    def row(self, system: str, c: int) -> dict[str, Any]:
        (row,) = [
            r for r in self.report["results"] if r["system"] == system and r["concurrency"] == c
        ]
        return row

    def line(self, prefix: str) -> str:
        (line,) = [ln for ln in self.printed if ln.startswith(prefix)]
        return line


def _export_gguf(registry: Path, out: Path) -> Path:
    """The tiny model's weights as a float32 GGUF (what llama.cpp's own loop runs)."""
    from slimserve.engine.backends.gguf_export import export_gguf
    from slimserve.registry.artifact import load_model
    from slimserve.registry.store import Registry

    artifact = Registry(registry).get("tiny", "1")
    model, _ = load_model(artifact)
    return export_gguf(
        model.config, model.state_dict(), artifact.path / "tokenizer.json", out, "f32"
    )


@pytest.fixture(scope="module")
def race(tiny_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Race]:
    import json

    import torch

    from slimserve.cli import build_parser
    from slimserve.cli.bench import cmd_bench_serve
    from slimserve.clients import Client

    tmp = tmp_path_factory.mktemp("bench-serve")
    registry = tmp / "registry"  # a copy: qualification writes its verdicts into it
    shutil.copytree(tiny_registry, registry, symlinks=True)
    has_llama = llamacpp.available()
    gguf = _export_gguf(registry, tmp / "tiny.f32.gguf") if has_llama else None
    systems = [*JUDGED, "hf_generate"]  # hf_generate is given a version that does not exist
    argv = [
        "bench", "serve", "--registry", str(registry), "--model", "tiny@1",
        "--threads", "1", "--new-tokens", str(NEW_TOKENS),
        "--concurrency", ",".join(map(str, CONCURRENCY)), "--repeats", "1",
        "--max-batch", "2", "--systems", ",".join(systems), "--hf-model", "missing@1",
        "--no-score", "--chat-probe", "0", "--json", str(tmp / "report.json"),
    ]  # fmt: skip
    if gguf is not None:
        argv += ["--gguf", str(gguf)]
    args = build_parser().parse_args(argv)
    ran: list[bench.Bench] = []
    info: dict[str, Any] = {}
    real_run, real_start = bench.run, bench.start

    def run(b: bench.Bench, **kw: Any) -> dict[str, Any]:
        ran.append(b)  # the real run; kept for its samples
        return real_run(b, **kw)

    def start(b: bench.Bench, system: str) -> Any:
        proc = real_start(b, system)
        if system in bench.SERVER_SYSTEMS:  # what the server says it serves, drafter included
            with Client(proc.target, retries=0) as c:  # type: ignore[attr-defined]
                info[system] = c.model_info()
        return proc

    out = io.StringIO()
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLIMSERVE_HOME", str(tmp / "home"))  # where the Q8_0 re-encode is cached
        mp.setattr(bench, "run", run)
        mp.setattr(bench, "start", start)
        try:
            with contextlib.redirect_stdout(out):
                assert cmd_bench_serve(args) == 0
        finally:
            torch.set_num_threads(threads)  # the handler sets `--threads` on this process
    report = json.loads((tmp / "report.json").read_text())
    yield Race(ran[0], report, out.getvalue().splitlines(), info, gguf)


def _needs_llamacpp(system: str) -> None:
    if system in LLAMA and not llamacpp.available():
        pytest.skip(NO_LLAMACPP)


@pytest.mark.parametrize("system", JUDGED)
def test_each_system_streams_the_requested_tokens_at_each_concurrency(
    race: Race, system: str
) -> None:
    _needs_llamacpp(system)
    for c in CONCURRENCY:
        (sample,) = [s for s in race.bench.samples if (s.system, s.concurrency) == (system, c)]
        assert sample.error == ""
        assert sample.tokens == NEW_TOKENS * c
        assert len(sample.ttft_ms) == len(sample.e2e_ms) == c
        assert len(sample.itl_ms) == (NEW_TOKENS - 1) * c  # one gap per token after the first
        assert sample.peak_pss_mb > 0
        row = race.row(system, c)
        assert row["repeats"] == 1 and row["failed_runs"] == 0
        assert row["tokens_per_s"] == pytest.approx(sample.tokens / sample.wall_s)
    # The prompt of concurrency 1 and the tokens generated for it are in the report.
    (prompt,) = bench.prompts_for(0, 1)
    assert len(race.report["outputs"][system][prompt]["token_ids"]) == NEW_TOKENS


def test_the_draft_server_drafts_and_generates_what_the_plain_one_does(race: Race) -> None:
    assert (race.info["slimserve_draft"].draft, race.info["slimserve_draft"].draft_tokens) == (
        "ngram",
        4,
    )
    assert race.info["slimserve"].draft == ""
    seen = race.report["outputs"]
    (prompt,) = bench.prompts_for(0, 1)
    greedy = seen["slimserve"][prompt]["token_ids"]
    assert seen["slimserve_draft"][prompt]["token_ids"] == greedy
    assert seen["engine"][prompt]["token_ids"] == greedy  # the same plan, in-process
    assert race.report["outputs_identical"] == {
        "system": "slimserve_draft",
        "reference": "slimserve",
        "identical": 1,
        "prompts": 1,
    }
    assert race.line("outputs identical: ").startswith(
        "outputs identical: yes (1 of 1 prompts; slimserve_draft vs slimserve"
    )


def test_served_lines_name_one_plan_for_every_slimserve_system_and_each_llamacpp_file(
    race: Race,
) -> None:
    served = race.report["environment"]["served"]
    plan = race.info["slimserve"].plan
    assert plan and race.info["slimserve_draft"].plan == plan
    for system in SERVED:
        assert served[system].startswith(f"tiny@1 on {race.info[system].backend} [{plan}]")
    assert served["engine"].startswith(f"{plan} (")
    assert race.line("served: ") == f"served: {served}"  # printed with the environment
    if race.gguf is None:
        return
    from gguf import GGUFReader, LlamaFileType

    assert served["llama_cpp"] == f"llama.cpp on {race.gguf.name}"
    assert served["llama_cpp_q8"] == f"llama.cpp on {race.gguf.stem}.Q8_0.gguf"
    q8 = race.bench.gguf_q8
    assert q8 is not None and q8.name == f"{race.gguf.stem}.Q8_0.gguf"
    file_type = GGUFReader(q8).fields["general.file_type"].parts[-1][0]
    assert int(file_type) == LlamaFileType.MOSTLY_Q8_0


#: "<label>, c=N (A x.x vs B y.y tok/s): R.RRRx (target >= G) PASS|MISS"
SPEED_LINE = re.compile(
    r"^(?P<label>.+), c=(?P<c>\d+) \((?P<a>\w+) (?P<av>[\d.]+) vs (?P<b>\w+) (?P<bv>[\d.]+) "
    r"tok/s\): (?P<r>[\d.]+)x \(target >= (?P<goal>[\d.]+)x\) (?P<verdict>PASS|MISS)$"
)


def _speed_line(race: Race, label: str) -> re.Match[str]:
    match = SPEED_LINE.match(race.line(label + ", c=1 ("))
    assert match is not None
    return match


def _judged(race: Race, m: re.Match[str], system: str, baseline: str) -> None:
    """The line's figures are the table's rows, and its verdict their ratio against its goal."""
    mine, ref = race.row(system, 1), race.row(baseline, 1)
    assert (m["a"], m["b"]) == (system, baseline)
    assert m["av"] == f"{mine['tokens_per_s']:.1f}" and m["bv"] == f"{ref['tokens_per_s']:.1f}"
    ratio = mine["tokens_per_s"] / ref["tokens_per_s"]
    assert m["r"] == f"{ratio:.3f}"
    assert m["verdict"] == ("PASS" if ratio >= float(m["goal"]) else "MISS")
    (target,) = [t for t in race.report["targets"] if t["label"].startswith(m["label"])]
    assert target["value"] == pytest.approx(ratio) and target["passed"] == (m["verdict"] == "PASS")


def test_llamacpp_rows_are_the_baselines_of_the_pass_miss_lines(race: Race) -> None:
    if race.gguf is None:
        pytest.skip(NO_LLAMACPP)
    for c in CONCURRENCY:
        rows = [race.row(s, c) for s in LLAMA]
        best = max(rows, key=lambda r: r["tokens_per_s"])
        assert [r["best_llamacpp"] for r in rows] == [r is best for r in rows]
        # The table marks it, and sets every system beside it.
        marked = [ln for ln in race.printed if f" (best llama.cpp) | {c} |" in ln]
        assert len(marked) == 1 and marked[0].startswith(f"| {best['system']} (best llama.cpp)")
        ours = race.row("slimserve_draft", c)["tokens_per_s"] / best["tokens_per_s"]
        (table_row,) = [ln for ln in race.printed if ln.startswith(f"| slimserve_draft | {c} |")]
        assert f"| {ours:.2f}× |" in table_row
    draft = _speed_line(race, "slimserve over gRPC with a draft vs best llama.cpp plain decode")
    best_at_1 = max(LLAMA, key=lambda s: race.row(s, 1)["tokens_per_s"])
    _judged(race, draft, "slimserve_draft", best_at_1)
    in_proc = _speed_line(
        race, "engine in-process vs llama.cpp's own loop on the same Q8_0 weights"
    )
    _judged(race, in_proc, "engine", "llama_cpp_q8")  # the Q8_0 row, whichever is faster


def test_peak_pss_lines_are_the_largest_sample_of_each_server(race: Race) -> None:
    for system in SERVED:
        peak = max(s.peak_pss_mb for s in race.bench.samples if s.system == system)
        assert peak == max(race.row(system, c)["peak_pss_mb"] for c in CONCURRENCY)
        verdict = "PASS" if peak <= bench.PSS_TARGET_MB else "MISS"
        label = f"peak PSS of {system}'s serving processes"
        (target,) = [t for t in race.report["targets"] if t["label"] == label]
        assert target["value"] == peak and target["unit"] == "MB" and target["at_most"]
        assert race.line(f"peak PSS of {system}'s serving processes: ") == (
            f"peak PSS of {system}'s serving processes: {peak:.0f} MB (target <= 1000 MB) {verdict}"
        )


def test_a_system_that_cannot_start_is_an_error_line_and_the_race_goes_on(race: Race) -> None:
    for c in CONCURRENCY:
        error = race.row("hf_generate", c)["error"]
        assert error.startswith("did not start: RuntimeError: exited with ")
        assert f"| hf_generate | {c} | error: {error} |" in race.printed
    # No target is judged on it (hf_generate is the GPU lines' baseline); the rest ran.
    assert not [t for t in race.report["targets"] if "hf_generate" in t["label"]]
    assert "hf_generate" not in race.report["environment"]["served"]
    ran = {r["system"] for r in race.report["results"] if "error" not in r}
    assert ran == {s for s in JUDGED if s not in LLAMA or race.gguf is not None}
