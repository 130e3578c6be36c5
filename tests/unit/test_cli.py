import pytest

from kiln_operator.__main__ import parse


def test_cluster_wide():
    argv, env = parse(["-A", "--metrics", "127.0.0.1:9999"])
    assert argv[:4] == ["run", "--standalone", "-m", "kiln_operator.startup"]
    assert "-A" in argv
    assert "--liveness=http://0.0.0.0:8080/healthz" in argv
    assert env == {"KILN_METRICS_ADDRESS": "127.0.0.1:9999"}


def test_namespaced_is_repeatable():
    argv, _ = parse(["-n", "team-a", "--namespace", "team-b", "--verbose"])
    assert [a for a in argv if a.startswith("--namespace=")] == ["--namespace=team-a", "--namespace=team-b"]
    assert "-A" not in argv
    assert "--verbose" in argv


@pytest.mark.parametrize("argv", [[], ["-A", "-n", "x"]])
def test_scope_must_be_chosen_once(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2
    assert "namespace" in capsys.readouterr().err
