"""The operator's explicit login: kopf's own fallback is decided at import time, which broke in-process runs."""

import kopf

from kiln_operator import startup


def test_login_uses_kubeconfig_when_one_is_given(monkeypatch, tmp_path):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "config"))
    monkeypatch.setattr(kopf, "login_with_kubeconfig", lambda **_: "from-kubeconfig")
    monkeypatch.setattr(kopf, "login_with_service_account", lambda **_: "from-service-account")
    assert startup.login(settings=kopf.OperatorSettings()) == "from-kubeconfig"


def test_login_falls_back_to_the_service_account_in_a_pod(monkeypatch, tmp_path):
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kube/config there
    monkeypatch.setattr(kopf, "login_with_kubeconfig", lambda **_: "from-kubeconfig")
    monkeypatch.setattr(kopf, "login_with_service_account", lambda **_: "from-service-account")
    assert startup.login(settings=kopf.OperatorSettings()) == "from-service-account"


def test_no_handler_needs_the_diff_base_that_kiln_does_not_build():
    """NoDiffBase skips kopf's per-event deep copy; an on.create/update/field handler would need it."""
    import kiln_operator.startup  # noqa: F401 - registers every handler

    registry = kopf.get_default_registry()
    assert registry._changing.get_all_handlers() == []
    assert registry._watching.get_all_handlers()  # the handlers are registered: the check above means something


def test_only_the_startup_module_registers_handlers():
    """Importing builders, state machines or controllers (as the tests and benchmarks do) registers nothing;
    importing startup registers each kind's handlers once."""
    import subprocess
    import sys

    code = (
        "import kopf\n"
        "import kiln_operator.builders.trainingjob, kiln_operator.lifecycle.modeldeployment\n"
        "import kiln_operator.controllers.modelcompression, kiln_operator.controller\n"
        "r = kopf.get_default_registry()\n"
        "print(len(r._watching.get_all_handlers()), len(r._indexing.get_all_handlers()))\n"
        "import kiln_operator.startup\n"
        "print(len(r._watching.get_all_handlers()), len(r._indexing.get_all_handlers()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "0 0"
    # Per kind: its objects, its children, its pods; ModelCompression follows TrainingJobs, ModelDeployment
    # both; and an index of children and one of pods per kind.
    assert out[1] == f"{3 * 3 + 1 + 2} {3 * 2}"
