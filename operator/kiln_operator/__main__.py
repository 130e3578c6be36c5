"""`kiln-operator`: runs `kopf run` on this package with Kiln's flags (scope, liveness, metrics)."""

import argparse
import os
import sys

from kiln_operator.config import DEFAULT_METRICS_ADDRESS, METRICS_ADDRESS_ENV


def parse(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Translate kiln-operator's flags into kopf's argv and the environment the startup handler reads."""
    p = argparse.ArgumentParser(prog="kiln-operator", description="Run the Kiln operator.")
    scope = p.add_mutually_exclusive_group(required=True)
    scope.add_argument("-n", "--namespace", action="append", help="watch this namespace (repeatable, globs ok)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    p.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="liveness endpoint URL")
    p.add_argument(
        "--metrics",
        help=f"Prometheus endpoint HOST:PORT (default: ${METRICS_ADDRESS_ENV} or {DEFAULT_METRICS_ADDRESS})",
    )
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--log-format", choices=["plain", "full", "json"], default="full")
    a = p.parse_args(argv)
    # Standalone: one replica with strategy Recreate; kopf's peering would need extra CRDs and RBAC.
    kopf_argv = [
        "run",
        "--standalone",
        "-m",
        "kiln_operator.startup",
        f"--liveness={a.liveness}",
        f"--log-format={a.log_format}",
    ]
    kopf_argv += ["-A"] if a.all_namespaces else [f"--namespace={ns}" for ns in a.namespace]
    if a.verbose:
        kopf_argv.append("--verbose")
    return kopf_argv, ({METRICS_ADDRESS_ENV: a.metrics} if a.metrics else {})


def main(argv: list[str] | None = None) -> None:
    from kopf.cli import main as kopf_cli

    kopf_argv, env = parse(sys.argv[1:] if argv is None else argv)
    os.environ.update(env)
    kopf_cli.main(args=kopf_argv, prog_name="kiln-operator")


if __name__ == "__main__":
    main()
