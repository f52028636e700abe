"""The router's deployment table: each alias's strategy, and circuits that put a deployment last."""

from __future__ import annotations

from meshgate.config import DeploymentSettings, ModelSettings
from services.router.deployments import DeploymentTable


def model(strategy: str, *names: str) -> ModelSettings:
    return ModelSettings(
        routing_strategy=strategy,
        deployments=[
            DeploymentSettings(name=name, address=f"127.0.0.1:{5000 + i}") for i, name in enumerate(names)
        ],
    )


async def test_an_open_circuit_puts_a_deployment_last_until_its_probe_succeeds():
    table = DeploymentTable({"m": model("least_outstanding", "a", "b")})
    try:
        a, b = table.candidates("m")
        a.in_flight, b.in_flight = 0, 5
        assert [d.name for d in table.candidates("m")] == ["a", "b"]
        for _ in range(3):
            a.health.record_failure()
        assert [d.name for d in table.candidates("m")] == ["b", "a"]
        assert table.candidates("unknown") == []
    finally:
        await table.close()


async def test_reconfiguring_keeps_what_a_strategy_learned_unless_it_changes():
    table = DeploymentTable({"m": model("kv_cost", "a", "b")})
    try:
        learned = table.strategy("m")
        table.reconfigure({"m": model("kv_cost", "a", "b")})
        assert table.strategy("m") is learned
        # Deployments configured as before keep their circuits too.
        first = table.candidates("m")
        table.reconfigure({"m": model("kv_cost", "a", "b")})
        assert {id(d) for d in table.candidates("m")} == {id(d) for d in first}
        table.reconfigure({"m": model("session_affinity", "a", "b")})
        assert table.strategy("m").name == "session_affinity"
    finally:
        await table.close()
