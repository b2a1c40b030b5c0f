#!/usr/bin/env python3
"""Submits one of this folder's PyTorchJob manifests and waits for it to end; the Kubeflow Pipelines step of
pipeline.py runs it inside the hytrain image (which carries the Kubernetes Python client), and it works from a
laptop with a kubeconfig too.

  python3 containers/kubeflow/submit.py --manifest containers/kubeflow/pytorchjob-cpu-efs.yaml \\
      --image ACCOUNT.dkr.ecr.REGION.amazonaws.com/hytrain:cpu --name hytrain-run-1 --namespace kubeflow-user

Only the PyTorchJob of the manifest is submitted (claims and service accounts are set up once, beforehand). The
exit code is 0 when the job succeeded, 1 when it failed or the deadline passed.
"""

from __future__ import annotations

import argparse
import sys
import time

GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"


def pytorchjob(path: str, name: str | None, image: str | None, extra_args: list[str]) -> dict:
    import yaml

    with open(path, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d and d.get("kind") == "PyTorchJob"]
    if len(docs) != 1:
        raise SystemExit(f"{path} holds {len(docs)} PyTorchJobs; submit.py takes a file with exactly one")
    job = docs[0]
    if name:
        old = job["metadata"]["name"]
        job["metadata"]["name"] = name
    for spec in job["spec"]["pytorchReplicaSpecs"].values():
        for container in spec["template"]["spec"]["containers"]:
            if container.get("name") != "pytorch":
                continue
            if image:
                container["image"] = image
            args = list(container.get("args", []))
            if name:
                # Each run writes its own checkpoints and model: a new name must not resume an older run.
                args = [a.replace(f"/hytrain/{old}/", f"/hytrain/{name}/") for a in args]
            # An extra `--key=value` replaces the manifest's `--key=...` (a flag given twice is an error).
            keys = {a.split("=", 1)[0] for a in extra_args}
            container["args"] = [a for a in args if a.split("=", 1)[0] not in keys] + extra_args
    return job


def state(job: dict) -> str | None:
    for condition in reversed(job.get("status", {}).get("conditions", []) or []):
        if condition.get("status") == "True" and condition.get("type") in ("Succeeded", "Failed"):
            return condition["type"]
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", required=True)
    p.add_argument("--namespace", help="default: the pod's own namespace, else the kubeconfig's")
    p.add_argument("--name", help="job name (default: the manifest's)")
    p.add_argument("--image", help="hytrain image (default: the manifest's)")
    p.add_argument("--arg", action="append", default=[], help="`hytrain train` flag as --key=value, replacing the manifest's, e.g. --epochs=3")
    p.add_argument("--timeout", type=int, default=24 * 3600, help="seconds to wait for the job")
    args = p.parse_args(argv)

    from kubernetes import client, config

    try:
        config.load_incluster_config()
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace", encoding="utf-8") as f:
            own_namespace = f.read().strip()
    except config.ConfigException:
        config.load_kube_config()
        own_namespace = config.list_kube_config_contexts()[1]["context"].get("namespace", "default")
    namespace = args.namespace or own_namespace

    job = pytorchjob(args.manifest, args.name, args.image, args.arg)
    name = job["metadata"]["name"]
    api = client.CustomObjectsApi()
    api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)
    print(f"submitted PyTorchJob {namespace}/{name}", flush=True)

    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        current = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        result = state(current)
        if result:
            print(f"PyTorchJob {namespace}/{name}: {result}", flush=True)
            return 0 if result == "Succeeded" else 1
        time.sleep(15)
    print(f"PyTorchJob {namespace}/{name} still running after {args.timeout} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
