"""``trainer.precision: auto`` by the CPU's capability, threads for small machines, and the record of both.

Each branch is driven by injected ``/proc/cpuinfo`` text (and torch capability), not only by this machine's
CPU: an AVX2-only AMD EPYC (bf16 emulated, 15x slower: fp32), a Sapphire-Rapids-class Xeon (AVX512-BF16 and
AMX: bf16), AMX alone, no cpuinfo at all (the timed probe decides), and bf16 flags under a torch capped to
AVX2 (the probe decides). The probe itself is checked for real, with oneDNN and ATen capped to AVX2.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from tiny_shards import write_tiny_shards
from train_helpers import TINY_OVERRIDES

from modality.paths import CONFIG_DIR
from modality.training import hardware, job

# First processor blocks as the kernel writes them (flags shortened to the relevant and a few common ones).
EPYC_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 23
model\t\t: 49
model name\t: AMD EPYC 7B12
flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma bmi1 avx2 bmi2 sha_ni clzero xsaveerptr

processor\t: 1
model name\t: AMD EPYC 7B12
flags\t\t: fpu avx2 avx512_bf16
"""
SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""
AMX_ONLY = """processor\t: 0
model name\t: Some Xeon
flags\t\t: fpu avx2 avx512f amx_tile amx_bf16
"""
GRAVITON3 = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid sve bf16 i8mm
CPU implementer\t: 0x41
"""


def no_probe() -> float:
    raise AssertionError("the flags decide here; the probe must not run")


@pytest.fixture()
def cpu(monkeypatch: pytest.MonkeyPatch):
    """Set the CPU a test sees: ``cpu(cpuinfo_text_or_None, capability)``."""

    def set_cpu(cpuinfo: str | None, capability: str = "AVX512", probe=no_probe) -> None:
        monkeypatch.setattr(hardware, "read_cpuinfo", lambda: cpuinfo)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.setattr(hardware, "bf16_matmul_probe", probe)

    return set_cpu


def test_cpuinfo_is_read_from_the_first_processor_block() -> None:
    assert hardware.parse_cpuinfo(EPYC_AVX2) == (
        "AMD EPYC 7B12",
        {
            "fpu",
            "vme",
            "sse",
            "sse2",
            "ssse3",
            "sse4_1",
            "sse4_2",
            "avx",
            "f16c",
            "fma",
            "bmi1",
            "avx2",
            "bmi2",
        }
        | {"sha_ni", "clzero", "xsaveerptr"},
    )
    model, flags = hardware.parse_cpuinfo(GRAVITON3)
    assert model is None and "bf16" in flags


def test_avx2_only_cpu_trains_in_fp32(cpu) -> None:
    cpu(EPYC_AVX2, "AVX2")
    described = hardware.describe_cpu()
    assert described.model == "AMD EPYC 7B12" and described.bf16_flags == [] and described.flags_known
    precision, reason = hardware.choose_cpu_precision(described)
    assert precision == "32-true"
    assert "no native bf16" in reason and "AVX2" in reason


@pytest.mark.parametrize(
    ("cpuinfo", "found"), [(SAPPHIRE_RAPIDS, "amx_bf16, avx512_bf16"), (AMX_ONLY, "amx_bf16")]
)
def test_native_bf16_cpu_trains_in_bf16(cpu, cpuinfo: str, found: str) -> None:
    cpu(cpuinfo, "AVX512")
    precision, reason = hardware.choose_cpu_precision(hardware.describe_cpu())
    assert precision == "bf16-mixed" and found in reason


def test_arm_bf16_extension_counts_as_native(cpu) -> None:
    cpu(GRAVITON3, "DEFAULT")
    assert hardware.choose_cpu_precision(hardware.describe_cpu())[0] == "bf16-mixed"


@pytest.mark.parametrize(("ratio", "expected"), [(0.25, "bf16-mixed"), (7.0, "32-true")])
def test_without_cpuinfo_the_probe_decides(cpu, ratio: float, expected: str) -> None:
    cpu(None, "AVX2", probe=lambda: ratio)
    described = hardware.describe_cpu()
    assert not described.flags_known
    precision, reason = hardware.choose_cpu_precision(described)
    assert precision == expected and "CPU flags unknown" in reason and f"{ratio:.2f}x" in reason
    assert described.probe_bf16_over_fp32 == ratio  # recorded with the CPU


def test_bf16_flags_under_a_torch_capped_to_avx2_go_to_the_probe(cpu) -> None:
    """Measured: this AMX Xeon with ONEDNN_MAX_CPU_ISA=AVX2 trained resnet18 7x slower in bf16."""
    cpu(SAPPHIRE_RAPIDS, "AVX2", probe=lambda: 78.0)
    precision, reason = hardware.choose_cpu_precision(hardware.describe_cpu())
    assert precision == "32-true" and "torch runs at AVX2" in reason


def run_probe(extra_env: dict[str, str]) -> float:
    env = {k: v for k, v in os.environ.items() if k != hardware.PROBE_ENV} | extra_env
    code = "import torch; torch.set_num_threads(1); from modality.training import hardware as h; print(h.bf16_matmul_probe())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return float(done.stdout.strip().splitlines()[-1])


def test_probe_sees_emulated_bf16_when_kernels_are_capped_to_avx2() -> None:
    # x86 only: the caps are oneDNN/ATen environment variables.
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX"):
        pytest.skip("not an x86 CPU with AVX")
    assert run_probe({"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}) > 1.0


def test_probe_agrees_with_the_flags_of_this_machine() -> None:
    described = hardware.describe_cpu()
    if not described.flags_known:
        pytest.skip("no /proc/cpuinfo here")
    native = hardware.choose_cpu_precision(described)[0] == "bf16-mixed"
    assert (run_probe({}) < 1.0) == native, hardware.cpu_banner()


def test_threads_for_small_machines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert hardware.choose_cpu_threads("auto", processes=1, cores=2)[0] == 1
    assert hardware.choose_cpu_threads("auto", processes=1, cores=1)[0] == 1
    assert hardware.choose_cpu_threads("auto", processes=1, cores=16)[0] is None  # torch's default
    assert hardware.choose_cpu_threads("auto", processes=2, cores=2)[0] is None  # Lightning splits cores
    assert hardware.choose_cpu_threads(3, processes=1, cores=2) == (3, "cpu_threads set in the config")
    with pytest.raises(ValueError, match="cpu_threads"):
        hardware.choose_cpu_threads(0, processes=1, cores=2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    threads, reason = hardware.choose_cpu_threads("auto", processes=1, cores=2)
    assert threads is None and "OMP_NUM_THREADS=2" in reason


@pytest.fixture()
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def compose_tiny(data_dir: Path, output_dir: Path, extra: list[str] = ()):  # type: ignore[assignment]
    overrides = [
        "data=prepared",
        f"data.data_dir={data_dir}",
        *TINY_OVERRIDES,
        f"paths.output_dir={output_dir}",
    ]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=[*overrides, *extra])


def test_resolve_records_the_cpu_choice_and_sets_threads(cpu, keep_threads, tmp_path, monkeypatch) -> None:
    cpu(EPYC_AVX2, "AVX2")
    monkeypatch.setattr(hardware, "usable_cores", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    cfg = compose_tiny(tmp_path, tmp_path / "run")
    record = job.resolve_auto_settings(cfg)
    assert cfg.trainer.precision == "32-true"  # what the Trainer is built with
    assert torch.get_num_threads() == 1
    assert record["precision"] == "32-true" and record["precision_reason"].startswith("auto: no native bf16")
    assert record["cpu_model"] == "AMD EPYC 7B12" and record["cpu_torch_capability"] == "AVX2"
    assert record["cpu_bf16_flags"] == [] and record["torch_threads"] == 1 and record["accelerator"] == "cpu"
    assert job.summary_base(cfg)["compute"] == record


def test_explicit_precision_is_kept(cpu, keep_threads, tmp_path) -> None:
    cpu(EPYC_AVX2, "AVX2")
    cfg = compose_tiny(tmp_path, tmp_path / "run", ["trainer.precision=bf16-mixed", "cpu_threads=2"])
    record = job.resolve_auto_settings(cfg)
    assert (
        cfg.trainer.precision == "bf16-mixed"
        and record["precision_reason"] == "trainer.precision set in the config"
    )
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize(("bf16_gpu", "expected"), [(True, "bf16-mixed"), (False, "16-mixed")])
def test_gpus_as_before(cpu, keep_threads, tmp_path, monkeypatch, bf16_gpu: bool, expected: str) -> None:
    cpu(EPYC_AVX2, "AVX2")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_gpu)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no device name to read here
    cfg = compose_tiny(tmp_path, tmp_path / "run", ["trainer.accelerator=gpu", "data.image_size=auto"])
    record = job.resolve_auto_settings(cfg)
    assert cfg.trainer.precision == expected and record["accelerator"] == "gpu"
    assert cfg.data.image_size is None  # the stored size on GPUs


def read_tensorboard_hparams(tensorboard_dir: Path) -> dict[str, object]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(tensorboard_dir))
    events.Reload()
    values: dict[str, object] = {}
    for content in events.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        for key, value in data.session_start_info.hparams.items():
            values[key] = value.string_value or value.number_value or value.bool_value
    return values


def test_a_run_on_an_avx2_cpu_trains_in_fp32_and_records_why(
    cpu, keep_threads, tmp_path, monkeypatch
) -> None:
    """In-process tiny run with the EPYC's cpuinfo: summary and TensorBoard hparams say fp32 and why."""
    cpu(EPYC_AVX2, "AVX2")
    monkeypatch.setattr(hardware, "usable_cores", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    data_dir = write_tiny_shards(tmp_path / "shards", {"train": [16], "val": [8], "test": [8]})
    run_dir = tmp_path / "run"
    cfg = compose_tiny(
        data_dir,
        run_dir,
        ["trainer.max_epochs=1", "test=false", "validate_best=false", "trainer.num_sanity_val_steps=0"],
    )
    with open_dict(cfg):
        cfg.refit = None
    job.train(cfg)
    summary = job.read_run_summary(run_dir)
    assert summary["status"] == "ok" and summary["precision"] == "32-true"
    compute = summary["compute"]
    assert compute["precision"] == "32-true" and "no native bf16" in compute["precision_reason"]
    assert compute["cpu_model"] == "AMD EPYC 7B12" and compute["torch_threads"] == 1
    hparams = read_tensorboard_hparams(run_dir / "tensorboard")
    assert hparams["compute/precision"] == "32-true"
    assert hparams["compute/cpu_model"] == "AMD EPYC 7B12"
    assert hparams["compute/cpu_torch_capability"] == "AVX2"
    assert "no native bf16" in str(hparams["compute/precision_reason"])
    assert hparams["model"] == "resnet18"
    hparams_yaml = (run_dir / "tensorboard" / "hparams.yaml").read_text()
    assert "compute/precision: 32-true" in hparams_yaml
