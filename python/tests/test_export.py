"""Unit tests of the export package that need no compile: how failures are explained, the error metric, the
version guard, tied weights, cross-entropy's targets for sequence outputs. (Compiled exports are tested from the Rust
suite: crates/hytrain-train/tests/exported.rs.)"""

from __future__ import annotations

import contextlib
import copy
import io
import tempfile
import textwrap
import unittest
from pathlib import Path
from unittest import mock

import torch
import torch.nn as nn
import torch.nn.functional as F

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


def small_gpt(**kwargs: int) -> nn.Module:
    """python/examples/gpt.py's model, loaded from its file as `python -m hytrain_export` does."""
    factory = hytrain_export.load_factory(str(Path(__file__).resolve().parents[1] / "examples" / "gpt.py") + ":gpt")
    return factory(**{"vocab_size": 11, "block_size": 6, "n_layer": 1, "n_head": 2, "n_embd": 8, **kwargs})


class SequenceTargets(unittest.TestCase):
    """cross_entropy's rule: one int64 class per output position, so the target is the output's shape without its
    last dimension ([] for a classifier, [T] for a language model), averaged over every position."""

    def setUp(self) -> None:
        self.options = ExportOptions(input_shape=[6], out=".", input_dtype="int64")
        self.gen = torch.Generator().manual_seed(0)

    def test_a_language_models_target_is_one_int64_class_per_position(self) -> None:
        logits = torch.randn(4, 6, 11)
        y = _export._example_target(self.options, logits, 4, self.gen)
        self.assertEqual((list(y.shape), y.dtype), ([4, 6], torch.int64))
        self.assertTrue(0 <= int(y.min()) and int(y.max()) < 11)
        classifier = _export._example_target(self.options, torch.randn(4, 10), 4, self.gen)
        self.assertEqual((list(classifier.shape), classifier.dtype), ([4], torch.int64))

    def test_the_loss_is_the_mean_over_every_token(self) -> None:
        loss_fn = _export._loss_fn(self.options, None)
        logits, y = torch.randn(3, 5, 7), torch.randint(0, 7, (3, 5))
        self.assertTrue(torch.equal(loss_fn(logits, y), F.cross_entropy(logits.flatten(0, -2), y.flatten())))
        per_token = F.cross_entropy(logits.reshape(15, 7), y.reshape(15), reduction="none")
        self.assertAlmostEqual(loss_fn(logits, y).item(), per_token.mean().item(), places=6)
        logits, y = torch.randn(3, 7), torch.randint(0, 7, (3,))
        self.assertTrue(torch.equal(loss_fn(logits, y), F.cross_entropy(logits, y)))

    def test_the_metadata_records_the_target_spec_and_the_tied_head(self) -> None:
        model = small_gpt()
        step = _export._Step(model, _export._loss_fn(self.options, None))
        params, buffers = step.state()
        x = _export._example_input(self.options, 4, self.gen, _export._token_range(model))
        output = model(x)
        y = _export._example_target(self.options, output, 4, self.gen)
        meta = _export._metadata(self.options, model, step, params, buffers, x, output, y, {})
        self.assertEqual(meta["input"], {"shape": [6], "dtype": "int64"})
        self.assertEqual(meta["output"], {"shape": [6, 11], "dtype": "float32"})
        self.assertEqual(meta["target"], {"shape": [6], "dtype": "int64"})
        self.assertEqual(meta["aliases"], {"lm_head.weight": "wte.weight"})
        names = [t["name"] for t in meta["parameters"]]
        self.assertIn("wte.weight", names)
        self.assertNotIn("lm_head.weight", names)
        self.assertEqual(meta["buffers"], [])

    def test_token_inputs_cover_the_smallest_embedding(self) -> None:
        # Position embeddings (6 rows) are smaller than the vocabulary (11): every id must index both.
        model = small_gpt()
        self.assertEqual(_export._token_range(model), 6)
        self.assertEqual(_export._token_range(nn.Linear(4, 3)), 2)
        x = _export._example_input(self.options, 64, self.gen, 6)
        self.assertEqual((list(x.shape), x.dtype), ([64, 6], torch.int64))
        self.assertEqual(sorted(x.unique().tolist()), list(range(6)))
        uint8 = ExportOptions(input_shape=[3], out=".", input_dtype="uint8")
        self.assertLess(int(_export._example_input(uint8, 200, self.gen, 100_000).max()), 256)

    def test_the_float64_reference_keeps_token_ids_integer(self) -> None:
        model = small_gpt()
        step = _export._Step(model, _export._loss_fn(self.options, None))
        params, buffers = step.state()
        x = _export._example_input(self.options, 3, self.gen, 6)
        y = _export._example_target(self.options, model(x), 3, self.gen)
        reference = _export._float64_step(copy.deepcopy(model).double(), step.loss_fn, x, y, params, buffers)
        self.assertEqual(reference[0].dtype, torch.float64)
        eager = step.train_step(x, y, *[p.clone().requires_grad_(True) for p in params], *buffers)
        worst, name = _export._compare(eager, reference, ["loss", *step.param_names])[0]
        self.assertLess(worst, 1e-4, name)

    def test_target_flags_that_contradict_cross_entropy_are_refused_in_one_paragraph(self) -> None:
        for shape, dtype in [([5], None), (None, "float32"), ([], None)]:
            options = ExportOptions(input_shape=[6], out=".", input_dtype="int64", target_shape=shape,
                                    target_dtype=dtype)
            with self.assertRaises(ExportError) as e:
                _export._example_target(options, torch.randn(4, 6, 11), 4, self.gen)
            text = str(e.exception)
            self.assertIn("cross_entropy takes one int64 class index per output position", text)
            self.assertIn("its targets are [6] int64 per sample", text)
            self.assertNotIn("\n", text)
        # The shape the rule gives, said explicitly, is accepted.
        options = ExportOptions(input_shape=[6], out=".", target_shape=[6], target_dtype="int64")
        self.assertEqual(list(_export._example_target(options, torch.randn(4, 6, 11), 4, self.gen).shape), [4, 6])

    def test_an_integer_output_is_refused_for_cross_entropy(self) -> None:
        with self.assertRaisesRegex(ExportError, r"outputs shape \[4, 6\] int64"):
            _export._example_target(self.options, torch.zeros(4, 6, dtype=torch.int64), 4, self.gen)


if __name__ == "__main__":
    unittest.main()
