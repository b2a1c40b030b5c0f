#!/usr/bin/env python3
"""A Kubeflow Pipelines (KFP v2) pipeline that trains the reference job with hytrain on Kubeflow or on SageMaker,
chosen when the run starts (the `training_runtime` parameter), like the reference workshop's pipeline.

Both steps run in the hytrain image itself, which carries the two launchers (containers/kubeflow/submit.py and
containers/sagemaker/launch.py under /opt/hytrain): the Kubeflow step creates a PyTorchJob from the manifest and
waits for it; the SageMaker step starts a training job through the SageMaker Python SDK and streams its logs.

  pip install "kfp>=2.7,<3"
  python3 containers/kubeflow/pipeline.py --image ACCOUNT.dkr.ecr.REGION.amazonaws.com/hytrain:cpu \\
      --output hytrain-pipeline.yaml
  # upload hytrain-pipeline.yaml in the Kubeflow dashboard (Pipelines -> Upload) and start a run with
  # training_runtime=kubeflow or training_runtime=sagemaker

The pipeline's pods run as the profile's service account (default-editor), which may create PyTorchJobs in its
namespace; for the SageMaker step bind that account to an IAM role (IRSA) allowed to call sagemaker:CreateTrainingJob
and iam:PassRole on the job's role.
"""


import argparse

from kfp import compiler, dsl

# Replaced by --image when compiling; the steps and the jobs they start use the same image.
IMAGE = "ACCOUNT.dkr.ecr.REGION.amazonaws.com/hytrain:cpu"


def kubeflow_step(image: str):
    @dsl.container_component
    def train_on_kubeflow(manifest: str, job_name: str, job_image: str, epochs: int):
        """Creates the PyTorchJob of `manifest` (a file of the image's /opt/hytrain/kubeflow) and waits for it."""
        return dsl.ContainerSpec(
            image=image,
            command=["python3", "/opt/hytrain/kubeflow/submit.py"],
            args=[
                "--manifest",
                dsl.ConcatPlaceholder(["/opt/hytrain/kubeflow/", manifest]),
                "--name",
                job_name,
                "--image",
                job_image,
                "--arg",
                dsl.ConcatPlaceholder(["--epochs=", epochs]),
            ],
        )

    return train_on_kubeflow


def sagemaker_step(image: str):
    @dsl.container_component
    def train_on_sagemaker(
        job_image: str,
        role: str,
        region: str,
        instance_type: str,
        instance_count: int,
        efs_id: str,
        efs_path: str,
        subnet: str,
        security_group: str,
        checkpoint_s3_uri: str,
        output_path: str,
        epochs: int,
    ):
        """Starts the SageMaker training job with the EFS channel `train` and waits for it."""
        return dsl.ContainerSpec(
            image=image,
            command=["python3", "/opt/hytrain/sagemaker/launch.py"],
            args=[
                "--image-uri", job_image,
                "--role", role,
                "--region", region,
                "--instance-type", instance_type,
                "--instance-count", instance_count,
                "--data-source", "efs",
                "--efs-id", efs_id,
                "--efs-path", efs_path,
                "--subnets", subnet,
                "--security-group-ids", security_group,
                "--checkpoint-s3-uri", checkpoint_s3_uri,
                "--output-path", output_path,
                "--hp", dsl.ConcatPlaceholder(["epochs=", epochs]),
                "--wait",
            ],
        )

    return train_on_sagemaker


def pipeline(image: str = IMAGE):
    train_on_kubeflow = kubeflow_step(image)
    train_on_sagemaker = sagemaker_step(image)

    @dsl.pipeline(
        name="hytrain-cifar10",
        description="Train the reference CIFAR-10 job with hytrain on Kubeflow (PyTorchJob) or SageMaker.",
    )
    def hytrain_cifar10(
        training_runtime: str = "kubeflow",
        epochs: int = 5,
        job_image: str = image,
        kubeflow_manifest: str = "pytorchjob-cpu-efs.yaml",
        kubeflow_job_name: str = "hytrain-cifar10",
        sagemaker_role: str = "arn:aws:iam::ACCOUNT:role/SageMakerRole",
        sagemaker_region: str = "us-west-2",
        sagemaker_instance_type: str = "ml.g5.xlarge",
        sagemaker_instance_count: int = 2,
        efs_id: str = "fs-0123456789abcdef0",
        efs_path: str = "/cifar10-dataset",
        subnet: str = "subnet-0123456789abcdef0",
        security_group: str = "sg-0123456789abcdef0",
        checkpoint_s3_uri: str = "s3://BUCKET/hytrain/checkpoints",
        output_path: str = "s3://BUCKET/hytrain/output",
    ):
        with dsl.If(training_runtime == "kubeflow", name="kubeflow"):
            train_on_kubeflow(
                manifest=kubeflow_manifest,
                job_name=kubeflow_job_name,
                job_image=job_image,
                epochs=epochs,
            ).set_caching_options(False)
        with dsl.Elif(training_runtime == "sagemaker", name="sagemaker"):
            train_on_sagemaker(
                job_image=job_image,
                role=sagemaker_role,
                region=sagemaker_region,
                instance_type=sagemaker_instance_type,
                instance_count=sagemaker_instance_count,
                efs_id=efs_id,
                efs_path=efs_path,
                subnet=subnet,
                security_group=security_group,
                checkpoint_s3_uri=checkpoint_s3_uri,
                output_path=output_path,
                epochs=epochs,
            ).set_caching_options(False)

    return hytrain_cifar10


def main() -> None:
    p = argparse.ArgumentParser(description="Compile the hytrain pipeline to a KFP v2 pipeline file.")
    p.add_argument("--image", default=IMAGE, help="the hytrain image the steps run in")
    p.add_argument("--output", default="hytrain-pipeline.yaml")
    args = p.parse_args()
    compiler.Compiler().compile(pipeline(args.image), args.output)
    print(args.output)


if __name__ == "__main__":
    main()
