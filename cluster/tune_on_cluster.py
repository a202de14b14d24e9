"""Tune the demo's digits CNN on the Ray cluster this script runs in.

Run on the head node, by ``ray submit cluster/aws.yaml cluster/tune_on_cluster.py`` or as a Ray
job (``ray job submit --working-dir cluster -- python tune_on_cluster.py``). The driver is worker 0
on the head; one Ray worker per CPU of the other nodes (and the head's spare CPUs) joins it.
The history is written on the head node, in ``--workspace`` (absolute by default, so that a Ray
job's temporary working directory does not hide it).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import lpot_ray
from lpot_ray.demo import demo_config, trained_torch_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # `ray submit` sets no RAY_ADDRESS: "auto" joins the cluster of this node instead of starting a private Ray.
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS") or "auto", help="the cluster to use")
    parser.add_argument("--workspace", default=str(Path.home() / "lpot_ray_workspace" / "cluster"),
                        help="where the model cache, history.db and the int8 model go (on the head node)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="Ray CPUs per worker")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="  %(message)s")

    workspace = Path(args.workspace).expanduser().resolve()
    model, calibration, evaluation = trained_torch_model(workspace)
    conf = demo_config(workspace, workers=2)
    conf["ray"] = {"cpus_per_worker": args.cpus_per_worker}  # workers: one per cpus_per_worker of the cluster
    conf["tuning"]["exit_policy"] = {"timeout": 300, "max_trials": 50}  # keep searching: every worker gets trials
    result = lpot_ray.tune(model, conf, q_dataloader=calibration, eval_dataloader=evaluation, address=args.address)

    print(f"fp32 accuracy {result.baseline:.4f}; trials {result.n_trials}, stopped by: {result.stopped_by}")
    if not result.passed:
        print("no int8 config met the criterion")
        return 1
    print(f"int8 accuracy {result.accuracy:.4f}; ops left fp32: {', '.join(result.fp32_ops) or 'none'}")
    print(f"history: {workspace / 'history.db'}; int8 model: {result.save(workspace / 'int8_model')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
