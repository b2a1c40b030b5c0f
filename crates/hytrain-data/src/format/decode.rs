//! Image decoding (png, jpeg) with the `image` crate, to 8-bit gray or RGB.

use super::{Image, ImageKind};

/// Decodes png or jpeg bytes. Gray images (with or without alpha, 8 or 16 bit) become 1 channel, everything else
/// 3-channel RGB; alpha is dropped, as torchvision's `convert("RGB")` does.
pub fn image(bytes: &[u8], kind: ImageKind) -> Result<Image, String> {
    // Trust the bytes over the extension: a `.jpg` that is really a png still decodes.
    let format = image::guess_format(bytes).unwrap_or(match kind {
        ImageKind::Png => image::ImageFormat::Png,
        ImageKind::Jpeg => image::ImageFormat::Jpeg,
    });
    let img = image::load_from_memory_with_format(bytes, format).map_err(|e| e.to_string())?;
    let gray = matches!(
        img.color(),
        image::ColorType::L8
            | image::ColorType::La8
            | image::ColorType::L16
            | image::ColorType::La16
    );
    Ok(if gray {
        let g = img.into_luma8();
        Image {
            height: g.height() as usize,
            width: g.width() as usize,
            channels: 1,
            pixels: g.into_raw(),
        }
    } else {
        let c = img.into_rgb8();
        Image {
            height: c.height() as usize,
            width: c.width() as usize,
            channels: 3,
            pixels: c.into_raw(),
        }
    })
}

/// Encodes an image as png (what `pack` writes for CIFAR and MNIST).
pub fn png(img: &Image) -> Result<Vec<u8>, String> {
    use image::ImageEncoder;
    let color = match img.channels {
        1 => image::ExtendedColorType::L8,
        3 => image::ExtendedColorType::Rgb8,
        c => return Err(format!("cannot write a {c}-channel image as png")),
    };
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(&img.pixels, img.width as u32, img.height as u32, color)
        .map_err(|e| e.to_string())?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_roundtrip_keeps_pixels_for_rgb_and_gray() {
        for channels in [1, 3] {
            let pixels: Vec<u8> = (0..5 * 7 * channels)
                .map(|i| (i * 37 % 256) as u8)
                .collect();
            let img = Image {
                height: 5,
                width: 7,
                channels,
                pixels,
            };
            let back = image(&png(&img).unwrap(), ImageKind::Png).unwrap();
            assert_eq!(back, img);
        }
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(image(b"definitely not an image", ImageKind::Png).is_err());
        assert!(image(b"\x89PNG\r\n\x1a\n\0\0\0", ImageKind::Png).is_err());
    }
}
