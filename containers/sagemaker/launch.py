#!/usr/bin/env python3
"""Starts the reference training job on SageMaker with the hytrain image, through the SageMaker Python SDK (v2).

The image's ENTRYPOINT is `hytrain`, so SageMaker's `docker run IMAGE train` runs `hytrain train`: it reads the
job's hosts, channels, hyperparameters and checkpoint folder from /opt/ml itself (no SageMaker training toolkit, no
`sagemaker_program`), trains data-parallel over all instances, writes the model to /opt/ml/model (uploaded as
model.tar.gz) and checkpoints either to /opt/ml/checkpoints (--checkpoint-s3-uri: SageMaker mirrors the folder to S3
on its own schedule and restores it on a spot restart) or straight to S3 (--checkpoint-dir-s3: hytrain uploads each
checkpoint in the background with the job's execution role and resumes from the newest complete one; the role needs
s3:PutObject, s3:GetObject, s3:DeleteObject, s3:AbortMultipartUpload and s3:ListBucket on that prefix).

Examples:

  # The reference job: 2 instances, training data on EFS (File mode; needs the EFS mount target's VPC)
  python3 containers/sagemaker/launch.py --image-uri ACCOUNT.dkr.ecr.REGION.amazonaws.com/hytrain:gpu \\
      --role arn:aws:iam::ACCOUNT:role/SageMakerRole --data-source efs --efs-id fs-0123456789abcdef0 \\
      --efs-path /cifar10 --subnets subnet-0abc --security-group-ids sg-0abc \\
      --checkpoint-s3-uri s3://BUCKET/hytrain/checkpoints --output-path s3://BUCKET/hytrain/output

  # The same from S3, streamed (FastFile), on managed spot capacity
  python3 containers/sagemaker/launch.py ... --data-source s3 --s3-train s3://BUCKET/cifar10/ \\
      --input-mode FastFile --spot --max-run 7200 --max-wait 14400

  # Checkpoints written by hytrain straight to S3 instead of SageMaker's copy of /opt/ml/checkpoints
  python3 containers/sagemaker/launch.py ... --checkpoint-dir-s3 s3://BUCKET/hytrain/checkpoints/run1 --spot

  # See the CreateTrainingJob request without calling AWS (checked against the API's schema by botocore)
  python3 containers/sagemaker/launch.py ... --dry-run

Hyperparameters are hytrain's settings (`hytrain train --help`), given as --hp NAME=VALUE. SageMaker hands them to
the container as strings in hyperparameters.json (this generic Estimator writes them as they are; the SDK's framework
estimators JSON-encode them, so lenet arrives with its quotes): hytrain takes both forms. A name hytrain does not
know fails the job with a message naming it.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent

# The reference script's defaults (cifar10-distributed-gpu-final.py), in hytrain's names.
REFERENCE_HYPERPARAMETERS = {
    "model": "lenet",
    "epochs": 10,
    "batch-size": 64,
    "test-batch-size": 1000,
    "lr": 0.01,
    "momentum": 0.5,
    "seed": 1,
    "log-interval": 10,
}


def metric_definitions() -> list[dict[str, str]]:
    """The regexes SageMaker applies to the job's log lines; hytrain's contract tests check them against real
    output, so they live in one file."""
    with open(HERE / "metric_definitions.json", encoding="utf-8") as f:
        return json.load(f)


def parse_hyperparameter(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"--hp takes NAME=VALUE, got {text!r}")
    return name.strip(), value


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Start hytrain as a SageMaker training job.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--image-uri", required=True, help="the hytrain image in ECR (containers/Dockerfile)")
    p.add_argument("--role", required=True, help="IAM role ARN SageMaker runs the job with")
    p.add_argument("--region", help="AWS region (default: the boto3 default)")
    p.add_argument("--instance-type", default="ml.g5.xlarge")
    p.add_argument("--instance-count", type=int, default=2)
    p.add_argument("--volume-size", type=int, default=50, help="GiB of EBS per instance")
    p.add_argument("--base-job-name", default="hytrain")
    p.add_argument(
        "--nproc-per-node",
        type=int,
        help="processes per instance (one per GPU): runs `hytrain launch --nproc-per-node N -- hytrain train` "
        "instead of `hytrain train`",
    )

    data = p.add_argument_group("data (the channel `train`; hytrain reads `channel:train` by default)")
    data.add_argument("--data-source", choices=["efs", "s3"], required=True)
    data.add_argument("--efs-id", help="EFS file system id (fs-...)")
    data.add_argument("--efs-path", default="/cifar10", help="directory on the EFS file system")
    data.add_argument("--s3-train", help="s3://bucket/prefix/ of the training data")
    data.add_argument("--s3-test", help="s3://bucket/prefix/ of a separate test channel (needed with Pipe)")
    data.add_argument(
        "--input-mode",
        choices=["File", "FastFile", "Pipe"],
        default="File",
        help="S3 channels: copy first (File), stream as files (FastFile) or stream through FIFOs (Pipe); EFS "
        "channels are always File",
    )
    data.add_argument(
        "--distribution",
        choices=["FullyReplicated", "ShardedByS3Key"],
        default="FullyReplicated",
        help="S3 channels: every instance gets all objects, or each a disjoint part",
    )
    data.add_argument("--subnets", nargs="+", default=[], help="VPC subnets (required for EFS)")
    data.add_argument("--security-group-ids", nargs="+", default=[], help="VPC security groups (required for EFS)")

    out = p.add_argument_group("outputs, checkpoints, capacity")
    out.add_argument("--output-path", required=True, help="s3:// prefix for model.tar.gz and output.tar.gz")
    where = out.add_mutually_exclusive_group(required=True)
    where.add_argument("--checkpoint-s3-uri", help="s3:// prefix SageMaker mirrors /opt/ml/checkpoints to")
    where.add_argument(
        "--checkpoint-dir-s3", help="s3:// prefix hytrain writes checkpoints to itself (hyperparameter checkpoint_dir)"
    )
    out.add_argument("--spot", action="store_true", help="managed spot training (restarts resume from checkpoints)")
    out.add_argument("--max-run", type=int, default=24 * 3600, help="seconds of training at most")
    out.add_argument(
        "--max-wait", type=int, help="spot: seconds of training plus waiting for capacity (default 2 x --max-run)"
    )

    p.add_argument("--hp", action="append", type=parse_hyperparameter, default=[], metavar="NAME=VALUE")
    p.add_argument("--wait", action="store_true", help="stream the job's logs until it ends")
    p.add_argument("--dry-run", action="store_true", help="print the CreateTrainingJob request, call nothing")
    args = p.parse_args(argv)

    if args.data_source == "efs":
        if not args.efs_id:
            p.error("--data-source efs needs --efs-id")
        if not args.subnets or not args.security_group_ids:
            p.error("--data-source efs needs --subnets and --security-group-ids (the EFS mount target's VPC)")
        if args.input_mode != "File":
            p.error("EFS channels are File mode only (SageMaker mounts the file system at the channel folder)")
    elif not args.s3_train:
        p.error("--data-source s3 needs --s3-train s3://bucket/prefix/")
    if args.max_wait is None:
        args.max_wait = 2 * args.max_run
    if args.spot and args.max_wait < args.max_run:
        p.error(f"--max-wait ({args.max_wait}) must be at least --max-run ({args.max_run})")
    for flag, uri in [("--checkpoint-s3-uri", args.checkpoint_s3_uri), ("--checkpoint-dir-s3", args.checkpoint_dir_s3)]:
        if uri is not None and (not uri.startswith("s3://") or len(uri) <= len("s3://") or uri[5] == "/"):
            p.error(f"{flag} {uri}: expected s3://bucket/prefix")
    if args.nproc_per_node is not None and args.nproc_per_node < 1:
        p.error("--nproc-per-node must be at least 1")
    return args


def channels(args: argparse.Namespace) -> dict:
    from sagemaker.inputs import FileSystemInput, TrainingInput

    if args.data_source == "efs":
        train = FileSystemInput(
            file_system_id=args.efs_id,
            file_system_type="EFS",
            directory_path=args.efs_path,
            file_system_access_mode="ro",
        )
        return {"train": train}
    inputs = {
        "train": TrainingInput(args.s3_train, distribution=args.distribution, input_mode=args.input_mode),
    }
    if args.s3_test:
        inputs["test"] = TrainingInput(args.s3_test, distribution="FullyReplicated", input_mode=args.input_mode)
    return inputs


def hyperparameters(args: argparse.Namespace) -> dict:
    """The job's hyperparameters: the reference's, hytrain's checkpoint prefix when it writes to S3 itself, then
    --hp (which wins)."""
    out = dict(REFERENCE_HYPERPARAMETERS)
    if args.checkpoint_dir_s3:
        out["checkpoint_dir"] = args.checkpoint_dir_s3
    out.update(dict(args.hp))
    return out


def checkpoint_settings(args: argparse.Namespace) -> dict:
    """The Estimator's checkpoint arguments: SageMaker's copy of /opt/ml/checkpoints, or none when hytrain writes
    to S3 itself (a local path without an S3 URI would only take disk)."""
    if args.checkpoint_s3_uri:
        return {"checkpoint_s3_uri": args.checkpoint_s3_uri, "checkpoint_local_path": "/opt/ml/checkpoints"}
    return {}


def estimator(args: argparse.Namespace, session):
    from sagemaker.estimator import Estimator

    entry = {}
    if args.nproc_per_node:
        entry = {
            "container_entry_point": ["hytrain"],
            "container_arguments": ["launch", "--nproc-per-node", str(args.nproc_per_node), "--", "hytrain", "train"],
        }
    spot = {"use_spot_instances": True, "max_wait": args.max_wait} if args.spot else {}
    vpc = {"subnets": args.subnets, "security_group_ids": args.security_group_ids} if args.subnets else {}
    return Estimator(
        image_uri=args.image_uri,
        role=args.role,
        instance_count=args.instance_count,
        instance_type=args.instance_type,
        volume_size=args.volume_size,
        base_job_name=args.base_job_name,
        hyperparameters=hyperparameters(args),
        metric_definitions=metric_definitions(),
        output_path=args.output_path,
        max_run=args.max_run,
        # No SageMaker Debugger hook or profiler: they instrument Python frameworks, hytrain reports its own metrics.
        debugger_hook_config=False,
        disable_profiler=True,
        sagemaker_session=session,
        **checkpoint_settings(args),
        **spot,
        **vpc,
        **entry,
    )


def dry_run_session(region: str):
    """A SageMaker session whose client answers CreateTrainingJob itself, after botocore has checked the request
    against the API's schema; returns the session and the list the request lands in."""
    import boto3
    from botocore.stub import Stubber
    from sagemaker.session import Session

    boto = boto3.Session(
        region_name=region, aws_access_key_id="dry-run", aws_secret_access_key="dry-run"
    )
    client = boto.client("sagemaker")
    requests: list[dict] = []
    client.meta.events.register(
        "provide-client-params.sagemaker.CreateTrainingJob",
        lambda params, **_: requests.append(params),
    )
    stub = Stubber(client)
    stub.add_response("create_training_job", {"TrainingJobArn": "arn:aws:sagemaker:dry-run:0:training-job/dry"})
    stub.activate()
    return Session(boto_session=boto, sagemaker_client=client), requests


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    if args.dry_run:
        session, requests = dry_run_session(args.region or "us-west-2")
        estimator(args, session).fit(channels(args), wait=False, logs=False)
        print(json.dumps(requests[-1], indent=2, default=str))
        return 0
    import boto3
    from sagemaker.session import Session

    session = Session(boto_session=boto3.Session(region_name=args.region))
    est = estimator(args, session)
    est.fit(channels(args), wait=args.wait, logs="All" if args.wait else False)
    print(est.latest_training_job.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
