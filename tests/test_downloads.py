"""One download policy (ldm/utils/downloads.py): LDM_OFFLINE or HF_HUB_OFFLINE stops every weight download
at once, with the file to place; every loader of pretrained weights asks the same function."""
import pytest

from ldm.models import autoencoder_loss
from ldm.utils.downloads import download_blocker, downloads_allowed, offline_reason


@pytest.mark.parametrize("variable", ["LDM_OFFLINE", "HF_HUB_OFFLINE"])
@pytest.mark.parametrize("value, offline", [("1", True), ("true", True), ("ON", True), ("0", False), ("", False)])
def test_either_variable_declares_offline(monkeypatch, variable, value, offline):
    monkeypatch.delenv("LDM_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv(variable, value)
    assert downloads_allowed() is not offline
    assert (offline_reason() == f"offline: {variable} is set") if offline else offline_reason() is None


def test_an_unresolvable_host_blocks_without_a_request(monkeypatch):
    for name in ("LDM_OFFLINE", "HF_HUB_OFFLINE", "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert download_blocker("https://no-such-host.invalid/weights.pt") == "the host no-such-host.invalid does not resolve"


def test_lpips_vgg_weights_follow_ldm_offline(monkeypatch, tmp_path):
    """Before the single policy, the LPIPS loader read HF_HUB_OFFLINE only and tried to download under LDM_OFFLINE."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("LDM_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted although LDM_OFFLINE is set")

    monkeypatch.setattr(autoencoder_loss.torch.hub, "download_url_to_file", no_download)
    with pytest.raises(FileNotFoundError, match=r"LDM_OFFLINE is set.*vgg16-397923af\.pth"):
        autoencoder_loss.ensure_vgg16_weights()
