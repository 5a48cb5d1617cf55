"""The YAML presets in configs/: valid job configs, and Beam options that Beam itself accepts.

The Dataflow presets are parsed into PipelineOptions and run through Beam's own
PipelineOptionsValidator with a DataflowRunner instance, the checks `DataflowRunner.run_pipeline`
makes before it submits. Nothing is submitted: sockets are closed for the test, and the two
validator steps that may call GCS (soft-delete check, default-bucket creation) are stubbed.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import apache_beam as beam
import pytest
import yaml
from apache_beam.options.pipeline_options import (
    DebugOptions,
    DirectOptions,
    GoogleCloudOptions,
    PipelineOptions,
    SetupOptions,
    StandardOptions,
    WorkerOptions,
)

from pipeline.cli import build_config
from pipeline.config import JobConfig, load_preset

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))
DATAFLOW = {
    "dataflow-gpu.yaml": ("worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver",
                          "g2-standard-8"),
    "dataflow-tpu.yaml": ("worker_accelerator=type:tpu-v5-lite-podslice;topology:1x1",
                          "ct5lp-hightpu-1t"),
}


def test_the_presets_the_design_asks_for_exist():
    names = {p.name for p in PRESETS}
    assert {"local-cpu.yaml", "gpu-worker.yaml", "tpu-worker.yaml", *DATAFLOW} <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
@pytest.mark.parametrize("mode", ["score", "generate"])
def test_every_preset_makes_a_valid_job_config(path, mode):
    job, beam_args = load_preset(path)
    config = build_config(mode, {"input": "in.jsonl", "output": "out"}, job)
    assert isinstance(config, JobConfig) and config.mode == mode
    assert beam_args, "every preset chooses its runner"


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_beam_knows_every_option_of_every_preset(path):
    """A misspelt Beam option would be dropped by Beam with only a log warning."""
    _, beam_args = load_preset(path)
    section = yaml.safe_load(path.read_text())["beam"]
    known = PipelineOptions(beam_args).get_all_options(retain_unknown_options=False)
    assert set(section) <= set(known), set(section) - set(known)


@pytest.mark.parametrize("name", ["local-cpu.yaml", "gpu-worker.yaml", "tpu-worker.yaml"])
def test_single_machine_presets_use_one_in_process_worker(name):
    options = PipelineOptions(load_preset(ROOT / "configs" / name)[1])
    assert options.view_as(StandardOptions).runner == "DirectRunner"
    direct = options.view_as(DirectOptions)
    assert (direct.direct_running_mode, direct.direct_num_workers) == ("in_memory", 1)


@pytest.fixture
def offline(monkeypatch):
    """No socket may connect, and the validator's GCS calls are stubbed out."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access during an offline check: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(GoogleCloudOptions, "_warn_if_soft_delete_policy_enabled",
                        lambda self, arg_name: None)
    monkeypatch.setattr(GoogleCloudOptions, "_create_default_gcs_bucket", lambda self: None)


@pytest.mark.parametrize("name", sorted(DATAFLOW))
def test_dataflow_presets_build_valid_options(name, offline):
    from apache_beam.options.pipeline_options_validator import PipelineOptionsValidator
    from apache_beam.runners.dataflow.dataflow_runner import DataflowRunner

    accelerator, machine_type = DATAFLOW[name]
    _, beam_args = load_preset(ROOT / "configs" / name)
    options = PipelineOptions(beam_args)

    assert options.view_as(StandardOptions).runner == "DataflowRunner"
    cloud = options.view_as(GoogleCloudOptions)
    assert cloud.project == "your-gcp-project"
    assert cloud.region and cloud.temp_location.startswith("gs://")
    assert cloud.dataflow_service_options == [accelerator]
    worker = options.view_as(WorkerOptions)
    assert worker.machine_type == machine_type
    assert re.fullmatch(r"[a-z0-9-]+-docker\.pkg\.dev/your-gcp-project/[\w-]+/gpt2-pipeline:\w+",
                        worker.sdk_container_image)
    setup = options.view_as(SetupOptions)
    assert setup.setup_file == "./setup.py" and (ROOT / "setup.py").is_file()
    debug = options.view_as(DebugOptions)
    assert debug.experiments == ["no_use_multiple_sdk_containers"]
    assert debug.number_of_worker_harness_threads == 1

    validator = PipelineOptionsValidator(options, DataflowRunner())
    assert validator.is_service_runner()  # so the Dataflow-only checks below do run
    assert validator.validate() == []


def test_the_validator_does_catch_bad_values(offline):
    """The check above is not vacuous: Beam rejects what Dataflow would."""
    from apache_beam.options.pipeline_options_validator import PipelineOptionsValidator
    from apache_beam.runners.dataflow.dataflow_runner import DataflowRunner

    _, beam_args = load_preset(ROOT / "configs" / "dataflow-gpu.yaml")
    bad = PipelineOptions([*beam_args, "--project=YOUR_PROJECT",
                           "--temp_location=gs://YOUR_BUCKET/tmp",
                           "--staging_location=gs://YOUR_BUCKET/staging"])
    errors = PipelineOptionsValidator(bad, DataflowRunner()).validate()
    assert any("Project ID" in e for e in errors) and any("GCS bucket" in e for e in errors)


def test_dockerfile_matches_the_launcher():
    """Dataflow needs the worker's Beam and Python versions to equal the launcher's."""
    text = (ROOT / "Dockerfile").read_text()
    version = re.search(r"^ARG BEAM_VERSION=(\S+)$", text, re.M).group(1)
    assert version == beam.__version__
    assert "FROM apache/beam_python3.11_sdk:${BEAM_VERSION}" in text
    setup = (ROOT / "setup.py").read_text()
    assert 'python_requires=">=3.11"' in setup and "apache-beam>=2.77,<2.78" in setup
    assert re.search(r'^ARG JAX_EXTRA=cuda12$', text, re.M)
    assert "XLA_PYTHON_CLIENT_PREALLOCATE" in text


def test_presets_are_package_data_found_by_name_after_a_plain_install(tmp_path):
    """`--config local-cpu` must work from a wheel install, where no repo checkout exists."""
    import subprocess
    import sys
    import zipfile

    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(wheels), str(ROOT)], check=True,
                   capture_output=True, timeout=300)
    (wheel,) = wheels.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"pipeline/configs/{p.name}" for p in PRESETS} <= names
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)  # what `pip install` puts in site-packages
    probe = ("import pipeline, pipeline.config as c; "
             "print(pipeline.__file__); print(c.resolve_preset('local-cpu'))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, check=True, text=True,
                         capture_output=True, env={"PYTHONPATH": str(site), "PATH": ""},
                         timeout=120).stdout.split()
    assert out[0].startswith(str(site))  # the installed copy, not this checkout
    assert out[1] == str(site / "pipeline" / "configs" / "local-cpu.yaml")
    job, beam_args = load_preset(out[1])
    assert job["dtype"] == "float32" and "--runner=DirectRunner" in beam_args
