from types import SimpleNamespace

import pytest

from scanomaly.detector import available_methods, config_from_dict, ensure_cpu_bf16, get_method
from scanomaly.errors import ScanomalyError
from scanomaly.methods.healthygan import HealthyGANConfig


def test_registry_lists_methods_and_rejects_unknown():
    assert "healthygan" in available_methods()
    with pytest.raises(ScanomalyError, match="unknown method"):
        get_method("nope")


def test_profiles_and_overrides():
    cls = get_method("healthygan")
    det = cls.from_profile("tiny", {"iterations": 7}, {"image_size": 64})
    assert det.config.iterations == 7 and det.config.width == 8 and det.preprocessing.image_size == 64
    with pytest.raises(ScanomalyError, match="unknown profile"):
        cls.from_profile("huge")
    with pytest.raises(ScanomalyError, match="unknown HealthyGANConfig option"):
        cls.from_profile("tiny", {"no_such_option": 1})
    with pytest.raises(ScanomalyError, match="precision"):
        cls.from_profile("tiny", precision="fp8")


def test_config_from_json_restores_tuples():
    cfg = config_from_dict(HealthyGANConfig, {"betas": [0.5, 0.9]})
    assert cfg.betas == (0.5, 0.9)


def test_bf16_probe_caps_onednn_when_the_probe_crashes(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "recorded")  # so that monkeypatch restores the original at teardown
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    crashed = lambda *a, **k: SimpleNamespace(returncode=-4)  # SIGILL  # noqa: E731
    with pytest.warns(UserWarning, match="AMX"):
        assert ensure_cpu_bf16(run=crashed) is True
    import os

    assert os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX512_CORE_BF16"
    # already capped: no second probe
    assert ensure_cpu_bf16(run=lambda *a, **k: pytest.fail("probed twice")) is False


def test_bf16_probe_leaves_working_cpus_alone(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "recorded")  # so that monkeypatch restores the original at teardown
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert ensure_cpu_bf16(run=lambda *a, **k: SimpleNamespace(returncode=0)) is False
    import os

    assert "ONEDNN_MAX_CPU_ISA" not in os.environ


def test_float16_precision_on_cpu_is_refused_with_a_clear_message(capsys, tmp_path):
    from scanomaly import get_method
    from scanomaly.cli import main
    from scanomaly.errors import ScanomalyError

    with pytest.raises(ScanomalyError, match="16-mixed needs a CUDA device"):
        get_method("healthygan").from_profile("tiny", device="cpu", precision="16-mixed")
    code = main(["train", "ganomaly", "--healthy", str(tmp_path), "--out", str(tmp_path / "run"),
                 "--device", "cpu", "--precision", "16-mixed"])
    assert code == 2 and "16-mixed needs a CUDA device" in capsys.readouterr().err
