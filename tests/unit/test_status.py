import kopf

from kiln_operator import status


def test_write_records_generation_and_merges_conditions():
    body = kopf.Body(
        {
            "metadata": {"name": "x", "generation": 4},
            "status": {"conditions": [{"type": "Other", "status": "True", "reason": "R", "message": ""}]},
        }
    )
    patch = kopf.Patch()
    status.write(body, patch, status.placeholder("TrainingJob"))
    assert patch["status"]["observedGeneration"] == 4
    types = [c["type"] for c in patch["status"]["conditions"]]
    assert types == ["Other", "Ready"]
    ready = patch["status"]["conditions"][1]
    assert ready["status"] == "Unknown"
    assert ready["reason"] == "ControllerNotImplemented"
    assert ready["observedGeneration"] == 4
    assert "TrainingJob" in ready["message"]
