"""perceptual.weights: where each metric's files are looked for, and that a missing one is named exactly.

The audit tests (tests/pipeline/restore/test_audit_metrics.py) run the networks from these files end to end;
these check the lookup rule alone: torch hub's checkpoint directory, any of the accepted names, or
the path in the metric's environment variable, which then is the only place looked at.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from perceptual import PERCEPTUAL_METRICS, checkpoint_dir, find_weights, weight_files

ENV_VARS = ("RDEIC_ALEXNET_WEIGHTS", "RDEIC_LPIPS_LIN_WEIGHTS", "RDEIC_VGG16_WEIGHTS", "RDEIC_DISTS_WEIGHTS",
            "RDEIC_FID_INCEPTION_WEIGHTS")


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for env in ENV_VARS:
        monkeypatch.delenv(env, raising=False)
    ckpt = tmp_path / "torch" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    return ckpt


def test_an_empty_hub_names_every_file_of_every_metric(hub: Path) -> None:
    assert checkpoint_dir() == hub
    status = find_weights()
    assert tuple(status) == PERCEPTUAL_METRICS
    for metric, files in weight_files().items():
        st = status[metric]
        assert not st.available and st.found == ()
        assert len(st.missing) == len(files)
        for wf, text in zip(files, st.missing):
            assert all(str(hub / n) in text for n in wf.names) and f"${wf.env}" in text
        assert st.to_dict() == {"available": False, "found": [], "missing": list(st.missing)}


def test_any_accepted_name_is_found_and_an_env_path_replaces_the_hub(hub: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    (hub / "vgg16-397923af.pth").write_bytes(b"x")
    (hub / "DISTS_weights.pt").write_bytes(b"x")  # the second accepted name
    st = find_weights(["dists"])["dists"]
    assert st.available and st.found == (str(hub / "vgg16-397923af.pth"), str(hub / "DISTS_weights.pt"))

    elsewhere = tmp_path / "mine.pt"
    monkeypatch.setenv("RDEIC_DISTS_WEIGHTS", str(elsewhere))  # not there yet: the hub copy is not used
    st = find_weights(["dists"])["dists"]
    assert not st.available and len(st.missing) == 1
    assert str(elsewhere) in st.missing[0] and "$RDEIC_DISTS_WEIGHTS" in st.missing[0]
    elsewhere.write_bytes(b"x")
    assert find_weights(["dists"])["dists"].found[1] == str(elsewhere)
