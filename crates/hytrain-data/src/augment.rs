//! What happens to an image between decoding and the batch, in torchvision's words: `Resize(n)` (the shorter side to
//! `n`, bilinear with antialiasing), then `RandomCrop(size, padding)` and `RandomHorizontalFlip()` when training or
//! `CenterCrop(size)` otherwise, `ToTensor()` and `Normalize(mean, std)`, applied to one HWC image to give CHW `f32`.
//! With no flags it is the reference sample's `RandomCrop(32, padding=4)`, `RandomHorizontalFlip()`, `ToTensor()`,
//! `Normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))` for 3-channel images.
//!
//! Each random choice comes from [`Rng::derive`] over (seed, epoch, the sample's position in the epoch), never from
//! a thread's generator, so the result is the same whichever worker decodes the sample, and a resumed epoch
//! repeats it exactly.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::format::Image;
use crate::sampler::{Rng, PURPOSE_AUGMENT};

/// Per-channel normalization after scaling pixels to `[0, 1]`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub enum Normalize {
    /// The reference's CIFAR-10 mean/std for 3-channel images, MNIST's (0.1307, 0.3081) for 1-channel ones.
    #[default]
    Auto,
    /// Only scale to `[0, 1]`.
    Off,
    /// Given mean and std, one per channel.
    MeanStd {
        /// Per-channel mean.
        mean: Vec<f32>,
        /// Per-channel standard deviation.
        std: Vec<f32>,
    },
}

/// CIFAR-10 mean used by the reference sample.
pub const CIFAR10_MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
/// CIFAR-10 std used by the reference sample.
pub const CIFAR10_STD: [f32; 3] = [0.2023, 0.1994, 0.2010];
/// MNIST mean (PyTorch's MNIST example).
pub const MNIST_MEAN: [f32; 1] = [0.1307];
/// MNIST std (PyTorch's MNIST example).
pub const MNIST_STD: [f32; 1] = [0.3081];

/// The syntax `--normalize` takes, for error messages.
pub const NORMALIZE_SYNTAX: &str = "auto, none, or one mean and one std per channel as MEAN,MEAN,MEAN/STD,STD,STD \
     (ImageNet's: 0.485,0.456,0.406/0.229,0.224,0.225; one channel: 0.1307/0.3081)";

impl FromStr for Normalize {
    type Err = String;

    /// `auto`, `none`, or `MEAN,...,MEAN/STD,...,STD` with as many stds as means, each std above 0.
    fn from_str(s: &str) -> Result<Normalize, String> {
        let refuse = |why: &str| format!("{why}; expected {NORMALIZE_SYNTAX}, got '{s}'");
        match s.trim() {
            "auto" => return Ok(Normalize::Auto),
            "none" | "off" => return Ok(Normalize::Off),
            _ => {}
        }
        let (mean, std) = s.split_once('/').ok_or_else(|| refuse("not auto, none or MEANS/STDS"))?;
        let numbers = |part: &str| -> Result<Vec<f32>, String> {
            part.split(',')
                .map(|v| {
                    v.trim()
                        .parse::<f32>()
                        .ok()
                        .filter(|v| v.is_finite())
                        .ok_or_else(|| refuse(&format!("'{}' is not a number", v.trim())))
                })
                .collect()
        };
        let (mean, std) = (numbers(mean)?, numbers(std)?);
        if mean.len() != std.len() {
            return Err(refuse(&format!("{} means but {} stds", mean.len(), std.len())));
        }
        if let Some(bad) = std.iter().find(|v| **v <= 0.0) {
            return Err(refuse(&format!("a std must be above 0, not {bad}")));
        }
        Ok(Normalize::MeanStd { mean, std })
    }
}

impl fmt::Display for Normalize {
    /// The `--normalize` spelling of this normalization.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let join = |v: &[f32]| v.iter().map(f32::to_string).collect::<Vec<_>>().join(",");
        match self {
            Normalize::Auto => f.write_str("auto"),
            Normalize::Off => f.write_str("none"),
            Normalize::MeanStd { mean, std } => write!(f, "{}/{}", join(mean), join(std)),
        }
    }
}

impl Normalize {
    /// The mean and std used for `channels`-channel images (`Auto` resolved), one per channel.
    pub fn for_channels(&self, channels: usize) -> Result<(Vec<f32>, Vec<f32>), String> {
        let (mean, std) = match self {
            Normalize::Off => (vec![0.0; channels], vec![1.0; channels]),
            Normalize::Auto if channels == 3 => (CIFAR10_MEAN.to_vec(), CIFAR10_STD.to_vec()),
            Normalize::Auto if channels == 1 => (MNIST_MEAN.to_vec(), MNIST_STD.to_vec()),
            Normalize::Auto => return Err(format!("no default normalization for {channels}-channel images")),
            Normalize::MeanStd { mean, std } => (mean.clone(), std.clone()),
        };
        if mean.len() != channels || std.len() != channels {
            return Err(format!(
                "normalization has {} means and {} stds for {channels}-channel images",
                mean.len(),
                std.len()
            ));
        }
        Ok((mean, std))
    }
}

/// What happens to an image between decoding and the batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transform {
    /// Random crop and horizontal flip (training); off for evaluation.
    pub augment: bool,
    /// Zero padding on each side before the random crop (the reference: 4).
    pub crop_padding: usize,
    /// Flip horizontally with probability 1/2 when augmenting.
    pub flip: bool,
    /// Normalization after scaling to `[0, 1]`.
    pub normalize: Normalize,
    /// Resize the shorter side to this many pixels, keeping the aspect ratio (torchvision's `Resize(n)`): the
    /// longer side becomes `floor(n * long / short)`. Bilinear with antialiasing when shrinking (the triangle
    /// filter widened by the scale, as torchvision's default `antialias=True` and PIL do).
    #[serde(default)]
    pub resize: Option<usize>,
    /// Crop to `n x n` after resizing: at random inside the image padded by `crop_padding` when augmenting
    /// (`RandomCrop(n, padding)`), in the center otherwise (`CenterCrop(n)`, zero-padded when the image is
    /// smaller). Without it augmentation crops back to the image's own size.
    #[serde(default)]
    pub crop: Option<usize>,
}

impl Default for Transform {
    fn default() -> Self {
        Transform { augment: false, crop_padding: 4, flip: true, normalize: Normalize::Auto, resize: None, crop: None }
    }
}

impl Transform {
    /// The reference sample's training transforms (crop with padding 4, flip, CIFAR-10 normalization).
    pub fn reference_train() -> Transform {
        Transform { augment: true, ..Transform::default() }
    }

    /// The (height, width) of what [`Transform::apply`] makes of an image of `height x width`.
    pub fn output_size(&self, height: usize, width: usize) -> (usize, usize) {
        match (self.crop, self.resize) {
            (Some(n), _) => (n, n),
            (None, Some(n)) => resized_size(height, width, n),
            (None, None) => (height, width),
        }
    }

    /// Turns an HWC image into normalized CHW `f32`, with the random choices of (seed, epoch, position).
    pub fn apply(&self, image: &Image, seed: u64, epoch: u64, position: u64) -> Result<Vec<f32>, String> {
        let resized;
        let image = match self.resize {
            Some(n) => {
                resized = resize(image, n)?;
                &resized
            }
            None => image,
        };
        let (h, w, c) = (image.height, image.width, image.channels);
        let (mean, std) = self.normalize.for_channels(c)?;
        let (oh, ow) = self.crop.map_or((h, w), |n| (n, n));
        let (mut dy, mut dx, mut flip) = (0isize, 0isize, false);
        if self.augment {
            let mut rng = Rng::derive(&[seed, epoch, position, PURPOSE_AUGMENT]);
            let p = self.crop_padding;
            // Offsets of the crop window inside the padded image, as RandomCrop draws them (top, then left); a
            // window larger than the padded image keeps its top-left corner and pads the rest with zeros.
            dy = rng.below(((h + 2 * p).saturating_sub(oh) + 1) as u64) as isize - p as isize;
            dx = rng.below(((w + 2 * p).saturating_sub(ow) + 1) as u64) as isize - p as isize;
            flip = self.flip && rng.below(2) == 1;
        } else if self.crop.is_some() {
            dy = center_offset(h, oh);
            dx = center_offset(w, ow);
        }
        let mut out = vec![0f32; c * oh * ow];
        for ch in 0..c {
            let zero = (0.0 - mean[ch]) / std[ch];
            for y in 0..oh {
                let sy = y as isize + dy;
                for x in 0..ow {
                    let xc = if flip { ow - 1 - x } else { x };
                    let sx = xc as isize + dx;
                    let v = if sy < 0 || sx < 0 || sy >= h as isize || sx >= w as isize {
                        zero
                    } else {
                        let px = image.pixels[(sy as usize * w + sx as usize) * c + ch];
                        (f32::from(px) / 255.0 - mean[ch]) / std[ch]
                    };
                    out[(ch * oh + y) * ow + x] = v;
                }
            }
        }
        Ok(out)
    }

    /// What inference must do to an image to feed the trained model as validation fed it, for the exported
    /// model's metadata: the settings, the mean and std actually used for `channels`-channel images, and the same
    /// as torchvision code.
    pub fn record(&self, channels: usize) -> Result<serde_json::Value, String> {
        let (mean, std) = self.normalize.for_channels(channels)?;
        let list = |v: &[f32]| v.iter().map(f32::to_string).collect::<Vec<_>>().join(", ");
        let mut steps = Vec::new();
        if let Some(n) = self.resize {
            steps.push(format!(
                "transforms.Resize({n}, interpolation=transforms.InterpolationMode.BILINEAR, antialias=True)"
            ));
        }
        if let Some(n) = self.crop {
            steps.push(format!("transforms.CenterCrop({n})"));
        }
        steps.push("transforms.ToTensor()".into());
        steps.push(format!("transforms.Normalize([{}], [{}])", list(&mean), list(&std)));
        Ok(serde_json::json!({
            "resize": self.resize,
            "interpolation": "bilinear, antialiased",
            "crop": self.crop,
            "normalize": self.normalize.to_string(),
            "mean": mean,
            "std": std,
            "train_augment": self.augment,
            "crop_padding": self.crop_padding,
            "flip": self.flip,
            "torchvision": format!("transforms.Compose([{}])", steps.join(", ")),
        }))
    }
}

/// (height, width) after torchvision's `Resize(n)`: the shorter side `n`, the longer `floor(n * long / short)`.
fn resized_size(height: usize, width: usize, n: usize) -> (usize, usize) {
    if width <= height {
        (n * height / width.max(1), n)
    } else {
        (n, n * width / height.max(1))
    }
}

/// Where `CenterCrop(crop)` starts in a side of `size`: `round((size - crop) / 2)` with Python's round (half to
/// even), or, for a side shorter than the crop, minus the zero padding before it (`(crop - size) // 2`).
fn center_offset(size: usize, crop: usize) -> isize {
    if size < crop {
        return -(((crop - size) / 2) as isize);
    }
    let d = size - crop;
    let half = d / 2;
    (if d % 2 == 1 && half % 2 == 1 { half + 1 } else { half }) as isize
}

/// torchvision's `Resize(n)` of an HWC image: bilinear (the triangle filter), antialiased when shrinking.
fn resize(image: &Image, n: usize) -> Result<Image, String> {
    use image::imageops::{self, FilterType};
    if image.height == 0 || image.width == 0 {
        return Err(format!("cannot resize an empty {}x{} image", image.width, image.height));
    }
    let (h, w) = resized_size(image.height, image.width, n);
    if (h, w) == (image.height, image.width) {
        return Ok(image.clone());
    }
    let bad =
        || format!("{}x{} image with {} channels has the wrong pixel count", image.width, image.height, image.channels);
    let (iw, ih, ow, oh) = (image.width as u32, image.height as u32, w as u32, h as u32);
    let pixels = match image.channels {
        1 => {
            let buf = image::GrayImage::from_raw(iw, ih, image.pixels.clone()).ok_or_else(bad)?;
            imageops::resize(&buf, ow, oh, FilterType::Triangle).into_raw()
        }
        3 => {
            let buf = image::RgbImage::from_raw(iw, ih, image.pixels.clone()).ok_or_else(bad)?;
            imageops::resize(&buf, ow, oh, FilterType::Triangle).into_raw()
        }
        c => return Err(format!("cannot resize a {c}-channel image")),
    };
    Ok(Image { height: h, width: w, channels: image.channels, pixels })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> Image {
        Image { height: 4, width: 5, channels: 3, pixels: (0..60).map(|i| (i * 4) as u8).collect() }
    }

    #[test]
    fn without_augmentation_it_is_to_tensor_and_normalize() {
        let t = Transform { normalize: Normalize::Off, ..Transform::default() };
        let out = t.apply(&image(), 1, 2, 3).unwrap();
        // CHW: channel 1, row 2, column 3 comes from HWC pixel (2*5+3)*3+1.
        assert_eq!(out[(4 + 2) * 5 + 3], f32::from(((2 * 5 + 3) * 3 + 1) as u8 * 4) / 255.0);
        let n = Transform::default().apply(&image(), 1, 2, 3).unwrap();
        assert!((n[0] - (0.0 - CIFAR10_MEAN[0]) / CIFAR10_STD[0]).abs() < 1e-6);
    }

    #[test]
    fn augmentation_depends_only_on_seed_epoch_and_position() {
        let t = Transform::reference_train();
        let a = t.apply(&image(), 7, 1, 42).unwrap();
        assert_eq!(a, t.apply(&image(), 7, 1, 42).unwrap());
        let others: Vec<_> = (0..20).map(|p| t.apply(&image(), 7, 1, p).unwrap()).collect();
        assert!(others.iter().any(|o| *o != a), "positions draw different crops");
    }

    #[test]
    fn crops_are_shifts_with_zero_padding_and_flips_mirror() {
        let t = Transform { augment: true, normalize: Normalize::Off, ..Transform::default() };
        let img = image();
        let plain = Transform { normalize: Normalize::Off, ..Transform::default() }.apply(&img, 0, 0, 0).unwrap();
        for position in 0..50 {
            let out = t.apply(&img, 3, 0, position).unwrap();
            // Every output value is either padding (0) or one of the image's own values of that channel.
            for ch in 0..3 {
                let own: Vec<f32> = plain[ch * 20..(ch + 1) * 20].to_vec();
                for v in &out[ch * 20..(ch + 1) * 20] {
                    assert!(*v == 0.0 || own.contains(v));
                }
            }
        }
    }

    #[test]
    fn wrong_channel_count_for_normalization_is_an_error() {
        let t = Transform { normalize: Normalize::MeanStd { mean: vec![0.5], std: vec![0.5] }, ..Transform::default() };
        assert!(t.apply(&image(), 0, 0, 0).unwrap_err().contains("1 means"));
    }

    #[test]
    fn normalize_reads_auto_none_and_means_over_stds_and_refuses_the_rest_with_the_syntax() {
        assert_eq!("auto".parse::<Normalize>().unwrap(), Normalize::Auto);
        assert_eq!("none".parse::<Normalize>().unwrap(), Normalize::Off);
        assert_eq!(
            "0.5, 0.4,0.3/0.2,0.2,0.1".parse::<Normalize>().unwrap(),
            Normalize::MeanStd { mean: vec![0.5, 0.4, 0.3], std: vec![0.2, 0.2, 0.1] }
        );
        for (bad, why) in [
            ("imagenet", "not auto, none or MEANS/STDS"),
            ("0.5,0.5/0.2", "2 means but 1 stds"),
            ("0.5/", "'' is not a number"),
            ("0.5/nan", "'nan' is not a number"),
            ("0.5/-0.2", "above 0"),
        ] {
            let e = bad.parse::<Normalize>().unwrap_err();
            assert!(e.contains(why) && e.contains(NORMALIZE_SYNTAX) && e.contains(bad), "{bad}: {e}");
        }
    }

    proptest::proptest! {
        #[test]
        fn normalize_reads_back_what_it_writes(
            pairs in proptest::collection::vec((-10.0f32..10.0, 0.001f32..10.0), 1..5)
        ) {
            let n = Normalize::MeanStd {
                mean: pairs.iter().map(|p| p.0).collect(),
                std: pairs.iter().map(|p| p.1).collect(),
            };
            proptest::prop_assert_eq!(n.to_string().parse::<Normalize>().unwrap(), n);
        }
    }

    #[test]
    fn center_crops_start_where_torchvision_rounds_half_to_even() {
        // round((size - crop) / 2) in Python: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, 3.5 -> 4.
        let starts: Vec<isize> = [1, 3, 5, 7, 4].iter().map(|d| center_offset(10 + d, 10)).collect();
        assert_eq!(starts, vec![0, 2, 2, 4, 2]);
        // A side shorter than the crop is padded, (crop - size) // 2 before it.
        assert_eq!((center_offset(7, 10), center_offset(6, 10)), (-1, -2));
    }

    #[test]
    fn resize_keeps_the_aspect_ratio_as_torchvision_floors_it() {
        let t = Transform { resize: Some(10), ..Transform::default() };
        assert_eq!(t.output_size(20, 30), (10, 15));
        assert_eq!(t.output_size(31, 12), (25, 10), "floor(10 * 31 / 12) = 25");
        assert_eq!(t.output_size(7, 7), (10, 10));
        let t = Transform { resize: Some(10), crop: Some(8), ..Transform::default() };
        assert_eq!(t.output_size(31, 12), (8, 8));
        let out = t.apply(&image(), 0, 0, 0).unwrap();
        assert_eq!(out.len(), 3 * 8 * 8);
    }

    #[test]
    fn a_random_crop_is_a_window_of_the_padded_image_of_the_crop_size() {
        let img = image();
        let t = Transform {
            augment: true,
            flip: false,
            crop: Some(3),
            crop_padding: 1,
            normalize: Normalize::Off,
            ..Transform::default()
        };
        let whole = Transform { normalize: Normalize::Off, ..Transform::default() }.apply(&img, 0, 0, 0).unwrap();
        let padded = |ch: usize, y: isize, x: isize| {
            if y < 0 || x < 0 || y >= 4 || x >= 5 {
                0.0
            } else {
                whole[(ch * 4 + y as usize) * 5 + x as usize]
            }
        };
        let mut windows = std::collections::BTreeSet::new();
        for position in 0..60 {
            let out = t.apply(&img, 9, 0, position).unwrap();
            assert_eq!(out.len(), 3 * 3 * 3);
            // The window's top-left corner in the padded image: one of 4 rows x 5 columns.
            let found = (-1..=2isize).flat_map(|dy| (-1..=3isize).map(move |dx| (dy, dx))).find(|&(dy, dx)| {
                (0..3).all(|ch| {
                    (0..3).all(|y| {
                        (0..3).all(|x| out[(ch * 3 + y) * 3 + x] == padded(ch, y as isize + dy, x as isize + dx))
                    })
                })
            });
            windows.insert(found.expect("the crop is a window of the padded image"));
        }
        assert!(windows.len() > 5, "crops land in many places: {windows:?}");
    }

    #[test]
    fn the_record_resolves_auto_and_spells_the_torchvision_transforms() {
        let t = Transform { resize: Some(36), crop: Some(32), ..Transform::reference_train() };
        let r = t.record(3).unwrap();
        assert_eq!(r["mean"], serde_json::json!(CIFAR10_MEAN));
        assert_eq!(
            (r["resize"].as_u64(), r["crop"].as_u64(), r["normalize"].as_str()),
            (Some(36), Some(32), Some("auto"))
        );
        let code = r["torchvision"].as_str().unwrap();
        assert!(
            code.starts_with("transforms.Compose([transforms.Resize(36, ")
                && code.contains("transforms.CenterCrop(32)"),
            "{code}"
        );
        assert!(Transform::default().record(2).unwrap_err().contains("2-channel"));
    }

    #[test]
    fn images_that_cannot_be_resized_are_errors_not_panics() {
        let t = Transform { resize: Some(3), ..Transform::default() };
        let empty = Image { height: 0, width: 5, channels: 3, pixels: vec![] };
        assert!(t.apply(&empty, 0, 0, 0).unwrap_err().contains("empty 5x0 image"));
        let two = Image { height: 4, width: 5, channels: 2, pixels: vec![0; 40] };
        assert!(t.apply(&two, 0, 0, 0).unwrap_err().contains("2-channel"));
        let short = Image { pixels: vec![0; 10], ..image() };
        assert!(t.apply(&short, 0, 0, 0).unwrap_err().contains("wrong pixel count"));
    }
}
