"""Unit tests of the export package that need no compile: how failures are explained, the error metric, the
version guard. (Compiled exports are tested from the Rust suite: crates/hytrain-train/tests/exported.rs.)"""

from __future__ import annotations

import contextlib
import io
import tempfile
import textwrap
import unittest
from pathlib import Path
from unittest import mock

import torch
import torch.nn as nn

import hytrain_export
from hytrain_export import ExportError, ExportOptions
from hytrain_export import __main__ as cli
from hytrain_export import _export


def write_model(folder: Path, source: str) -> Path:
    path = folder / "user_model.py"
    path.write_text(textwrap.dedent(source))
    return path


def write_linear_net(folder: Path, forward_body: str) -> Path:
    """A module file with `Net`, one Linear(4, 3) layer `fc`, and `forward_body` as forward's body, which starts on
    line 10."""
    head = textwrap.dedent("""
        import torch.nn as nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 3)

            def forward(self, x):
        """)
    return write_model(folder, head + textwrap.indent(textwrap.dedent(forward_body).lstrip("\n"), " " * 8))


class ExplainedFailures(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = Path(self.tmp.name)

    def tearDown(self) -> None:
        self.tmp.cleanup()

    def run_cli(self, *argv: str) -> tuple[int, str]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                code = cli.main(list(argv))
            except SystemExit as e:  # argparse's usage errors
                code = e.code
        return code, err.getvalue()

    def test_a_model_spec_without_a_name_says_what_to_give(self) -> None:
        with self.assertRaises(ExportError) as e:
            hytrain_export.load_factory("model.py")
        self.assertIn("is not FILE.py:NAME or MODULE:NAME", str(e.exception))

    def test_a_missing_file_or_name_is_named(self) -> None:
        with self.assertRaisesRegex(ExportError, "does not exist"):
            hytrain_export.load_factory(str(self.dir / "nothing.py") + ":Net")
        path = write_model(self.dir, "X = 1\n")
        with self.assertRaisesRegex(ExportError, "has no function or class named Net"):
            hytrain_export.load_factory(f"{path}:Net")

    def test_branching_on_tensor_values_is_explained_in_one_paragraph_with_the_users_line(self) -> None:
        path = write_linear_net(self.dir, """
                    if x.sum() > 0:
                        return self.fc(x)
                    return -self.fc(x)
            """)
        code, err = self.run_cli(f"{path}:Net", "--input-shape", "4", "--out", str(self.dir / "out"))
        self.assertEqual(code, 1)
        lines = err.strip().splitlines()
        self.assertEqual(len(lines), 1, err)
        self.assertTrue(lines[0].startswith("hytrain_export: error: tracing the training step failed at "), err)
        self.assertIn(f"{path}:10 in forward (if x.sum() > 0:)", err)
        self.assertIn("depends on tensor values", err)
        self.assertNotIn("Traceback", err)
        self.assertFalse((self.dir / "out").exists(), "a failed export left a folder")

    def test_a_forward_that_returns_no_tensor_is_refused(self) -> None:
        path = write_linear_net(self.dir, """
                    return {"logits": self.fc(x)}
            """)
        code, err = self.run_cli(f"{path}:Net", "--input-shape", "4", "--out", str(self.dir / "out"))
        self.assertEqual(code, 1)
        self.assertIn("forward returns dict; hytrain trains models whose forward returns one tensor", err)

    def test_a_model_that_fails_on_the_example_batch_names_the_shape(self) -> None:
        path = write_model(self.dir, """
            import torch.nn as nn

            def build():
                return nn.Linear(4, 3)
            """)
        code, err = self.run_cli(f"{path}:build", "--input-shape", "5", "--out", str(self.dir / "out"))
        self.assertEqual(code, 1)
        self.assertIn("running the model on an example batch of shape [8, 5] failed", err)

    def test_bad_options_are_refused(self) -> None:
        model = nn.Linear(4, 3)
        for options, words in [
            (ExportOptions(input_shape=[4], out=self.dir, loss="hinge"), "is none of cross_entropy, mse"),
            (ExportOptions(input_shape=[4], out=self.dir, example_batch=0), "between 1 and max batch"),
            (ExportOptions(input_shape=[4], out=self.dir, check="float32"), "neither float64 nor none"),
            (ExportOptions(input_shape=[4], out=self.dir, device="tpu"), "neither cpu nor cuda"),
        ]:
            with self.assertRaisesRegex(ExportError, words):
                hytrain_export.export(model, options)
        code, err = self.run_cli("m.py:Net", "--input-shape", "3,x", "--out", str(self.dir))
        self.assertEqual(code, 2)
        self.assertIn("not comma-separated whole numbers", err)

    def test_another_torch_release_is_refused(self) -> None:
        with mock.patch.object(torch, "__version__", "2.10.1+cpu"):
            with self.assertRaisesRegex(ExportError, "this is torch 2.10.1.cpu, but .* is for torch 2.11"):
                hytrain_export.export(nn.Linear(4, 3), ExportOptions(input_shape=[4], out=self.dir))

    def test_float64_params_are_refused(self) -> None:
        with self.assertRaisesRegex(ExportError, "parameter weight is torch.float64; hytrain trains float32"):
            hytrain_export.export(nn.Linear(4, 3).double(), ExportOptions(input_shape=[4], out=self.dir))


class ErrorMetric(unittest.TestCase):
    def test_relative_per_tensor_with_a_floor_for_gradients_that_are_about_zero(self) -> None:
        ref = [torch.tensor([10.0, -20.0]), torch.tensor([1e-9, -1e-9]), torch.tensor(3)]
        got = [torch.tensor([10.0, -20.002]), torch.tensor([2e-9, 1e-9]), torch.tensor(3)]
        errors = dict((n, e) for e, n in _export._compare(got, ref, ["a", "bias", "count"]))
        self.assertAlmostEqual(errors["a"], 1e-4, delta=1e-6)
        # 2e-9 off a tensor of ~0: measured against 1e-3 of the largest value (0.02), not against 1e-9.
        self.assertAlmostEqual(errors["bias"], 2e-9 / 0.02, places=12)
        self.assertEqual(errors["count"], 0.0)
        self.assertEqual(_export._compare([torch.tensor(4)], [torch.tensor(3)], ["count"])[0][0], float("inf"))


class TiedWeights(unittest.TestCase):
    def test_a_tied_name_is_an_alias_of_the_first_and_both_are_saved(self) -> None:
        class Tied(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.emb = nn.Embedding(5, 4)
                self.head = nn.Linear(4, 5, bias=False)
                self.head.weight = self.emb.weight

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.head(self.emb(x))

        model = Tied()
        step = _export._Step(model, _export._loss_fn(ExportOptions(input_shape=[3], out="."), None))
        self.assertEqual(step.param_names, ["emb.weight"])
        self.assertEqual(step.aliases, {"head.weight": "emb.weight"})
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "w.safetensors"
            _export._save_weights(model, step, path)
            fresh = Tied()
            from safetensors.torch import load_file

            fresh.load_state_dict(load_file(str(path)))
            self.assertTrue(torch.equal(fresh.head.weight, model.emb.weight))


if __name__ == "__main__":
    unittest.main()
