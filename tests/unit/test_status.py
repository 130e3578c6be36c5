from kiln_operator.status import Condition, find, set_condition

READY = Condition("Ready", "True", "Reconciled", "all good")


def test_adds_a_new_condition_with_generation_and_time():
    out = set_condition([], READY, 3, "2026-01-01T00:00:00Z")
    assert out == [
        {
            "type": "Ready",
            "status": "True",
            "reason": "Reconciled",
            "message": "all good",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
            "observedGeneration": 3,
        }
    ]


def test_same_status_keeps_the_transition_time_but_updates_reason_and_generation():
    first = set_condition(None, READY, 1, "2026-01-01T00:00:00Z")
    again = set_condition(first, Condition("Ready", "True", "StillFine", "x"), 2, "2026-01-02T00:00:00Z")
    assert again[0]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert (again[0]["reason"], again[0]["observedGeneration"]) == ("StillFine", 2)


def test_status_change_moves_the_transition_time():
    first = set_condition(None, READY, 1, "2026-01-01T00:00:00Z")
    flipped = set_condition(first, Condition("Ready", "False", "Broken", "no"), 1, "2026-01-03T00:00:00Z")
    assert flipped[0]["status"] == "False"
    assert flipped[0]["lastTransitionTime"] == "2026-01-03T00:00:00Z"


def test_other_conditions_are_kept_in_order():
    base = set_condition(None, Condition("Reconciling", "True", "Working"), 1, "t1")
    out = set_condition(base, READY, 1, "t2")
    assert [c["type"] for c in out] == ["Reconciling", "Ready"]
    assert find(out, "Reconciling") == base[0]
    assert find(out, "Stalled") is None


def test_input_is_not_mutated():
    base = set_condition(None, READY, 1, "t1")
    snapshot = [dict(c) for c in base]
    set_condition(base, Condition("Ready", "False", "Broken"), 2, "t2")
    assert base == snapshot


def test_the_kstatus_trio_says_one_reason_unless_one_condition_has_its_own():
    from kiln_operator.status import kstatus

    trio = kstatus("Failing", "it broke", stalled=True, own={"Reconciling": ("Done", "")})
    assert [(c.type, c.status, c.reason, c.message) for c in trio] == [
        ("Ready", "False", "Failing", "it broke"),
        ("Reconciling", "False", "Done", ""),
        ("Stalled", "True", "Failing", "it broke"),
    ]


def test_conditions_are_stamped_with_the_time_given_not_the_clock():
    from kiln_operator.status import merge_conditions, parse_time, rfc3339

    [c] = merge_conditions(None, [READY], 3, now=86400.0)
    assert c["lastTransitionTime"] == "1970-01-02T00:00:00Z" == rfc3339(86400.0)
    assert c["observedGeneration"] == 3
    assert parse_time("1970-01-02T00:00:00Z") == 86400.0
    assert parse_time("1970-01-02T00:00:00.500000+00:00") == 86400.5
    assert parse_time("yesterday") is None
    assert parse_time(None) is None
