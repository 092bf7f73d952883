"""A flow run whose worker died ends Crashed, not Running forever (Prefect's "detect zombie flows").

A deployed flow run sends a heartbeat event every `PREFECT_FLOWS_HEARTBEAT_FREQUENCY` seconds
(prefect.yaml sets it for every run of the work pool, HEARTBEAT_S here). When the machine or the
worker running it dies, the heartbeats stop and nothing else would ever move the run out of
Running; with the deployments' `concurrency_limit: 1` that zombie would hold the slot and block
every later run. The automation below is Prefect's documented recipe
(https://docs.prefect.io/v3/advanced/detect-zombie-flows): a heartbeat not followed by another one
or a final state within MISSED_AFTER_S marks that run Crashed, which releases its slot.

`python -m flows.zombies` creates the automation on the server PREFECT_API_URL names, or updates it
to this definition (by name, so running it again never adds a second one). prefect.yaml's build step
runs it on every `prefect deploy`, so a deployed project always has it.
"""

from __future__ import annotations

from datetime import timedelta

from prefect.automations import Automation
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification

NAME = "tunery: crash zombie flow runs"
HEARTBEAT_S = 30  # prefect.yaml's PREFECT_FLOWS_HEARTBEAT_FREQUENCY (Prefect's minimum)
MISSED_AFTER_S = 3 * HEARTBEAT_S  # three missed heartbeats, as in Prefect's recipe
FINAL_EVENTS = (
    "prefect.flow-run.Completed",
    "prefect.flow-run.Failed",
    "prefect.flow-run.Cancelled",
    "prefect.flow-run.Crashed",
)


def automation() -> Automation:
    return Automation(
        name=NAME,
        description=(
            "Marks a flow run Crashed when its heartbeats stop (its worker or machine died), so "
            "that it releases its deployment's concurrency slot. Created by `python -m flows.zombies`."
        ),
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *FINAL_EVENTS},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=MISSED_AFTER_S),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=(
                    f"no heartbeat for {MISSED_AFTER_S} s: the worker or machine running this flow "
                    "run died (marked by the automation of flows/zombies.py)"
                ),
            )
        ],
    )


def ensure() -> tuple[str, str]:
    """Create or update the automation; (its id, "created" | "updated")."""
    wanted = automation()
    try:
        existing = Automation.read(name=NAME)
    except ValueError:  # Prefect's "not found"
        return str(wanted.create().id), "created"
    wanted.id = existing.id
    wanted.update()
    return str(existing.id), "updated"


def main() -> None:
    automation_id, what = ensure()
    print(
        f"automation {NAME!r} {what} ({automation_id}): a flow run without a heartbeat for "
        f"{MISSED_AFTER_S} s ends Crashed"
    )


if __name__ == "__main__":
    main()
