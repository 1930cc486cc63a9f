"""`ctharmonize cohort`: discovery of a mixed tree, mirrored output, resume after a crash, failures,
shards and their merge, and the input left byte-identical."""

from __future__ import annotations

import csv
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from cohort_tree import make_mixed_tree, make_series
from model_factory import make_model_file

from TextureStarGANCore import cli, cohort
from TextureStarGANCore.cohort import run_cohort, shard_of
from TextureStarGANCore.cohort_manifest import merge
from TextureStarGANCore.cohort_pool import worker_slots
from TextureStarGANCore.config import ModelConfig
from TextureStarGANCore.discovery import discover
from TextureStarGANCore.fileio import TEMP_MARKER
from TextureStarGANCore.preprocessing import PreprocessSpec
from TextureStarGANCore.volume_io import InputError, read_volume

TINY = ModelConfig.small(img_size=64, base_width=8, max_width=32, style_dim=16, mapping_hidden=32)
SPEC = PreprocessSpec(canvas_size=64, pixel_spacing_mm=4.0)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture in conftest.py


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_model_file(tmp_path_factory.mktemp("model") / "m.safetensors", config=TINY, spec=SPEC,
                           iterations=10)


@pytest.fixture()
def tree(tmp_path) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "in"
    return root, make_mixed_tree(root)


def digest(folder: Path) -> str:
    """Names, bytes and modification times of everything under ``folder``."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(f"{p.relative_to(folder)}:{p.stat().st_mtime_ns}".encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def by_uid(manifest: list[dict]) -> dict[str, dict]:
    return {r["series_uid"] or r["path"]: r for r in manifest}


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if TEMP_MARKER in p.name or ".old-" in p.name]


def test_discovery_on_a_mixed_tree(tree):
    root, uids = tree
    found = discover(root)
    series = {s.series_uid or s.path: s for s in found.series}
    assert set(series) == {*uids.values(), "p3/vol.nii.gz"}
    assert series[uids["std"]].path == series[uids["bone"]].path == "two"  # two series in one folder
    assert (series[uids["std"]].slices, series[uids["bone"]].slices) == (3, 4)
    assert series[uids["bone"]].kernel == "BONE"
    usable = {k for k, s in series.items() if not s.skip_reason}
    assert usable == {uids["std"], uids["bone"], uids["p1"], "p3/vol.nii.gz"}
    assert "localizer" in series[uids["scout"]].skip_reason
    assert "modality SR" in series[uids["sr"]].skip_reason
    assert "secondary capture" in series[uids["dose"]].skip_reason
    nifti = series["p3/vol.nii.gz"]
    assert (nifti.kind, nifti.slices, nifti.series_uid) == ("file", 3, "")
    assert found.ignored_files == ["p3/notes.txt"]

    only = discover(root, include=["two"], exclude=["p2/*"])
    assert {s.path for s in only.series} == {"two"} and only.filtered_out == 4
    assert {s.path for s in discover(root, exclude=["p2/*", "*.nii.gz"]).series} == {"two", "p1/ct"}


def test_cohort_mirrors_the_tree_writes_manifest_and_report_and_leaves_the_input(tree, model, tmp_path,
                                                                                 capsys):
    root, uids = tree
    before = digest(root)
    out = tmp_path / "out"
    assert cli.main(["cohort", str(root), "--target", "B30f", "--output", str(out), "--model", str(model),
                     "--dry-run"]) == 0
    assert not out.exists()  # the dry run writes nothing
    plan = capsys.readouterr().out
    assert f"run   p1/ct [{uids['p1']}]: 3 slices" in plan and "-> p1/ct" in plan
    assert f"skip  two [{uids['scout']}]: localizer / scout image" in plan
    assert "3 to harmonize" in plan and "4 skipped" in plan

    run = run_cohort(root, out, "B30f", model_path=model, device="cpu")
    assert digest(root) == before  # the input is byte-identical (and untouched) afterwards
    manifest = by_uid(rows(out / "manifest.csv"))
    assert len(manifest) == 7 and run.ran == 3
    for key in ("std", "bone", "p1"):
        assert manifest[uids[key]]["status"] == "done", manifest[uids[key]]
    # The NIfTI carries no kernel tag: skipped with the reason and the fix.
    assert manifest["p3/vol.nii.gz"]["status"] == "skipped"
    assert "--source" in manifest["p3/vol.nii.gz"]["reason"]
    assert "localizer" in manifest[uids["scout"]]["reason"]
    assert manifest[uids["bone"]]["source_domain"] == "BONE"

    # Mirrored tree: a folder with one series keeps its path; two series in one folder get one each.
    assert manifest[uids["p1"]]["output_path"] == "p1/ct"
    std_out = out / manifest[uids["std"]]["output_path"]
    assert std_out.parent == out / "two" and std_out != out / manifest[uids["bone"]]["output_path"]
    result = read_volume(out / "p1" / "ct")
    header = pydicom.dcmread(sorted((out / "p1" / "ct").glob("*.dcm"))[0])
    assert result.shape == (3, 128, 128) and header.ImageType[0] == "DERIVED"
    assert header.SeriesDescription.startswith("Harmonized by ctharmonize to B30f")
    assert header.SeriesInstanceUID != uids["p1"]
    assert manifest[uids["p1"]]["input_checksum"].startswith("sha256:")
    report = (out / "report.md").read_text()
    assert "done 3" in report and "skipped 4" in report and "localizer / scout image" in report

    # --source names the kernel of untagged series; a re-run only does what is new.
    stamp = (out / "p1" / "ct" / "0001.dcm").stat().st_mtime_ns
    again = run_cohort(root, out, "B30f", model_path=model, device="cpu", source="STANDARD")
    assert again.ran == 1 and (out / "p3" / "vol.nii.gz").is_file()
    assert (out / "p1" / "ct" / "0001.dcm").stat().st_mtime_ns == stamp
    assert all(r["status"] in ("done", "skipped") for r in again.rows) and again.count("done") == 4
    assert digest(root) == before


def test_refuses_an_output_inside_the_input(tree, model, capsys):
    root, _ = tree
    assert cli.main(["cohort", str(root), "--target", "B30f", "--output", str(root / "out"),
                     "--model", str(model)]) == 2
    assert "must not contain" in capsys.readouterr().err and not (root / "out").exists()
    assert cli.main(["cohort", str(root), "--output", str(root.parent / "o")]) == 2  # no --target


def test_a_failing_series_does_not_stop_the_run(tree, model, tmp_path, monkeypatch):
    root, uids = tree
    broken = sorted((root / "p1" / "ct").glob("*.dcm"))[1]
    broken.write_bytes(broken.read_bytes()[:-3000])  # pixel data cut short: the reader fails
    out = tmp_path / "out"
    run = run_cohort(root, out, "B30f", model_path=model, device="cpu", source="STANDARD")
    manifest = by_uid(run.rows)
    assert manifest[uids["p1"]]["status"] == "failed" and manifest[uids["p1"]]["reason"]
    assert manifest[uids["p1"]]["input_checksum"]
    assert [manifest[uids[k]]["status"] for k in ("std", "bone")] == ["done", "done"]
    assert manifest["p3/vol.nii.gz"]["status"] == "done"
    assert not (out / "p1").exists() and not temporaries(out)
    assert "## Failures (1)" in (out / "report.md").read_text()

    # A re-run keeps the failure (nothing redone); --retry-failed tries it again.
    assert run_cohort(root, out, "B30f", model_path=model, device="cpu", source="STANDARD").ran == 0
    retry = run_cohort(root, out, "B30f", model_path=model, device="cpu", source="STANDARD",
                       retry_failed=True)
    assert retry.ran == 1 and by_uid(retry.rows)[uids["p1"]]["status"] == "failed"
    # Through the command line: exit code 1 when series failed.
    assert cli.main(["cohort", str(root), "--target", "B30f", "--output", str(out), "--model", str(model),
                     "--source", "STANDARD", "--device", "cpu"]) == 1


def test_shards_cover_each_series_exactly_once_and_merge(tree, model, tmp_path):
    root, _ = tree
    # The hash is fixed (not Python's per-process hash()), so every machine of a cluster agrees.
    assert [shard_of("1.2.3.4", n) for n in (1, 2, 3, 8)] == [1, 2, 2, 4]
    assert [shard_of("2.25.2", n) for n in (1, 2, 3, 8)] == [1, 1, 3, 3]
    out = tmp_path / "out"
    shard_rows = []
    for k in (1, 2, 3):
        run = run_cohort(root, out, "B30f", model_path=model, device="cpu", source="STANDARD", shard=(k, 3))
        assert run.manifest == out / f"manifest.shard-{k}-of-3.csv"
        shard_rows.append({(r["path"], r["series_uid"]) for r in run.rows})
    everything = {(s.path, s.series_uid) for s in discover(root).series}
    assert sum(len(s) for s in shard_rows) == len(everything) == 7
    assert set().union(*shard_rows) == everything
    assert cli.main(["cohort", "--merge", str(out)]) == 0
    merged = rows(out / "manifest.csv")
    assert len(merged) == 7 and {(r["path"], r["series_uid"]) for r in merged} == everything
    assert "merged from" in (out / "report.md").read_text()
    # A re-run without shards finds everything done.
    assert run_cohort(root, out, "B30f", model_path=model, device="cpu", source="STANDARD").ran == 0

    (out / "manifest.shard-2-of-3.csv").unlink()
    with pytest.raises(InputError, match="shard"):
        merge(out)
    assert cohort.main(["merge", str(out)]) == 2  # python -m TextureStarGANCore.cohort merge OUTPUT_ROOT


def test_one_worker_per_gpu_each_sees_its_own(monkeypatch):
    """Worker slots: CPU workers as asked; on CUDA one per visible GPU (CUDA_VISIBLE_DEVICES per worker)."""
    import torch

    from TextureStarGANCore import inference

    assert worker_slots("cpu", 2) == [("cpu", None), ("cpu", None)]
    monkeypatch.setattr(inference, "resolve_device", lambda device: torch.device(device))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert worker_slots("cuda", None) == [("cuda", "0"), ("cuda", "1"), ("cuda", "2")]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert worker_slots("cuda", None) == [("cuda", "4"), ("cuda", "6")]
    assert worker_slots("cuda", 3) == [("cuda", "4"), ("cuda", "6"), ("cuda", "4")]
    assert worker_slots("cuda:1", None) == [("cuda", "6")]


_SIGNALLED_RUN = """
import csv, os, signal, sys
from pathlib import Path
signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal: a shell's background job has
# SIGINT ignored from its start, and Python then keeps ignoring it
from TextureStarGANCore import cli
from TextureStarGANCore.inference import Harmonizer
real, sent = Harmonizer.harmonize, []
manifest = Path(sys.argv[sys.argv.index("--output") + 1]) / "manifest.csv"
def signal_once_a_series_is_done(self, *a, **k):
    if not sent:  # one signal, as a user's single Ctrl-C (a second one means "stop now")
        with open(manifest, newline="") as fh:  # the stop comes as a later series starts
            if any(r["status"] == "done" for r in csv.DictReader(fh)):
                sent.append(1)
                os.kill(os.getpid(), int(os.environ["CTH_TEST_SIGNAL"]))
    return real(self, *a, **k)
Harmonizer.harmonize = signal_once_a_series_is_done
sys.exit(cli.main(sys.argv[1:]))
"""


def interrupted_run(root: Path, out: Path, model: Path, sig: int) -> int:
    """Run the cohort command in a child process that gets ``sig`` once a series is done. The child sends it
    to itself as the next series starts, so the moment does not depend on a parent's polling."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(cli.__file__).parents[1]),
           "CTH_TEST_SIGNAL": str(int(sig))}
    args = ["cohort", str(root), "--target", "B30f", "--output", str(out), "--model", str(model),
            "--device", "cpu"]
    proc = subprocess.Popen([sys.executable, "-c", _SIGNALLED_RUN, *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return proc.wait(180)
    finally:
        if proc.poll() is None:
            proc.kill()


def small_cohort(root: Path, n: int = 6) -> Path:
    for k in range(n):
        make_series(root / f"p{k}" / "ct", 2, seed=k)
    return root


@pytest.mark.slow  # a child process (torch import): ~12 s on a quiet machine, 35 s under load
def test_resume_after_a_crash_redoes_nothing_and_loses_nothing(model, tmp_path):
    root, out = small_cohort(tmp_path / "in"), tmp_path / "out"
    before = digest(root)
    interrupted_run(root, out, model, signal.SIGKILL)  # a crash: no clean-up at all
    crashed = rows(out / "manifest.csv")
    done = {r["series_uid"]: r for r in crashed if r["status"] == "done"}
    assert 1 <= len(done) < 6, "the crash must come mid-cohort"
    assert {r["status"] for r in crashed} <= {"done", "pending"}
    stamps = {}
    for uid, r in done.items():  # everything recorded as done is complete on disk
        assert read_volume(out / r["output_path"]).shape == (2, 128, 128)
        stamps[uid] = [p.stat().st_mtime_ns for p in sorted((out / r["output_path"]).iterdir())]

    run = run_cohort(root, out, "B30f", model_path=model, device="cpu")
    assert run.ran == 6 - len(done) and run.count("done") == 6  # nothing lost
    for uid, r in done.items():  # nothing redone
        assert [p.stat().st_mtime_ns for p in sorted((out / r["output_path"]).iterdir())] == stamps[uid]
    assert not temporaries(out) and digest(root) == before


def test_leftovers_of_a_crashed_write_are_removed_and_nothing_else(model, tmp_path):
    root, out = small_cohort(tmp_path / "in", 2), tmp_path / "out"
    (out / "p0").mkdir(parents=True)
    mine = [out / "p0" / f".ct{TEMP_MARKER}1a2b3c4d", out / "p0" / ".ct.old-1a2b3c4d"]
    for p in mine:
        p.mkdir()
        (p / "0001.dcm").write_bytes(b"half a file")
    other = out / "p0" / f".other{TEMP_MARKER}1a2b3c4d.nii.gz"  # not this run's output (another shard's)
    other.write_bytes(b"in flight elsewhere")
    run = run_cohort(root, out, "B30f", model_path=model, device="cpu")
    assert run.count("done") == 2 and not any(p.exists() for p in mine) and other.exists()


@pytest.mark.slow  # as above
def test_ctrl_c_finishes_cleanly_and_a_rerun_completes(model, tmp_path):
    root, out = small_cohort(tmp_path / "in", 5), tmp_path / "out"
    assert interrupted_run(root, out, model, signal.SIGINT) == 130
    stopped = rows(out / "manifest.csv")
    assert {r["status"] for r in stopped} == {"done", "pending"}  # nothing marked failed by the stop
    assert not temporaries(out) and "CANCELLED" in (out / "report.md").read_text()
    done = sum(r["status"] == "done" for r in stopped)
    assert run_cohort(root, out, "B30f", model_path=model, device="cpu").ran == 5 - done


@pytest.mark.slow
def test_two_worker_processes_give_the_one_worker_result(tree, model, tmp_path):
    root, uids = tree
    one, two = tmp_path / "one", tmp_path / "two"
    run_cohort(root, one, "B30f", model_path=model, device="cpu", source="STANDARD", workers=1)
    run = run_cohort(root, two, "B30f", model_path=model, device="cpu", source="STANDARD", workers=2)
    assert run.count("done") == 4 and run.count("failed") == 0
    for r in run.rows:
        if r["status"] == "done":
            a, b = read_volume(one / r["output_path"]), read_volume(two / r["output_path"])
            assert (a.hu == b.hu).all(), r["path"]


def test_a_series_of_an_unknown_kernel_takes_its_family_after_the_users_source():
    """For a kernel-transfer model (``family=True``); the user's --source wins over the family."""
    from types import SimpleNamespace

    from TextureStarGANCore.cohort import _source
    from TextureStarGANCore.domains import DEFAULT_SIMULATED_DOMAINS

    doms = list(DEFAULT_SIMULATED_DOMAINS)  # B30f (Siemens), BONE and STANDARD (GE)
    series = SimpleNamespace(manufacturer="GE MEDICAL SYSTEMS", scanner_model="Revolution", kernel="BONEPLUS",
                             scanner="GE MEDICAL SYSTEMS Revolution")
    domain, note = _source(series, doms, None, family=True)
    assert domain.name == "BONE" and "kernel family of 'BONEPLUS'" in note
    assert _source(series, doms, doms[2], family=True) == (doms[2], "source kernel from --source")
    assert _source(series, doms, None)[0] is None  # a StarGAN model: its output does not use the source
    canon = SimpleNamespace(manufacturer="CANON_MEC", scanner_model="Aquilion", kernel="FC13",
                            scanner="CANON_MEC Aquilion")
    domain, why = _source(canon, doms, None, family=True)
    assert domain is None and "--source" in why
