//! The reference sample's transforms: `RandomCrop(32, padding=4)`, `RandomHorizontalFlip()`, `ToTensor()`,
//! `Normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))`, applied to one HWC image to give CHW `f32`.
//!
//! Each random choice comes from [`Rng::derive`] over (seed, epoch, the sample's position in the epoch), never from
//! a thread's generator, so the result is the same whichever worker decodes the sample, and a resumed epoch
//! repeats it exactly.

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

impl Normalize {
    fn for_channels(&self, channels: usize) -> Result<(Vec<f32>, Vec<f32>), String> {
        let (mean, std) = match self {
            Normalize::Off => (vec![0.0; channels], vec![1.0; channels]),
            Normalize::Auto if channels == 3 => (CIFAR10_MEAN.to_vec(), CIFAR10_STD.to_vec()),
            Normalize::Auto if channels == 1 => (MNIST_MEAN.to_vec(), MNIST_STD.to_vec()),
            Normalize::Auto => {
                return Err(format!(
                    "no default normalization for {channels}-channel images"
                ))
            }
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
    /// Zero padding on each side before the random crop back to the original size (the reference: 4).
    pub crop_padding: usize,
    /// Flip horizontally with probability 1/2 when augmenting.
    pub flip: bool,
    /// Normalization after scaling to `[0, 1]`.
    pub normalize: Normalize,
}

impl Default for Transform {
    fn default() -> Self {
        Transform {
            augment: false,
            crop_padding: 4,
            flip: true,
            normalize: Normalize::Auto,
        }
    }
}

impl Transform {
    /// The reference sample's training transforms (crop with padding 4, flip, CIFAR-10 normalization).
    pub fn reference_train() -> Transform {
        Transform {
            augment: true,
            ..Transform::default()
        }
    }

    /// Turns an HWC image into normalized CHW `f32`, with the random choices of (seed, epoch, position).
    pub fn apply(
        &self,
        image: &Image,
        seed: u64,
        epoch: u64,
        position: u64,
    ) -> Result<Vec<f32>, String> {
        let (h, w, c) = (image.height, image.width, image.channels);
        let (mean, std) = self.normalize.for_channels(c)?;
        let (mut dy, mut dx, mut flip) = (0isize, 0isize, false);
        if self.augment {
            let mut rng = Rng::derive(&[seed, epoch, position, PURPOSE_AUGMENT]);
            let p = self.crop_padding as u64;
            // Offsets of the crop window inside the padded image, as RandomCrop draws them (top, then left).
            dy = rng.below(2 * p + 1) as isize - p as isize;
            dx = rng.below(2 * p + 1) as isize - p as isize;
            flip = self.flip && rng.below(2) == 1;
        }
        let mut out = vec![0f32; c * h * w];
        for ch in 0..c {
            let zero = (0.0 - mean[ch]) / std[ch];
            for y in 0..h {
                let sy = y as isize + dy;
                for x in 0..w {
                    let xc = if flip { w - 1 - x } else { x };
                    let sx = xc as isize + dx;
                    let v = if sy < 0 || sx < 0 || sy >= h as isize || sx >= w as isize {
                        zero
                    } else {
                        let px = image.pixels[(sy as usize * w + sx as usize) * c + ch];
                        (f32::from(px) / 255.0 - mean[ch]) / std[ch]
                    };
                    out[(ch * h + y) * w + x] = v;
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> Image {
        Image {
            height: 4,
            width: 5,
            channels: 3,
            pixels: (0..60).map(|i| (i * 4) as u8).collect(),
        }
    }

    #[test]
    fn without_augmentation_it_is_to_tensor_and_normalize() {
        let t = Transform {
            normalize: Normalize::Off,
            ..Transform::default()
        };
        let out = t.apply(&image(), 1, 2, 3).unwrap();
        // CHW: channel 1, row 2, column 3 comes from HWC pixel (2*5+3)*3+1.
        assert_eq!(
            out[(4 + 2) * 5 + 3],
            f32::from(((2 * 5 + 3) * 3 + 1) as u8 * 4) / 255.0
        );
        let n = Transform::default().apply(&image(), 1, 2, 3).unwrap();
        assert!((n[0] - (0.0 - CIFAR10_MEAN[0]) / CIFAR10_STD[0]).abs() < 1e-6);
    }

    #[test]
    fn augmentation_depends_only_on_seed_epoch_and_position() {
        let t = Transform::reference_train();
        let a = t.apply(&image(), 7, 1, 42).unwrap();
        assert_eq!(a, t.apply(&image(), 7, 1, 42).unwrap());
        let others: Vec<_> = (0..20)
            .map(|p| t.apply(&image(), 7, 1, p).unwrap())
            .collect();
        assert!(
            others.iter().any(|o| *o != a),
            "positions draw different crops"
        );
    }

    #[test]
    fn crops_are_shifts_with_zero_padding_and_flips_mirror() {
        let t = Transform {
            augment: true,
            normalize: Normalize::Off,
            ..Transform::default()
        };
        let img = image();
        let plain = Transform {
            normalize: Normalize::Off,
            ..Transform::default()
        }
        .apply(&img, 0, 0, 0)
        .unwrap();
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
        let t = Transform {
            normalize: Normalize::MeanStd {
                mean: vec![0.5],
                std: vec![0.5],
            },
            ..Transform::default()
        };
        assert!(t.apply(&image(), 0, 0, 0).unwrap_err().contains("1 means"));
    }
}
