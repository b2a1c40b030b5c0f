"""containers/sagemaker/launch.py's choice of where checkpoints go: SageMaker's copy of /opt/ml/checkpoints, or
hytrain writing to S3 itself. Only the argument handling is tested here (the SageMaker SDK is not installed in the
test environment; its imports are inside the functions that call AWS)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import unittest
from pathlib import Path

LAUNCH = Path(__file__).resolve().parents[2] / "containers" / "sagemaker" / "launch.py"


def load_launch():
    spec = importlib.util.spec_from_file_location("hytrain_sagemaker_launch", LAUNCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BASE = [
    "--image-uri",
    "123.dkr.ecr.us-west-2.amazonaws.com/hytrain:gpu",
    "--role",
    "arn:aws:iam::123:role/SageMakerRole",
    "--data-source",
    "s3",
    "--s3-train",
    "s3://bucket/cifar10/",
    "--output-path",
    "s3://bucket/out",
]


class CheckpointLocation(unittest.TestCase):
    def setUp(self):
        self.launch = load_launch()

    def refused(self, argv: list[str]) -> str:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as exit:
            self.launch.arguments(argv)
        self.assertEqual(exit.exception.code, 2)
        return err.getvalue()

    def test_sagemakers_copy_keeps_the_checkpoint_folder_and_no_hyperparameter(self):
        args = self.launch.arguments(BASE + ["--checkpoint-s3-uri", "s3://bucket/ckpt"])
        self.assertEqual(
            self.launch.checkpoint_settings(args),
            {"checkpoint_s3_uri": "s3://bucket/ckpt", "checkpoint_local_path": "/opt/ml/checkpoints"},
        )
        self.assertNotIn("checkpoint_dir", self.launch.hyperparameters(args))

    def test_hytrain_writing_to_s3_gets_the_prefix_as_a_hyperparameter_and_no_sagemaker_copy(self):
        args = self.launch.arguments(BASE + ["--checkpoint-dir-s3", "s3://bucket/ckpt/run1"])
        self.assertEqual(self.launch.checkpoint_settings(args), {})
        self.assertEqual(self.launch.hyperparameters(args)["checkpoint_dir"], "s3://bucket/ckpt/run1")
        # --hp still wins, as for every hyperparameter.
        args = self.launch.arguments(BASE + ["--checkpoint-dir-s3", "s3://b/c", "--hp", "checkpoint_dir=s3://b/d"])
        self.assertEqual(self.launch.hyperparameters(args)["checkpoint_dir"], "s3://b/d")

    def test_one_and_only_one_checkpoint_location_is_required(self):
        self.assertIn("--checkpoint-s3-uri", self.refused(BASE))
        both = BASE + ["--checkpoint-s3-uri", "s3://b/a", "--checkpoint-dir-s3", "s3://b/c"]
        self.assertIn("not allowed with", self.refused(both))

    def test_a_checkpoint_location_that_is_not_an_s3_prefix_is_refused(self):
        for bad in ["/opt/ml/checkpoints", "s3://", "s3:///prefix"]:
            self.assertIn("expected s3://bucket/prefix", self.refused(BASE + ["--checkpoint-dir-s3", bad]))


if __name__ == "__main__":
    unittest.main()
