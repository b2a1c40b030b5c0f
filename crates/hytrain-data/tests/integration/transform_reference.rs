//! The image transforms against torchvision's on the same png: `Resize(n)` (PIL, bilinear, antialiased),
//! `CenterCrop(n)`, `ToTensor()`, `Normalize(mean, std)`, what `--resize`, `--crop` and `--normalize` promise and
//! what validation and inference apply. Needs the Python of `cargo xtask setup` (torch, torchvision), or
//! HYTRAIN_TEST_PYTHON.

use std::path::PathBuf;
use std::process::Command;

use hytrain_data::augment::{Normalize, Transform};
use hytrain_data::format::{decode, Image};

fn python() -> PathBuf {
    let p = std::env::var_os("HYTRAIN_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.cache/bench-venv/bin/python"));
    assert!(p.exists(), "{} is missing: run `cargo xtask setup`, or set HYTRAIN_TEST_PYTHON", p.display());
    p
}

/// A `width x height` image of smooth gradients with some texture, so resampling has something to get wrong.
fn photo(width: usize, height: usize, channels: usize) -> Image {
    let mut pixels = Vec::with_capacity(width * height * channels);
    for y in 0..height {
        for x in 0..width {
            for c in 0..channels {
                let v = 30.0
                    + 180.0 * (x as f64 / width as f64) * (1.0 - c as f64 * 0.3)
                    + 40.0 * ((y * 7 + c * 3) as f64 / 5.0).sin()
                    + ((x * 13 + y * 29 + c * 7) % 17) as f64;
                pixels.push(v.clamp(0.0, 255.0) as u8);
            }
        }
    }
    Image { height, width, channels, pixels }
}

/// torchvision's transforms of the png at `path`, CHW floats.
fn torchvision(
    path: &std::path::Path,
    resize: Option<usize>,
    crop: Option<usize>,
    mean: &[f32],
    std: &[f32],
) -> Vec<f32> {
    let script = r#"
import json, sys
from PIL import Image
from torchvision import transforms
resize, crop, mean, std = json.loads(sys.argv[2])
steps = []
if resize is not None:
    steps.append(transforms.Resize(resize, interpolation=transforms.InterpolationMode.BILINEAR, antialias=True))
if crop is not None:
    steps.append(transforms.CenterCrop(crop))
steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
x = transforms.Compose(steps)(Image.open(sys.argv[1]))
print(json.dumps(list(x.shape)))
print(json.dumps(x.flatten().tolist()))
"#;
    let args = serde_json::json!([resize, crop, mean, std]).to_string();
    let out = Command::new(python()).args(["-c", script]).arg(path).arg(args).output().unwrap();
    assert!(out.status.success(), "torchvision failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    let _shape = lines.next().unwrap();
    serde_json::from_str(lines.next().unwrap()).unwrap()
}

/// Largest difference in pixel units (`[0, 1]` before normalizing) between hytrain and torchvision.
fn largest_difference(image: &Image, resize: Option<usize>, crop: Option<usize>, mean: Vec<f32>, std: Vec<f32>) -> f32 {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("photo.png");
    std::fs::write(&path, decode::png(image).unwrap()).unwrap();
    let reference = torchvision(&path, resize, crop, &mean, &std);
    let transform = Transform {
        augment: false,
        resize,
        crop,
        normalize: Normalize::MeanStd { mean, std: std.clone() },
        ..Transform::default()
    };
    let ours = transform.apply(image, 0, 0, 0).unwrap();
    let (h, w) = transform.output_size(image.height, image.width);
    assert_eq!(ours.len(), image.channels * h * w);
    assert_eq!(ours.len(), reference.len(), "torchvision makes another size than {}x{h}x{w}", image.channels);
    let plane = h * w;
    ours.iter().zip(&reference).enumerate().map(|(i, (a, b))| (a - b).abs() * std[i / plane]).fold(0.0, f32::max)
}

/// One level of 8 bits (1/255 in `[0, 1]`, plus float rounding): PIL rounds to 8 bits between its horizontal and
/// vertical passes, the image crate (vertical first) keeps floats between them, so a resized pixel may land one
/// level apart. Crops without a resize match exactly. Measured: at most 1.00001 levels.
const TOLERANCE: f32 = 1.0 / 255.0 + 1e-5;

#[test]
fn resize_center_crop_and_normalize_match_torchvision_within_one_level() {
    let imagenet = || (vec![0.485, 0.456, 0.406], vec![0.229, 0.224, 0.225]);
    let cases: &[(&str, Image, Option<usize>, Option<usize>)] = &[
        ("shrink a landscape photo, crop the center", photo(53, 37, 3), Some(24), Some(20)),
        ("shrink a portrait photo, odd margins", photo(29, 61, 3), Some(17), Some(14)),
        ("enlarge", photo(11, 9, 3), Some(20), Some(19)),
        ("crop only, no resize", photo(40, 33, 3), None, Some(24)),
        ("a crop larger than the image pads with zeros", photo(13, 10, 3), None, Some(16)),
        ("resize only", photo(30, 20, 3), Some(12), None),
    ];
    for (what, image, resize, crop) in cases {
        let (mean, std) = imagenet();
        let d = largest_difference(image, *resize, *crop, mean, std);
        assert!(d <= TOLERANCE, "{what}: {} levels off torchvision", d * 255.0);
    }
    let d = largest_difference(&photo(45, 31, 1), Some(16), Some(16), vec![0.1307], vec![0.3081]);
    assert!(d <= TOLERANCE, "one channel: {} levels off torchvision", d * 255.0);
}
