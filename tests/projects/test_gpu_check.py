"""projects/benchmark/gpu_check.py and its harness on the CPU: RESULT lines, sections that
survive each other's failures (in process and in child processes), warning capture with call
sites, the reduced mode end to end on a few sections, and tools/gpu_wheels.py's size check.
No timing is asserted."""
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import warnings

import pytest

from projects.benchmark import check_harness as harness
from projects.benchmark import gpu_check, gpu_sections

# tools/ is not a package (and detectron2's wheel installs an unrelated top-level "tools"): load the script by path
_spec = importlib.util.spec_from_file_location("gpu_wheels", os.path.join(harness.REPO, "tools", "gpu_wheels.py"))
gpu_wheels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_wheels)


def test_result_lines_round_trip_and_malformed_ones_are_refused(capsys):
    report = harness.Report()
    report.result("msda.fwd_ms", 1.23456, case="encoder", dtype="bf16", path="auto")
    report.result("env.cuda_available", False)
    report.status("sync", "skipped", "no CUDA")
    report.status("train", "failed", "error=RuntimeError seconds=1.0")
    out = capsys.readouterr().out.splitlines()
    assert out == ["RESULT msda.fwd_ms case=encoder dtype=bf16 path=auto 1.235", "RESULT env.cuda_available 0",
                   "RESULT section=sync status=skipped: no CUDA",
                   "RESULT section=train status=failed error=RuntimeError seconds=1.0"]
    assert [harness.parse_result(line) for line in out] == report.lines
    assert report.lines[0] == {"metric": "msda.fwd_ms", "keys": {"case": "encoder", "dtype": "bf16", "path": "auto"},
                               "value": 1.235}
    assert report.lines[2] == {"section": "sync", "status": "skipped", "detail": "no CUDA"}
    assert math.isnan(harness.parse_result("RESULT train.loss task=X nan")["value"])
    assert harness.parse_result("ENV torch=2.11") is None
    with pytest.raises(ValueError, match="malformed"):
        harness.parse_result("RESULT msda.fwd_ms path=auto")
    with pytest.raises(ValueError, match="without spaces"):
        report.result("infer.img_per_s", 1.0, gpu="NVIDIA H100")


def test_a_failing_or_overrunning_section_does_not_stop_the_others(capsys):
    report, ran = harness.Report(), []

    def boom():
        raise ZeroDivisionError("boom in section a")

    def spin():  # a section that would run for 30 s, stopped at its 0.3 s limit
        end = time.monotonic() + 30
        while time.monotonic() < end:
            try:
                time.sleep(0.01)
            except Exception:  # a section's own handler cannot swallow the time limit
                pass

    def skip():
        raise harness.Skipped("no CUDA")

    start = time.monotonic()
    got = [harness.run_section(report, "a", boom, 5), harness.run_section(report, "b", spin, 0.3),
           harness.run_section(report, "c", skip, 5), harness.run_section(report, "d", lambda: ran.append(1), 5)]
    assert time.monotonic() - start < 10
    assert got == ["failed", "failed", "skipped", "ok"] and ran == [1]
    assert report.statuses() == {"a": "failed", "b": "failed", "c": "skipped", "d": "ok"}
    text = capsys.readouterr()
    assert "ZeroDivisionError: boom in section a" in text.err  # the traceback
    assert "SectionTimeout" in text.err
    assert "RESULT section=a status=failed error=ZeroDivisionError" in text.out


def test_child_sections_crashing_or_hanging_are_reported_as_failures(capsys):
    report = harness.Report()
    ok = [sys.executable, "-c", "print('RESULT x.value k=1 2'); print('RESULT section=x status=ok seconds=0.0')"]
    crash = [sys.executable, "-c", "import os; print('RESULT y.value 3', flush=True); os._exit(3)"]
    hang = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    start = time.monotonic()
    got = [harness.run_child(report, "x", ok, 30), harness.run_child(report, "y", crash, 30),
           harness.run_child(report, "z", hang, 1.5)]
    assert time.monotonic() - start < 20
    assert got == ["ok", "failed", "failed"]
    assert report.statuses() == {"x": "ok", "y": "failed", "z": "failed"}
    assert {"metric": "y.value", "keys": {}, "value": 3.0} in report.lines  # what it printed before dying
    out = capsys.readouterr().out
    assert "RESULT section=y status=failed error=exit_3" in out
    assert "started" in out and "killed after" in out


def _warn_twice():
    for _ in range(2):
        warnings.warn("called a synchronizing CUDA operation")  # the same line twice


def test_capture_warnings_keeps_every_occurrence_with_its_site_and_cxx_lines():
    with harness.capture_warnings() as seen:
        _warn_twice()
        os.write(2, b"[W1207 15:35:29.819 reducer.cpp:1529] Warning: find_unused_parameters=True was specified\n")
        os.write(2, b"some other line\n")
    assert [w.category for w in seen] == ["UserWarning", "UserWarning", "c++"]
    line = _warn_twice.__code__.co_firstlineno + 2
    assert seen[0].site == f"tests/projects/test_gpu_check.py:{line} (_warn_twice)" == seen[1].site
    assert seen[2].site == "c++ reducer.cpp:1529"


def test_child_command_line_carries_the_settings():
    args = gpu_check.parse_args(["--reduced", "--cpu", "--tasks", "DETECTION", "--msda-paths", "pytorch",
                                 "--inject-failure", "msda", "train", "--infer-batches", "1", "3"])
    gpu_check._fill_defaults(args, cuda=False)
    cmd = gpu_check.child_argv(args, "msda", 42.0, text_encoder="/tmp/te")
    assert cmd[:2] == [sys.executable, os.path.abspath(gpu_check.__file__)]
    child = gpu_check.parse_args(cmd[2:])
    assert child.child and child.isolate is False and child.sections == ["msda"]
    assert child.inject_failure == ["msda"]  # only its own section's
    for key in ("reduced", "cpu", "tasks", "msda_paths", "config", "num_gpus", "dtype", "ddp_backend", "infer_batches"):
        assert getattr(child, key) == getattr(args, key), key
    assert child.infer_size == "128x192" and child.budget_s == 42.0 and child.text_encoder == "/tmp/te"


def test_reduced_mode_end_to_end_with_a_failing_section(tmp_path, monkeypatch, capsys):
    """env fails on purpose; msda, train and ddp (gloo) run on the CPU; sync needs CUDA."""
    monkeypatch.setenv("OUT", str(tmp_path))
    rc = gpu_check.main(["--reduced", "--cpu", "--tasks", "DETECTION", "--sections", "env", "msda", "train", "sync",
                         "ddp", "--ddp-backend", "gloo", "--inject-failure", "env"])
    out = capsys.readouterr()
    assert rc == 1  # a section failed
    assert "failure injected into section env" in out.err
    lines = [line for line in out.out.splitlines() if line.startswith("RESULT ")]
    parsed = [harness.parse_result(line) for line in lines]  # every RESULT line is well formed
    statuses = {p["section"]: (p["status"], p["detail"]) for p in parsed if "section" in p}
    assert statuses["env"][0] == "failed" and "error=RuntimeError" in statuses["env"][1]
    assert {k: v[0] for k, v in statuses.items()} == {"env": "failed", "msda": "ok", "train": "ok", "sync": "skipped",
                                                      "ddp": "ok"}
    assert statuses["sync"][1] == "no CUDA"

    def values(metric, **keys):
        return [p["value"] for p in parsed if p.get("metric") == metric and keys.items() <= p["keys"].items()]

    # the auto path (the compiled CPU kernel, or the reference where it is not built) matches the reference
    for dtype, rel in (("fp32", 1e-5), ("bf16", 2e-2)):
        for case in ("encoder", "decoder"):
            for tensor in ("out", "grad_value", "grad_loc", "grad_attn"):
                (scale,) = values("msda.ref_max_abs", case=case, dtype=dtype, tensor=tensor)
                (err,) = values("msda.max_err", case=case, dtype=dtype, tensor=tensor, path="auto")
                assert scale > 0 and err <= rel * scale, (case, dtype, tensor, err, scale)
    assert all(v > 0 for v in values("msda.fwdbwd_ms")) and len(values("msda.fwdbwd_ms")) == 10
    (batch,) = values("train.per_gpu_batch", task="DETECTION")
    assert batch == 2  # 16 images over 8 GPUs
    (loss,) = values("train.loss", task="DETECTION")
    assert math.isfinite(loss) and values("train.s_per_iter", task="DETECTION")[0] > 0
    assert values("ddp.params_without_grad", task="DETECTION") == [0]  # detection trains every parameter
    (n_warnings,) = values("ddp.warnings", task="DETECTION")  # DDP's "... did not find any unused parameters",
    assert n_warnings == out.out.count("ddp DETECTION warning x")  # once per process (none if a test had it)
    log = (tmp_path / "gpu_check.log").read_text()
    assert all(line in log for line in lines) and "failure injected into section env" in log
    strict = [{**p, "value": str(p["value"])} if "value" in p and not math.isfinite(p["value"]) else p for p in parsed]
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == strict  # NaN as "nan": strict JSON
    assert "gpu_check: 3 ok, 1 failed, 1 skipped" in out.out


def test_sync_section_counts_and_ranks_call_sites(monkeypatch, capsys):
    """The sync section's steps, inference and site ranking on the CPU, with a stand-in for
    ``set_sync_debug_mode`` (a no-op there) that reports three synchronising calls per counted call."""
    calls = []

    def counted(fn):
        out = fn()
        calls.append(1)
        stack = [f for f in __import__("traceback").extract_stack()]
        return out, [harness.CapturedWarning("called a synchronizing CUDA operation", "UserWarning", stack)] * 3

    monkeypatch.setattr(gpu_sections, "_counted_syncs", counted)
    args = gpu_check.parse_args(["--reduced", "--cpu", "--tasks", "DETECTION"])
    gpu_check._fill_defaults(args, cuda=False)
    report = harness.Report()
    ck = gpu_sections.Check(args, report)
    monkeypatch.setattr(ck, "require_cuda", lambda: None)
    assert harness.run_section(report, "sync", lambda: gpu_sections.section_sync(ck), 120) == "ok"
    counts = {(r["keys"]["task"], r["keys"]["mode"]): r["value"] for r in report.lines if r.get("metric") == "sync.count"}
    assert counts == {("DETECTION", "train"): 3, ("DETECTION", "infer"): 3}
    assert len(calls) == 3  # the probe, one training step, one inference forward
    out = capsys.readouterr().out
    assert "sync DETECTION (train, batch 2): 3 synchronising calls" in out
    assert "tests/projects/test_gpu_check.py" in out  # the innermost repo frame of the stand-in's stack


def test_the_check_names_the_packages_without_a_wheel(tmp_path):
    names = list(gpu_wheels.PACKAGES)
    missing = gpu_wheels.missing_wheels(str(tmp_path / "none"))
    assert len(missing) == len(names) and all(n in m for n, m in zip(names, missing))
    (tmp_path / ".whl").mkdir()
    for name in names[1:]:
        (tmp_path / ".whl" / f"{gpu_wheels.normalise(name)}-1.0-py3-none-any.whl").write_bytes(b"w")
    (tmp_path / ".whl" / "README.md").write_text("not a wheel")
    assert gpu_wheels.missing_wheels(str(tmp_path / ".whl")) == [
        f"{names[0]}: no wheel in {tmp_path / '.whl'} (run tools/gpu_wheels.py without --check to collect it)"]


def test_wheel_names_and_what_travels(tmp_path):
    assert gpu_wheels.parse_wheel_name("antlr4_python3_runtime-4.9.3-py3-none-any.whl") == (
        "antlr4_python3_runtime", "4.9.3", "py3", "none", "any")
    assert gpu_wheels.normalise("antlr4-python3-runtime") == "antlr4_python3_runtime"
    assert gpu_wheels.is_pure("fvcore-0.1.5.post20221221-py3-none-any.whl")
    assert not gpu_wheels.is_pure("pycocotools-2.0.11-cp312-abi3-manylinux2014_x86_64.whl")
    assert not gpu_wheels.is_pure("sal_detectron2-0.7.2-cp310-none-any.whl")
    assert gpu_wheels.parse_wheel_name("README.md") is None

    def git(*a):
        subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / ".gitignore").write_text("/.whl/\n/build/\n")
    (tmp_path / "tracked.py").write_bytes(b"x" * 1000)
    git("add", ".gitignore", "tracked.py")
    (tmp_path / "untracked.txt").write_bytes(b"y" * 300)
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "big.bin").write_bytes(b"z" * 5000)  # ignored: travels only when carried
    (tmp_path / ".whl").mkdir()
    (tmp_path / ".whl" / "a-1.0-py3-none-any.whl").write_bytes(b"w" * 2000)
    sizes = gpu_wheels.travel_size((".whl",), repo=str(tmp_path))
    tree = 1000 + 300 + len("/.whl/\n/build/\n")  # tracked, untracked, .gitignore
    assert sizes == {"tree": tree, ".whl": 2000, "total": tree + 2000}
    assert gpu_wheels.travel_size((".whl", "build"), repo=str(tmp_path))["total"] == tree + 2000 + 5000
    (tmp_path / ".whl" / "old-0.9-py3-none-any.whl").write_bytes(b"")
    os.symlink(tmp_path / "elsewhere", tmp_path / ".whl" / "dangling")  # a link counts as a link
    assert gpu_wheels.tree_bytes(str(tmp_path / ".whl")) == 2000 + os.lstat(tmp_path / ".whl" / "dangling").st_size
