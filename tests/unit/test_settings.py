"""The operator's explicit login: kopf's own fallback is decided at import time, which broke in-process runs."""

import kopf

from kiln_operator import settings


def test_login_uses_kubeconfig_when_one_is_given(monkeypatch, tmp_path):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "config"))
    monkeypatch.setattr(kopf, "login_with_kubeconfig", lambda **_: "from-kubeconfig")
    monkeypatch.setattr(kopf, "login_with_service_account", lambda **_: "from-service-account")
    assert settings.login(settings=kopf.OperatorSettings()) == "from-kubeconfig"


def test_login_falls_back_to_the_service_account_in_a_pod(monkeypatch, tmp_path):
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kube/config there
    monkeypatch.setattr(kopf, "login_with_kubeconfig", lambda **_: "from-kubeconfig")
    monkeypatch.setattr(kopf, "login_with_service_account", lambda **_: "from-service-account")
    assert settings.login(settings=kopf.OperatorSettings()) == "from-service-account"
