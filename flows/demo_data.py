"""Demo-data flow: write the synthetic PTB-XL and MIMIC datasets (or reuse them) and log the run."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, task
from prefect.runtime import flow_run

from ecgproto import tracking
from ecgproto.data.demo.generate import DemoConfig, generate_demo
from ecgproto.data.summary import demo_report
from ecgproto.settings import demo_dir


@task(name="write-demo-data")
def write_demo_data(out: str, config: DemoConfig) -> tuple[str, float, bool]:
    """Returns (root, seconds, reused). Existing data written with the same config is reused."""
    truth = Path(out) / "ground_truth.json"
    if truth.exists() and json.loads(truth.read_text()).get("config") == config.model_dump():
        return out, 0.0, True
    data = generate_demo(Path(out), config)
    return str(data.root), data.seconds, False


@flow(name="demo-data", log_prints=True)
def demo_data_flow(
    out: str | None = None,
    config: DemoConfig | None = None,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
) -> dict[str, str]:
    config = config or DemoConfig()
    out = out or str(demo_dir())
    with tracking.stage_run(
        "demo-data", parent_run_id=parent_run_id, uri=tracking_uri, tags={"prefect_flow_run_id": str(flow_run.id)}
    ) as run_id:
        root, seconds, reused = write_demo_data(out, config)
        report = demo_report(Path(root) / "ground_truth.json", Path(root) / "ptbxl", seconds)
        report.metrics["reused"] = float(reused)
        report.description = (
            f"**Demo data** {'reused from an earlier run' if reused else f'written in {seconds:.0f} s'} "
            f"under `{root}`: "
            "a PTB-XL-layout set with planted labels and a MIMIC-IV-layout cohort with planted associations "
            "(synthetic; no patient). [Ground truth](artifacts/ground_truth.json): what each stage should find."
        )
        tracking.log_report(run_id, report, tracking_uri)
    print(f"demo data {'reused' if reused else f'written in {seconds:.1f} s'}: {root}")
    return {"root": root, "run_id": run_id}
