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


def test_gan_methods_configure_the_loop_with_their_own_config(monkeypatch):
    # the loop's settings are fields of each GAN method's config (LoopConfig), read by the trainer from that very
    # object: there is no copy by matching names in which a misspelt field would silently keep its default
    from scanomaly.training import loop

    gan_methods = [m for m in available_methods() if get_method(m).distributed_training]
    assert {"healthygan", "anogan", "fanogan", "ganomaly", "alad", "alocc"} <= set(gan_methods)
    for m in gan_methods:
        assert issubclass(get_method(m).Config, loop.LoopConfig), m
    seen = []
    original = loop.GANTrainer.__init__
    monkeypatch.setattr(loop.GANTrainer, "__init__", lambda self, task, sets, config, *a, **k: (
        seen.append(config), original(self, task, sets, config, *a, **k))[1])
    from conftest import blobs

    det = get_method("ganomaly").from_profile("tiny", {"iterations": 3, "checkpoint_every": 3, "hflip": True})
    det.fit(blobs(8), progress=False)
    assert seen == [det.config] and det.train_result.steps == 3
    with pytest.raises(TypeError, match="LoopConfig"):
        loop.GANTrainer(det.task, {"x": blobs(4)}, {"iterations": 3})


def test_retired_options_load_at_the_value_the_code_now_has():
    # a model.json written before mask_offset / upsample / critic_final_size / frame_jitter / critic_augment /
    # nearest_neighbourhood were removed
    old = {"mask_offset": 0.0, "upsample": "transposed", "critic_final_size": 4, "frame_jitter": 0.0, "critic_augment": "",
           "nearest_neighbourhood": 1, "width": 8}
    assert config_from_dict(HealthyGANConfig, old).width == 8
    with pytest.raises(ScanomalyError, match="mask_offset=-1.0 is no longer supported"):
        config_from_dict(HealthyGANConfig, {**old, "mask_offset": -1.0})
    with pytest.raises(ScanomalyError, match="critic_augment='translation,cutout' is no longer supported"):
        config_from_dict(HealthyGANConfig, {**old, "critic_augment": "translation,cutout"})
    with pytest.raises(ScanomalyError, match="nearest_neighbourhood=3 is no longer supported"):
        config_from_dict(HealthyGANConfig, {**old, "nearest_neighbourhood": 3})
    with pytest.raises(ScanomalyError, match="unknown HealthyGANConfig option"):
        config_from_dict(HealthyGANConfig, {"checkpoint_evry": 10})  # a misspelt loop option is an error
